"""Benchmark of `raypack prepare`: pipeline throughput against the bare tokenizer, rows, memory.

On the same synthetic text and the same cores, in one run:

1. write the preset's conversations as JSONL shards (Ray tasks; not timed);
2. the limit: the fast tokenizer alone over the same rendered texts, in batches,
   with its own Rust threads on every core (rendering is not timed);
3. the pipeline: `prepare` end to end (read, normalise, render, tokenize, mask,
   over-length policy, cache, hold-out, pack, write) with one packed arm, timed
   from a started Ray instance to the last manifest;
4. peak memory summed over the driver and every Ray process, sampled every 1 s,
   two ways: RSS (shared object-store pages count once per process that maps
   them, so it over-counts) and PSS (each shared page split between the
   processes that map it: the sum is the memory really in use);
5. with --pack-workers 1,2: the packing stage alone again on the same tokenized
   cache (best of 2 runs), per number of packing tasks per split
   (`prepare.pack_workers`), checking that every run writes the same bytes.

    raypack bench pipeline jobs/compare.yaml synth.num_samples=100000 pack.window=100000 --json out/bench_pipeline.json
    raypack bench pipeline jobs/compare.yaml synth.num_samples=20000 pack.window=2000 --skip-bare --pack-workers 1,2
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import psutil
import ray

from raypack.config import Config, SynthConfig, validate
from raypack.data import formats, synth
from raypack.data.pipeline import prepare
from raypack.data.prepared import read_manifest
from raypack.data.tokenize import render_conversation
from raypack.every import every
from raypack.model import load_tokenizer
from raypack.ray_start import ensure_ray

SHARD_SAMPLES = 20_000


@ray.remote(num_cpus=1)
def _write_shard(synth_cfg: SynthConfig, tokenizer: str, first_block: int, num: int, out: str) -> int:
    rows = (row for b in range(first_block, first_block + -(-num // synth.BLOCK_SIZE))
            for row in synth.synth_block(synth_cfg, b, tokenizer))
    return synth.write_jsonl(rows, out)


def write_synth_shards(synth_cfg: SynthConfig, tokenizer: str, folder: Path) -> list[str]:
    """The synth settings' rows (raypack.data.synth.synth_rows) as JSONL shards (reused when present)."""
    folder.mkdir(parents=True, exist_ok=True)
    s, total = synth_cfg, synth.num_rows(synth_cfg)
    stem = {"words": s.preset, "chain": f"chain-{s.preset}"}.get(s.task, f"{synth.name(s)}-{Path(tokenizer).name}")
    paths, refs = [], []
    for i, start in enumerate(range(0, total, SHARD_SAMPLES)):
        num = min(SHARD_SAMPLES, total - start)
        path = folder / f"{stem}-{s.seed}-{i:04d}.jsonl"
        paths.append(str(path))
        if not path.exists():
            refs.append(_write_shard.remote(s, tokenizer, start // synth.BLOCK_SIZE, num, str(path)))
    ray.get(refs)
    return paths


def bare_tokenizer(paths: list[str], tokenizer_name: str, batch_size: int = 256) -> dict:
    """Tokens per second of the fast tokenizer alone over the rendered texts of these files."""
    tokenizer = load_tokenizer(tokenizer_name)
    num_tokens, seconds = 0, 0.0
    for path in paths:
        convs = [formats.normalise_row(row, "messages", f"{path}:{n}") for n, row in formats.iter_raw_rows(path)]
        texts = [render_conversation(c, tokenizer)[0] for c in convs]
        for lo in range(0, len(texts), batch_size):
            start = time.perf_counter()
            encoded = tokenizer(texts[lo:lo + batch_size], add_special_tokens=False)
            seconds += time.perf_counter() - start
            num_tokens += sum(len(ids) for ids in encoded["input_ids"])
    return {"num_tokens": num_tokens, "seconds": seconds, "tokens_per_sec": num_tokens / seconds}


class _PeakRss:
    """The peak summed RSS and PSS of this process and all its descendants (the local Ray processes)."""

    def __init__(self):
        self.peak = self.peak_pss = 0

    def sample(self) -> None:
        me = psutil.Process()
        rss = pss = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                continue
            rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
        self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)


def bench_pipeline(cfg: Config, work_dir: str, arm: str = "bfd-isolated", bare: bool = True,
                   pack_workers: list[int] | None = None) -> dict:
    """Measure the pipeline and the bare tokenizer on the same shards; returns JSON-ready figures.

    cfg.synth says what to write (synth.task and its settings); the pipeline runs with cfg's
    settings (data.max_seq_len, pack.window, prepare.*) on those shards, for `arm` alone.
    """
    ensure_ray()
    work = Path(work_dir)
    preset, num_samples, seed, window = cfg.synth.preset, synth.num_rows(cfg.synth), cfg.synth.seed, cfg.pack.window
    paths = write_synth_shards(cfg.synth, cfg.data.tokenizer, work / "text")
    cfg = validate(replace(cfg, data=replace(cfg.data, sources=paths, format="messages", val_fraction=0.0),
                           pack=replace(cfg.pack, arms=[arm]),
                           prepare=replace(cfg.prepare, output_dir=str(work / "prepared"), reuse=False)))
    rss = _PeakRss()
    with every(1.0, rss.sample):
        start = time.perf_counter()
        folders = prepare(cfg)
        seconds = time.perf_counter() - start
    manifest = read_manifest(folders[arm])
    tokenized = json.loads((Path(folders[arm]).parent / "tokenized.json").read_text())
    # Tokens the tokenizer produced, before the over-length policy cut any: the work both sides do.
    bare = bare_tokenizer(paths, cfg.data.tokenizer) if bare else None
    pipeline_tps = (bare["num_tokens"] if bare else tokenized["num_tokens"]) / seconds
    return {
        "preset": preset, "num_samples": num_samples, "seed": seed, "arm": arm, "pack_window": window,
        "cpus": os.cpu_count(), "num_tokenizer_actors": cfg.prepare.num_tokenizer_actors,
        "pipeline_seconds": seconds, "tokenize_seconds": manifest.tokenize_seconds,
        "pack_seconds": manifest.seconds, "num_tokens": tokenized["num_tokens"],
        "pipeline_tokens_per_sec": pipeline_tps,
        "bare_tokenizer_tokens_per_sec": bare["tokens_per_sec"] if bare else None,
        "bare_tokenizer_tokens": bare["num_tokens"] if bare else None,
        "ratio_to_bare": pipeline_tps / bare["tokens_per_sec"] if bare else None,
        "num_rows": manifest.num_rows, "lower_bound_rows": manifest.lower_bound_rows,
        "rows_over_lower_bound": manifest.rows_over_lower_bound,
        "num_truncated": manifest.num_truncated, "peak_rss_sum_mb": rss.peak / 2**20,
        "peak_pss_sum_mb": rss.peak_pss / 2**20,
        "pack_workers": [bench_pack_workers(cfg, w, folders, arm) for w in pack_workers or []],
    }


def bench_pack_workers(cfg: Config, workers: int, folders: dict, arm: str, repeats: int = 2) -> dict:
    """The packing stage alone, on the tokenized cache already there, with `workers` tasks per split.

    Best of `repeats` runs: pack_seconds is the arm's manifest `seconds` (planning to
    flat/ written); prepare_seconds the whole call (reading the cache's keys for the
    hold-out, the empty val split, the manifests); sha256 covers every file but the
    manifests, to show the output does not change.
    """
    cfg = replace(cfg, prepare=replace(cfg.prepare, reuse=True, pack_workers=workers))
    pack_seconds, seconds = [], []
    for _ in range(repeats):
        for folder in folders.values():
            shutil.rmtree(folder)
        start = time.perf_counter()
        prepare(cfg)
        seconds.append(time.perf_counter() - start)
        pack_seconds.append(read_manifest(folders[arm]).seconds)
    digest = hashlib.sha256()
    for folder in folders.values():
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != "manifest.json"):
            digest.update(path.name.encode() + path.read_bytes())
    return {"pack_workers": workers, "pack_seconds": min(pack_seconds), "prepare_seconds": min(seconds),
            "num_shards": len(list(Path(folders[arm]).glob("*.parquet"))),
            "sha256": digest.hexdigest()}


