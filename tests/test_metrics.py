"""Reading a run's logs back (raypack.train.metrics): what every reader of metrics.jsonl and events.jsonl uses.

    .venv/bin/pytest tests/test_metrics.py -q
"""

import doctest
import json

from raypack.train import metrics as metrics_module
from raypack.train.metrics import read_events, read_jsonl, read_metrics


def test_module_examples():
    assert doctest.testmod(metrics_module).failed == 0


def test_lines_as_written_come_back_and_a_torn_or_empty_line_is_skipped(tmp_path):
    steps = [{"step": i, "loss": 8.0 - i, "val_loss": float("nan")} for i in range(1, 4)]
    text = "".join(json.dumps(m) + "\n" for m in steps)
    (tmp_path / "metrics.jsonl").write_text(text + "\n" + text.splitlines()[0][:9])  # an empty line, a torn one
    got = read_metrics(tmp_path)
    assert [m["step"] for m in got] == [1, 2, 3] and [m["loss"] for m in got] == [7.0, 6.0, 5.0]
    (tmp_path / "events.jsonl").write_text('{"event": "start", "step": 0}\n{"event": "done", "step": 3}\n')
    assert [e["event"] for e in read_events(tmp_path)] == ["start", "done"]
    assert read_jsonl(tmp_path / "absent.jsonl") == [] and read_metrics(tmp_path / "nowhere") == []
