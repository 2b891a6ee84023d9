"""Benchmarks that print figures: how fast and how tight each packing strategy plans.

`bench_pack` plans every strategy on the same lengths, and TRL's
`pack_dataset(strategy="bfd")` on the same lengths in the same process, so the
figures are comparable. `bench_grouping` plans bfd with each pack composition
(``raypack.data.compose``: grouping none, related, unrelated) on random cluster
labels, and says what grouping costs in rows and seconds. Measure on one core:

    taskset -c 0 env NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \\
        raypack bench pack jobs/compare.yaml synth.num_samples=1200000 --json out/bench_pack.json

What is measured, so the numbers are read right:

- raypack ``seconds`` is wall time of ``plan_pack`` alone (lengths in, plan out),
  after a warm-up call that loads or compiles the numba kernels. TRL's seconds
  cover ``pack_dataset``, which also copies the tokens into packed rows: its
  planning cannot be timed apart from that.
- Over-length samples: the packers never truncate or drop anything. Before
  planning, the bench truncates lengths to ``max_seq_len`` for padding, greedy and
  bfd (``num_truncated`` counts them; as TRL's "bfd" does internally), while
  random gets the raw lengths and splits them. ``num_dropped`` is 0 throughout.
- Memory: ``peak_traced_mb`` is the tracemalloc peak of a second, untimed call
  (tracemalloc sees numpy's allocations; the planner allocates its numba work
  arrays with numpy for that reason). ``peak_rss_delta_mb`` is the rise of the
  process's peak RSS (VmHWM, reset through /proc/self/clear_refs) during the
  timed call; freed memory that is reused does not show, so it can read low.
  Arrow's allocations are invisible to tracemalloc, so TRL gets the RSS figure
  and arrow's pool peak only.
"""

import gc
import time
import tracemalloc

import numpy as np

from raypack.config import STRATEGIES
from raypack.data.compose import GROUPINGS, composition_stats, plan_composed
from raypack.data.pack import plan_pack, plan_stats

TRL_WINDOW = 1000  # TRL packs inside dataset.map batches, 1000 rows by default
MEMORY_METHOD = ("peak_traced_mb: tracemalloc peak of an untimed repeat (numpy allocations); "
                 "peak_rss_delta_mb: VmHWM rise over VmRSS during the timed call")


def bench_pack(lengths: np.ndarray, max_seq_len: int, window: int = 0, micro_batch_size: int = 1,
               trl: bool = True) -> dict:
    """Plan every strategy on ``lengths`` (and TRL's bfd when ``trl``); returns JSON-ready figures."""
    lengths = np.asarray(lengths, dtype=np.int64)
    num_over = int((lengths > max_seq_len).sum())
    truncated = np.minimum(lengths, max_seq_len)
    _warm_up()
    strategies = {}
    for strategy in STRATEGIES:
        used = lengths if strategy == "random" else truncated
        strategies[strategy] = _bench_strategy(used, strategy, max_seq_len, window, micro_batch_size,
                                               num_truncated=0 if strategy == "random" else num_over)
    result = {
        "num_samples": len(lengths),
        "num_tokens": int(lengths.sum()),
        "max_seq_len": max_seq_len,
        "window": window,
        "micro_batch_size": micro_batch_size,
        "num_over_max_seq_len": num_over,
        "memory_method": MEMORY_METHOD,
        "strategies": strategies,
        "trl": _bench_trl(lengths, truncated, max_seq_len, strategies["bfd"]["seconds"]) if trl else None,
    }
    return result


def _warm_up() -> None:
    """Load (or compile, the first time) the numba kernels outside any timing."""
    for strategy in STRATEGIES:
        plan_pack(np.array([3, 1, 2], dtype=np.int64), 4, strategy)
        plan_pack(np.array([3, 1, 2], dtype=np.int64), 4, strategy, window=2)


def _bench_strategy(lengths, strategy, max_seq_len, window, micro_batch_size, num_truncated) -> dict:
    def run():
        return plan_pack(lengths, max_seq_len, strategy, window)

    seconds, rss_delta, plan = _timed(run)
    stats = plan_stats(plan, lengths, max_seq_len, micro_batch_size)
    del plan
    return {
        "seconds": seconds,
        "num_rows": stats["num_rows"],
        "lower_bound_rows": stats["lower_bound_rows"],
        "rows_over_lower_bound": stats["rows_over_lower_bound"],
        "efficiency": stats["efficiency"],
        "padding_fraction": stats["padding_fraction"],
        "num_split_samples": stats["num_split_samples"],
        "num_truncated": num_truncated,
        "num_dropped": 0,
        "peak_traced_mb": _traced_peak(run) / 2**20,
        "peak_rss_delta_mb": rss_delta,
    }


