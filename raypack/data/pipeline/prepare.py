"""`raypack prepare`: the four stages in order, each split's manifest, and where every output goes.

    read (raypack.data.pipeline.read: a task per file or synth block)
      -> tokenize (raypack.data.pipeline.cache: an actor pool) -> the tokenized cache, reused by every arm and
         every later run whose tokenization settings match (tok-<hash>/)
      -> hold out validation conversations by key (raypack.data.holdout; the same for every arm)
      -> group (raypack.data.pipeline.group; only when some arm has a pack.grouping)
      -> plan and pack every split at once (raypack.data.pipeline.pack: a planning task per split, then
         prepare.pack_workers packing tasks each) -> shards, flat/ and manifest.json per split

Input: a Config. Output: prepare() returns {"val": folder, arm: folder, ...}; each split is written into
`<name>-<hash>.partial` and renamed once its manifest is written, so a folder with a manifest.json is complete.
Layout under `prepare.output_dir` (by default `<output_dir>/prepared`):

    tok-<hash>/tokenized/*.parquet        one row per sample piece, rejected or dropped record
    tok-<hash>/tokenized.json             counts of the tokenization pass
    tok-<hash>/rejected/rejected.jsonl    every rejected row: source file, row, reason, detail
    tok-<hash>/groups-<hash>/             content vectors and clusters of grouped arms (or topics)
    tok-<hash>/val-<hash>/                held-out conversations, one sample per row: part-*.parquet,
                                          flat/ and manifest.json (raypack.data.prepared)
    tok-<hash>/<arm>-<hash>/              train rows of one arm, the same files (padfree: padding's
                                          rows and shards, its manifest saying strategy padfree,
                                          attention isolated)

Output is deterministic: the same input, config and seed give byte-identical shards, flat/ and manifest
(timings aside) whatever the number of tokenizer actors, their batch size or the number of packing tasks.

    raypack prepare jobs/quickstart.yaml [key=value ...]
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import ray

from raypack.config import ArmSpec, Config, DataConfig, PackConfig, arm_spec
from raypack.data.arm import COMPOSITION_KEYS
from raypack.data.holdout import held_out_keys
from raypack.data.pipeline.cache import CACHE_VERSION, cache_files, read_cache_index, tokenize_to_cache
from raypack.data.pipeline.group import build_groups
from raypack.data.pipeline.pack import pack_split, plan_split
from raypack.data.pipeline.read import Inputs, resolve_inputs
from raypack.data.prepared import MANIFEST_VERSION, Manifest, write_flat, write_manifest
from raypack.ray_start import ensure_ray


def config_hash(*parts) -> str:
    """12 hex digits of a hash of these settings: what names an output folder."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def groups_dir(pack: PackConfig, seed: int, tok_dir: Path) -> Path:
    """Where build_groups writes the content clusters for the pack section's grouping settings (topic groups
    depend on the tokenized cache alone)."""
    model = pack.embedding_model if pack.group_backend == "embedding" else None
    settings = config_hash(pack.group_backend, model, pack.feature_dim, pack.num_clusters, pack.kmeans_samples, seed)
    if pack.group_backend == "topic":
        settings = config_hash("topic")
    return tok_dir / f"groups-{settings}"


def tok_hash(cfg: Config, inputs: Inputs) -> str:
    d = cfg.data  # not d.overlength: the cache keeps every piece and each split applies its own policy
    return config_hash(inputs.fingerprint, d.format, d.strict, d.tokenizer, d.template, d.max_seq_len,
                        d.hf_split, CACHE_VERSION)


