"""Benchmark of how training fetches rows (`raypack bench loader`): cost per micro-batch against split size.

For each size (2k, 20k and 190k rows by default), in one run:

1. write an arm of synthetic packed rows straight into the flat layout the
   training loop memory-maps (raypack.data.prepared): lengths like packed rows
   (90% within 200 tokens of max_seq_len, the rest anywhere), 1-8 samples per
   row, random token ids; not timed;
2. start train.num_workers processes (2 by default) that open the arm as the loop
   does (RowStore.open) and fetch + collate (isolated mode) `--fetches` micro-batches
   of train.micro_batch_size rows each, in a random order of their own, all at once;
   per fetch the time of `store.take(idx)` + `collate`; after the last fetch,
   each worker's PSS and RSS from /proc/self/smaps_rollup (PSS splits a page
   shared by several processes between them: the memory really in use);
3. the old path for comparison (`--old-fetches`, 0 skips it): the same rows as
   one chunked Arrow table of 20,000-row chunks (prepare.rows_per_shard), read
   with `table.take(idx).to_pylist()` + collate in this process, as the loop did
   before; and what each worker held with it (12 bytes a token: input_ids,
   labels and position_ids as int32, read whole into every worker).

Targets (reported, not asserted): at 190k rows the median fetch time is at most
1.2x the 2k figure, and per-worker PSS grows at most 1.2x from 2k to 190k rows.
The arms are written just before they are read, so the page cache is warm (the
190k arm is ~6 GB); `--cold` evicts each arm's token files from the page cache
first (posix_fadvise), so every fetch reads from disk.

    raypack bench loader jobs/compare.yaml --sizes 2000,20000,190000 --json out/bench_loader.json
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np

from raypack.data.prepared import FLAT_DIR, FlatWriter, RowStore
from raypack.data.tokenize import IGNORE_INDEX

OLD_CHUNK_ROWS = 20_000  # prepare.rows_per_shard's default: one Arrow chunk per shard
VOCAB_SIZE = 128_256
WRITE_BATCH_ROWS = 2_000


def bench_loader(sizes: list[int], work_dir: str, max_seq_len: int = 4096, workers: int = 2, fetches: int = 500,
                 micro_batch: int = 2, old_fetches: int = 20, cold: bool = False, keep: bool = False,
                 seed: int = 0) -> dict:
    """Build each arm, measure it (module docstring), remove it unless `keep`; returns the figures."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    need = sum(sizes) * max_seq_len * 8
    free = shutil.disk_usage(work).free
    if need > 0.9 * free:
        raise ValueError(f"the arms need up to {need / 2**30:.1f} GiB in {work} and {free / 2**30:.1f} GiB are "
                         "free; give --work-dir on a larger disk or smaller --sizes")
    results = []
    for size in sizes:
        folder = work / f"rows-{size}"
        start = time.perf_counter()
        if not (folder / FLAT_DIR / "flat.json").exists():
            write_synthetic_arm(folder, size, max_seq_len, seed)
        store = RowStore.open(folder)
        result = {"num_rows": size, "num_tokens": int(store.row_offsets[-1]),
                  "disk_bytes": sum(f.stat().st_size for f in (folder / FLAT_DIR).iterdir()),
                  "write_s": time.perf_counter() - start}
        print(f"bench loader: {size:,} rows, {result['num_tokens'] / 1e6:,.0f}M tokens "
              f"({result['disk_bytes'] / 2**30:.2f} GiB) written in {result['write_s']:.0f} s", flush=True)
        if cold:
            _evict(folder / FLAT_DIR)
        result.update(_measure_workers(folder, workers, fetches, micro_batch, seed))
        if old_fetches:
            result.update(_measure_old_path(store, old_fetches, micro_batch, seed))
        results.append(result)
        del store
        if not keep:
            shutil.rmtree(folder)
    return {"sizes": sizes, "max_seq_len": max_seq_len, "workers": workers, "fetches": fetches,
            "micro_batch": micro_batch, "cold": cold, "results": results, **_ratios(results)}