def format_pipeline_result(r: dict) -> str:
    return "\n".join([
        f"{r['preset']} x {r['num_samples']:,} samples, {r['num_tokens']:,} tokens, arm {r['arm']}, "
        f"window {r['pack_window'] or 'all'}, {r['cpus']} CPUs, {r['num_tokenizer_actors']} tokenizer actors",
        f"pipeline end to end:  {r['pipeline_seconds']:.1f} s ({r['tokenize_seconds']:.1f} s tokenize pass, "
        f"{r['pack_seconds']:.1f} s pack), {r['pipeline_tokens_per_sec']:,.0f} tokens/s",
        (f"bare tokenizer:       {r['bare_tokenizer_tokens_per_sec']:,.0f} tokens/s over the same rendered texts "
         f"({r['bare_tokenizer_tokens']:,} tokens before truncation; the pipeline's tokens/s counts these too)\n"
         f"ratio pipeline/bare:  {r['ratio_to_bare']:.3f}") if r["ratio_to_bare"] is not None
        else "bare tokenizer:       not measured (--skip-bare); pipeline tokens/s counts tokens after truncation",
        f"rows {r['num_rows']:,} vs lower bound {r['lower_bound_rows']:,}: {r['rows_over_lower_bound']:.5f}x "
        f"({r['num_truncated']:,} samples truncated to max_seq_len)",
        f"peak memory summed over driver + Ray processes: PSS {r['peak_pss_sum_mb']:,.0f} MiB "
        f"(RSS {r['peak_rss_sum_mb']:,.0f} MiB, counting shared pages once per process)",
        *_pack_workers_lines(r["pack_workers"]),
    ])


def _pack_workers_lines(runs: list[dict]) -> list[str]:
    if not runs:
        return []
    same = len({run["sha256"] for run in runs}) == 1
    lines = [f"packing stage again on the same cache, best of 2, per prepare.pack_workers ({runs[0]['num_shards']} "
             f"shards to share; output identical: {same}):", "  pack_workers  pack seconds  prepare seconds"]
    return lines + [f"  {run['pack_workers']:>12}  {run['pack_seconds']:>12.1f}  {run['prepare_seconds']:>15.1f}"
                    for run in runs]
