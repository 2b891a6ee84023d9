"""Reading a run's JSON-lines logs back: metrics.jsonl and events.jsonl (pure: json only).

The training loop (raypack.train.loop) writes, under a run's folder, one JSON
object per line: metrics.jsonl (one line per optimizer step, rank 0) and
events.jsonl (start / resume / checkpoint / preempted / done). Everything that
reads them back (the launcher, a study, a sweep and its analysis, the
benchmarks) reads them here:

    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp())
    >>> _ = (run / "metrics.jsonl").write_text('{"step": 1, "loss": 8.3}\\n{"step": 2, "lo')
    >>> read_metrics(run)     # the last line is still being written (or its writer was killed)
    [{'step': 1, 'loss': 8.3}]
    >>> read_events(run)      # not written yet
    []
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSON-lines file, [] when it does not exist; a line that does not parse (empty, or cut
    short by a writer still at work or killed) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    """A run's per-step metrics (<run_dir>/metrics.jsonl), step 1 first."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def read_events(run_dir: str | Path) -> list[dict]:
    """A run's events (<run_dir>/events.jsonl), every launch and restart in order."""
    return read_jsonl(Path(run_dir) / EVENTS_FILE)