def write_synthetic_arm(folder: Path, num_rows: int, max_seq_len: int, seed: int) -> None:
    """`num_rows` packed-looking rows of random tokens, written batch by batch into folder/flat/."""
    from raypack.data.prepared import publish_flat

    def fill(out: Path) -> None:
        rng = np.random.default_rng([seed, num_rows])
        writer = FlatWriter(out)
        for lo in range(0, num_rows, WRITE_BATCH_ROWS):
            writer.append(*_synthetic_rows(rng, min(WRITE_BATCH_ROWS, num_rows - lo), max_seq_len))
        writer.close("isolated")

    publish_flat(folder / FLAT_DIR, fill)


def _synthetic_rows(rng: np.random.Generator, n: int, max_seq_len: int) -> tuple:
    full = rng.random(n) < 0.9
    lengths = np.where(full, max_seq_len - rng.integers(0, 200, n), rng.integers(16, max_seq_len + 1, n))
    num_samples = rng.integers(1, 9, n)
    seq_lens = []
    for length, k in zip(lengths.tolist(), num_samples.tolist()):
        cuts = np.sort(rng.choice(np.arange(1, length), size=k - 1, replace=False))
        seq_lens.append(np.diff(np.concatenate([[0], cuts, [length]])))
    seq_lens = np.concatenate(seq_lens)
    input_ids = rng.integers(0, VOCAB_SIZE, int(lengths.sum()), dtype=np.int32)
    labels = input_ids.copy()
    labels[np.cumsum(seq_lens) - seq_lens] = IGNORE_INDEX  # every sample's first token, as the packer writes
    return input_ids, labels, lengths, seq_lens, num_samples


def _evict(flat: Path) -> None:
    for path in flat.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _measure_workers(folder: Path, workers: int, fetches: int, micro_batch: int, seed: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    ready, go, out = ctx.Barrier(workers + 1), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_fetch_worker, args=(str(folder), fetches, micro_batch, seed + 1 + w, ready, go, out))
             for w in range(workers)]
    for p in procs:
        p.start()
    ready.wait(timeout=300)
    go.set()
    per_worker = [out.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"a bench worker exited with {p.exitcode}")
    times_ms = np.concatenate([w.pop("times_ms") for w in per_worker])
    return {"fetch_ms_median": float(np.median(times_ms)), "fetch_ms_p99": float(np.percentile(times_ms, 99)),
            "pss_mb": max(w["pss_mb"] for w in per_worker), "rss_mb": max(w["rss_mb"] for w in per_worker),
            "per_worker": per_worker}


def _fetch_worker(folder: str, fetches: int, micro_batch: int, seed: int, ready, go, out) -> None:
    """One reading worker: open the arm like the training loop, wait for the others, fetch, report."""
    from raypack.data.collate import collate

    store = RowStore.open(folder)
    batches = np.random.default_rng(seed).integers(0, store.num_rows, (fetches, micro_batch))
    collate(store.take(batches[0]), "isolated", 0)  # imports and first-call costs out of the timings
    before = _smaps_rollup_mb()
    ready.wait()
    go.wait()
    times = np.empty(fetches)
    for i, idx in enumerate(batches):
        start = time.perf_counter()
        collate(store.take(idx), "isolated", 0)
        times[i] = (time.perf_counter() - start) * 1e3
    after = _smaps_rollup_mb()
    out.put({"times_ms": times, "pss_mb": after["Pss"], "rss_mb": after["Rss"], "pss_file_mb": after["Pss_File"],
             "pss_mb_before": before["Pss"], "rss_mb_before": before["Rss"]})


