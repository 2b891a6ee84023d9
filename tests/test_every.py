"""raypack.every: a function called in the background while a block runs, and once more as it ends.

    .venv/bin/pytest tests/test_every.py -q
"""

import threading

from raypack.every import every


def test_calls_while_the_block_runs_then_once_at_its_end_then_never():
    calls, called = [], threading.Event()

    def fn():
        calls.append("block" if not ended.is_set() else "end")
        called.set()

    ended = threading.Event()
    with every(0.01, fn):
        assert called.wait(10), "never called while the block ran"
        ended.set()
    after = len(calls)
    assert calls[0] == "block" and calls[-1] == "end"
    threading.Event().wait(0.05)
    assert len(calls) == after  # the thread has stopped


def test_the_last_call_comes_even_when_the_block_is_shorter_than_the_interval():
    calls = []
    with every(3600, lambda: calls.append(1)):
        pass
    assert calls == [1]
