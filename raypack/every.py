"""A background thread that calls a function every few seconds while a `with` block runs, and once more as the
block ends: how the driver drains the progress a run reports (raypack.train.launch) and a benchmark samples the memory
of its processes (raypack.bench.pipeline).

    with every(1.0, progress.poll):
        trainer.fit()
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def every(interval_s: float, fn: Callable[[], None]) -> Iterator[None]:
    """Call fn() every interval_s seconds in a daemon thread while the block runs, and once more when it ends."""
    stop = threading.Event()

    def run() -> None:
        while True:
            stopping = stop.wait(interval_s)
            fn()
            if stopping:
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