def holdout_keys(files: list[str], data: DataConfig, seed: int) -> np.ndarray:
    """The held-out conversations' keys (raypack.data.holdout.held_out_keys, as `raypack compare` draws them):
    from those data.overlength keeps, the same whatever the arms' policies."""
    table = read_cache_index(files, ["status", "num_supervised_tokens"])  # checks the order of a reused cache
    status = np.array(table.column("status").to_pylist(), dtype=object)
    return held_out_keys(table.column("key").to_numpy(), status, table.column("piece").to_numpy(),
                         table.column("num_supervised_tokens").to_numpy(), data.overlength, seed,
                         fraction=data.val_fraction, count=data.val_count)


class Job(NamedTuple):
    """One split prepare() writes: which samples, how they are packed, and its config hash."""

    select: str  # "val" or "train"
    spec: ArmSpec
    window: int
    groups: Path | None  # build_groups' folder, for packed arms when some arm is grouped
    hash: str
    folder: Path  # <tok_dir>/<name>-<hash>


def prepare_jobs(cfg: Config, inputs: Inputs) -> tuple[Path, dict[str, Job]]:
    """The tokenized cache folder and every split of cfg ("val" first, then each arm), by config hash only."""
    root = cfg.prepared_root()
    tok = tok_hash(cfg, inputs)
    tok_dir = root / f"tok-{tok}"
    # data.overlength chooses the conversations the validation split is drawn from (holdout_keys).
    split_hash = config_hash(tok, cfg.seed, cfg.data.val_fraction, cfg.data.val_count, cfg.data.overlength)
    # Each split's over-length policy is its arm's suffix, else data.overlength (the validation split's too).
    specs = {arm: replace(spec, overlength=spec.overlength or cfg.data.overlength)
             for arm, spec in ((arm, arm_spec(arm, cfg.pack)) for arm in cfg.pack.arms)}
    grouped = any(spec.grouping != "none" for spec in specs.values())
    groups = groups_dir(cfg.pack, cfg.seed, tok_dir) if grouped else None
    jobs = {"val": Job("val", ArmSpec("padding", None, overlength=cfg.data.overlength), 0, None, split_hash,
                        tok_dir / f"val-{split_hash}")}
    for arm, spec in specs.items():
        packed_groups = groups if spec.packer != "padding" else None
        arm_hash = config_hash(split_hash, spec.strategy, spec.attention, cfg.pack.window, cfg.train.micro_batch_size,
                                cfg.prepare.rows_per_shard, spec.grouping, spec.only_single_turn,
                                packed_groups and packed_groups.name, cfg.pack.group_buffer if spec.grouping != "none" else None,
                                spec.overlength)
        jobs[arm] = Job("train", spec, cfg.pack.window, packed_groups, arm_hash, tok_dir / f"{arm}-{arm_hash}")
    return tok_dir, jobs


def prepared_folders(cfg: Config) -> dict[str, Path]:
    """Where prepare() writes the validation split ("val") and each arm, computed from the config alone
    (no Ray, nothing read but the input files' size and mtime, or an hf: dataset's file list at its resolved
    revision); a split is ready once its manifest.json exists."""
    _, jobs = prepare_jobs(cfg, resolve_inputs(cfg.data, cfg.synth))
    return {name: job.folder for name, job in jobs.items()}