def _smaps_rollup_mb() -> dict:
    """This process's memory from /proc/self/smaps_rollup (Linux), in MiB."""
    out = {"Pss": float("nan"), "Rss": float("nan"), "Pss_File": float("nan")}
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in out:
                out[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return out


def _measure_old_path(store: RowStore, fetches: int, micro_batch: int, seed: int) -> dict:
    """The loop's old fetch: a chunked Arrow table (one chunk per shard), take(idx).to_pylist(), collate."""
    import pyarrow as pa

    from raypack.data.collate import collate

    offsets, num_rows = np.asarray(store.row_offsets), store.num_rows
    chunks = {"input_ids": [], "labels": [], "position_ids": []}
    for lo in range(0, num_rows, OLD_CHUNK_ROWS):
        hi = min(lo + OLD_CHUNK_ROWS, num_rows)
        chunk_offsets = pa.array((offsets[lo:hi + 1] - offsets[lo]).astype(np.int32))
        for name, values in (("input_ids", store.input_ids), ("labels", store.labels), ("position_ids", store.labels)):
            chunks[name].append(pa.ListArray.from_arrays(chunk_offsets, pa.array(values[offsets[lo]:offsets[hi]])))
    table = pa.table({name: pa.chunked_array(parts) for name, parts in chunks.items()})
    batches = np.random.default_rng(seed).integers(0, num_rows, (fetches, micro_batch))
    times = np.empty(fetches)
    for i, idx in enumerate(batches):
        start = time.perf_counter()
        collate(table.take(idx).to_pylist(), "isolated", 0)
        times[i] = (time.perf_counter() - start) * 1e3
    return {"old_fetch_ms_median": float(np.median(times)), "old_fetch_ms_p99": float(np.percentile(times, 99)),
            "old_held_mb_per_worker": 12 * int(offsets[-1]) / 2**20}


def _ratios(results: list[dict]) -> dict:
    if len(results) < 2:
        return {}
    first, last = results[0], results[-1]
    return {"fetch_ratio": last["fetch_ms_median"] / first["fetch_ms_median"],
            "pss_ratio": last["pss_mb"] / first["pss_mb"]}


def format_loader_result(result: dict) -> str:
    old = any("old_fetch_ms_median" in r for r in result["results"])
    lines = [f"bench loader: {result['workers']} workers reading at once, {result['fetches']} micro-batches of "
             f"{result['micro_batch']} rows each in random order, fetch + collate (isolated); page cache "
             f"{'cold' if result['cold'] else 'warm'}",
             f"{'rows':>9} {'tokens':>8} {'on disk':>9} {'fetch ms':>9} {'p99 ms':>8} {'PSS MB':>8} {'RSS MB':>8}"
             + (f" {'old ms':>8} {'old p99':>8} {'old held MB':>12}" if old else "")]
    for r in result["results"]:
        line = (f"{r['num_rows']:>9,} {r['num_tokens'] / 1e6:>7,.0f}M {r['disk_bytes'] / 2**30:>7.2f}GB "
                f"{r['fetch_ms_median']:>9.3f} {r['fetch_ms_p99']:>8.3f} {r['pss_mb']:>8.0f} {r['rss_mb']:>8.0f}")
        if "old_fetch_ms_median" in r:
            line += (f" {r['old_fetch_ms_median']:>8.2f} {r['old_fetch_ms_p99']:>8.2f}"
                     f" {r['old_held_mb_per_worker']:>12,.0f}")
        lines.append(line)
    if "fetch_ratio" in result:
        first, last = result["results"][0]["num_rows"], result["results"][-1]["num_rows"]
        lines.append(f"{last:,} vs {first:,} rows: fetch x{result['fetch_ratio']:.2f} (target <= 1.2), "
                     f"PSS per worker x{result['pss_ratio']:.2f} (target <= 1.2)")
    lines.append("PSS/RSS: the largest worker's after its fetches. old: chunked Arrow table take().to_pylist() in one "
                 "process (the loop before raypack.data.prepared); old held: the rows every worker read whole "
                 "(12 bytes a token)")
    return "\n".join(lines)