def _timed(fn):
    """(wall seconds, peak-RSS rise in MiB or None, result) of one call."""
    gc.collect()
    can_reset = _reset_peak_rss()
    rss_before = _proc_status_kib("VmRSS")
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    rss_delta = (_proc_status_kib("VmHWM") - rss_before) / 1024 if can_reset else None
    return seconds, rss_delta, out


def _traced_peak(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _bench_trl(lengths, truncated, max_seq_len, raypack_bfd_seconds) -> dict:
    """TRL's bfd on the same lengths; its rows should equal raypack bfd at TRL's window."""
    try:
        import datasets
        import pyarrow as pa
        import pyarrow.compute as pc
        from trl.data_utils import pack_dataset
    except ImportError as e:
        return {"skipped": f"trl not importable ({e}); pip install trl"}
    datasets.disable_progress_bars()
    dataset = _lengths_dataset(lengths, datasets, pa)
    seconds, rss_delta, packed = _timed(lambda: pack_dataset(dataset, seq_length=max_seq_len, strategy="bfd"))
    row_lens = pc.list_value_length(packed.data.column("input_ids"))
    num_rows = len(packed)
    num_tokens = int(pc.sum(row_lens).as_py())
    lower_bound = -(-num_tokens // max_seq_len)
    same_seconds, _, same_plan = _timed(lambda: plan_pack(truncated, max_seq_len, "bfd", TRL_WINDOW))
    same_window = plan_stats(same_plan, truncated, max_seq_len)
    return {
        "seconds": seconds,
        "num_rows": num_rows,
        "lower_bound_rows": lower_bound,
        "rows_over_lower_bound": num_rows / lower_bound if lower_bound else 1.0,
        "efficiency": num_tokens / (num_rows * max_seq_len) if num_rows else 0.0,
        "num_split_samples": 0,
        "num_truncated": int((lengths > max_seq_len).sum()),  # TRL's "bfd" truncates internally
        "num_dropped": 0,
        "peak_traced_mb": None,  # arrow memory is invisible to tracemalloc
        "peak_rss_delta_mb": rss_delta,
        "arrow_pool_peak_mb": pa.default_memory_pool().max_memory() / 2**20,
        "window": TRL_WINDOW,
        "seconds_over_raypack_bfd": seconds / raypack_bfd_seconds,
        "raypack_bfd_rows_at_trl_window": same_window["num_rows"],
        "raypack_bfd_seconds_at_trl_window": same_seconds,
    }


def _lengths_dataset(lengths, datasets, pa):
    """A Dataset whose input_ids rows have exactly these lengths, over one int8 zeros buffer.

    TRL only reads the list offsets to plan and then copies values, so int8 values
    (4x less to copy than real int32 ids) make TRL's time a lower bound.
    """
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    values = pa.array(np.zeros(int(offsets[-1]), dtype=np.int8))
    if offsets[-1] < 2**31:
        column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    else:
        column = pa.LargeListArray.from_arrays(pa.array(offsets), values)
    return datasets.Dataset(datasets.table.InMemoryTable(pa.table({"input_ids": column})))


def bench_grouping(lengths: np.ndarray, max_seq_len: int, window: int = 0, k: int = 16, seed: int = 0) -> dict:
    """bfd with every grouping on ``lengths`` (truncated to ``max_seq_len``) and ``k`` random cluster labels.

    ``seconds`` is wall time of ``plan_composed`` alone, after a warm-up call that
    loads or compiles the numba kernels; the cluster fractions count packed rows
    (>= 2 samples) that mix clusters or hold one cluster twice.
    """
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), max_seq_len)
    clusters = np.random.default_rng(seed).integers(0, k, len(lengths))
    for grouping in GROUPINGS:  # warm-up
        plan_composed(np.array([3, 1, 2]), 4, "bfd", 2, grouping, None if grouping == "none" else np.array([0, 1, 0]))
    groupings = {}
    for grouping in GROUPINGS:
        seconds, _, plan = _timed(lambda g=grouping: plan_composed(lengths, max_seq_len, "bfd", window, g,
                                                                   None if g == "none" else clusters))
        stats = plan_stats(plan, lengths, max_seq_len)
        composition = composition_stats(plan, clusters)
        groupings[grouping] = {
            "seconds": seconds,
            "num_rows": stats["num_rows"],
            "lower_bound_rows": stats["lower_bound_rows"],
            "rows_over_lower_bound": stats["rows_over_lower_bound"],
            "mixed_cluster_row_fraction": composition["mixed_cluster_row_fraction"],
            "repeated_cluster_row_fraction": composition["repeated_cluster_row_fraction"],
        }
    return {"num_samples": len(lengths), "num_tokens": int(lengths.sum()), "max_seq_len": max_seq_len,
            "window": window, "num_clusters": k, "seed": seed, "strategy": "bfd", "groupings": groupings}