def prepare(cfg: Config) -> dict:
    """Prepare the validation split and every arm of cfg.pack.arms; returns {name: folder}.

    Outputs whose config hash matches are reused (prepare.reuse), so a sweep's trials
    never re-tokenize. The returned dict has "val" plus one entry per arm.
    """
    ensure_ray()
    inputs = resolve_inputs(cfg.data, cfg.synth)  # once: the hash and the read see the same revision of a dataset
    tok_dir, jobs = prepare_jobs(cfg, inputs)
    for note in inputs.notes:
        print(f"raypack prepare: {note}", flush=True)
    tok_dir.mkdir(parents=True, exist_ok=True)
    counts_path = tok_dir / "tokenized.json"
    start = time.perf_counter()
    if cfg.prepare.reuse and counts_path.exists():
        counts = json.loads(counts_path.read_text())
        print(f"raypack prepare: reusing tokenized data {tok_dir}", flush=True)
    else:
        counts = tokenize_to_cache(cfg, tok_dir, inputs)
    tokenize_seconds = time.perf_counter() - start
    files = cache_files(tok_dir / "tokenized")
    holdout = holdout_keys(files, cfg.data, cfg.seed)
    groups = next((job.groups for job in jobs.values() if job.groups), None)
    if groups:
        build_groups(cfg, files, groups)
    holdout_ref = ray.put(holdout)
    folders, pending = {name: job.folder for name, job in jobs.items()}, {}
    for name, (select, spec, window, packed_groups, job_hash, final) in jobs.items():
        if cfg.prepare.reuse and (final / "manifest.json").exists():
            write_flat(final)  # a split prepared before flat/ existed
            continue
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        pending[name] = (partial, job_hash, spec, window, plan_split.options(
            num_cpus=cfg.prepare.pack_num_cpus, num_returns=2).remote(
            files, holdout_ref, select, spec, window, cfg.pack.group_buffer,
            str(packed_groups) if packed_groups else None, cfg.data.max_seq_len,
            cfg.train.micro_batch_size, cfg.prepare.rows_per_shard, cfg.seed))
    # Every split plans at once; a split's packing tasks start as soon as its plan is known.
    for name, (partial, job_hash, spec, window, refs) in pending.items():
        stats, join_ref = pack_split(refs, jobs[name].select, spec, holdout_ref, cfg.prepare, partial)
        pending[name] = (partial, job_hash, spec, window, stats, join_ref)
    for name, (partial, job_hash, spec, window, stats, join_ref) in pending.items():
        joined = ray.get(join_ref)
        stats.update(num_supervised_tokens=joined["num_supervised_tokens"], seconds=joined["end"] - stats.pop("start"))
        manifest = _manifest(counts, stats, cfg.data.max_seq_len, cfg.train.micro_batch_size, spec, window,
                             job_hash, tokenize_seconds,
                             split="val" if name == "val" else "train", num_val_conversations=int(len(holdout)))
        _finish(partial, folders[name], manifest)
    return {name: str(path) for name, path in folders.items()}


def _finish(partial: Path, final: Path, manifest: Manifest) -> None:
    write_manifest(partial, manifest)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)


def _manifest(counts: dict, stats: dict, max_seq_len: int, micro_batch_size: int, spec: ArmSpec, window: int,
              job_hash: str, tokenize_seconds: float, split: str, num_val_conversations: int) -> Manifest:
    """manifest.json: the tokenization pass's counts (whole input; what the split's over-length policy made of
    it), this split's row counts and, for a train
    arm, what went into its packs (the record's COMPOSITION_KEYS: a key Manifest lacks is a TypeError here, so
    add the field)."""
    composition = {key: stats[key] for key in COMPOSITION_KEYS if key in stats} if split == "train" else {}
    return Manifest(
        version=MANIFEST_VERSION,
        **{key: counts[key] for key in ("num_input_rows", "num_rejected_rows", "rejected_reasons", "num_conversations")},
        **{key: counts["policies"][spec.overlength][key]
           for key in ("num_truncated", "num_split", "num_dropped_too_long", "num_dropped_no_supervised")},
        overlength=spec.overlength,
        num_val_conversations=num_val_conversations, split=split,
        **{key: stats[key] for key in ("num_samples", "num_split_samples", "num_rows", "num_tokens",
                                       "num_supervised_tokens", "num_capacity_tokens", "num_batch_tokens",
                                       "padding_fraction", "efficiency", "lower_bound_rows", "rows_over_lower_bound",
                                       "seconds")},
        max_seq_len=max_seq_len, micro_batch_size=micro_batch_size, strategy=spec.strategy,
        attention=None if spec.strategy == "padding" else spec.attention, pack_window=window, config_hash=job_hash,
        tokenize_seconds=tokenize_seconds, **composition)