# ---------------------------------------------------------------- printing


def format_pack_table(result: dict) -> str:
    """The result of `bench_pack` as a text table, one line per strategy (and TRL)."""
    head = (f"{result['num_samples']:,} samples, {result['num_tokens']:,} tokens, max_seq_len "
            f"{result['max_seq_len']}, window {result['window'] or 'all'}, micro_batch_size "
            f"{result['micro_batch_size']}, {result['num_over_max_seq_len']:,} over max_seq_len")
    columns = ("strategy", "seconds", "rows", "lower bound", "rows/LB", "efficiency", "split",
               "truncated", "dropped", "traced MiB", "RSS+ MiB")
    lines = [head, _format_line(columns)]
    for name, entry in result["strategies"].items():
        lines.append(_format_line(_cells(name, entry)))
    trl = result.get("trl")
    if trl and "skipped" not in trl:
        lines.append(_format_line(_cells(f"TRL bfd/{trl['window']}", trl)))
        same = "equal" if trl["raypack_bfd_rows_at_trl_window"] == trl["num_rows"] else "DIFFERENT"
        lines.append(f"TRL bfd seconds / raypack bfd seconds: {trl['seconds_over_raypack_bfd']:.0f}x; "
                     f"raypack bfd at window {trl['window']}: {trl['raypack_bfd_rows_at_trl_window']:,} rows "
                     f"in {trl['raypack_bfd_seconds_at_trl_window']:.3f} s ({same} to TRL); "
                     f"arrow pool peak {trl['arrow_pool_peak_mb']:.0f} MiB")
    elif trl:
        lines.append(f"TRL: {trl['skipped']}")
    lines.append("raypack packers truncate and drop nothing; 'truncated' counts the bench's "
                 "truncate-to-max_seq_len before padding/greedy/bfd (random splits instead)")
    lines.append(f"memory: {result['memory_method']}")
    return "\n".join(lines)


def _cells(name: str, entry: dict) -> tuple:
    def mib(x):
        return "n/a" if x is None else f"{x:.1f}"

    return (name, f"{entry['seconds']:.3f}", f"{entry['num_rows']:,}", f"{entry['lower_bound_rows']:,}",
            f"{entry['rows_over_lower_bound']:.5f}", f"{entry['efficiency']:.4f}",
            f"{entry['num_split_samples']:,}", f"{entry['num_truncated']:,}", f"{entry['num_dropped']:,}",
            mib(entry["peak_traced_mb"]), mib(entry["peak_rss_delta_mb"]))


def _format_line(cells) -> str:
    widths = (12, 9, 11, 11, 9, 10, 9, 9, 7, 10, 9)
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def format_grouping_table(result: dict) -> str:
    """The result of `bench_grouping` as a text table, one line per grouping."""
    head = (f"bfd, {result['num_samples']:,} samples, {result['num_tokens']:,} tokens (truncated to max_seq_len), "
            f"max_seq_len {result['max_seq_len']}, window {result['window'] or 'all'}, "
            f"{result['num_clusters']} random clusters (seed {result['seed']})")
    widths = (10, 9, 11, 11, 9, 9, 9)
    lines = [head, "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(
        ("grouping", "seconds", "rows", "lower bound", "rows/LB", "mixed", "repeated"), widths)))]
    for name, e in result["groupings"].items():
        cells = (name, f"{e['seconds']:.3f}", f"{e['num_rows']:,}", f"{e['lower_bound_rows']:,}",
                 f"{e['rows_over_lower_bound']:.5f}", f"{e['mixed_cluster_row_fraction']:.3f}",
                 f"{e['repeated_cluster_row_fraction']:.3f}")
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    lines.append("mixed / repeated: share of packed rows (>= 2 samples) holding >= 2 clusters / one cluster twice")
    return "\n".join(lines)
