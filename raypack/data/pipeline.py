"""Ray Data pipeline: stream, tokenize and pack SFT datasets across CPU workers (`raypack prepare`).

The one module that imports ray.data. It only maps the pure core (formats,
tokenize, holdout, pack) over a cluster:

    read (a task per file: local, a URI or a Hugging Face dataset's data file fetched in the task; or per synth block)
      -> normalise + tokenize (an actor pool; the tokenizer loads once per actor)
      -> tokenized cache (Parquet, in input order, reused by every arm and every later run): a sample
         longer than max_seq_len is kept as all its max_seq_len pieces, so one cache serves every
         over-length policy (data.overlength, or an arm's +truncate/+split/+drop)
      -> hold out validation conversations by key (the same for every arm)
      -> per split, its over-length policy chooses the cache's rows (raypack.data.overlength)
      -> plan every window from lengths alone (a task per split: lengths, clusters, turn counts)
      -> pack in parallel (prepare.pack_workers tasks per split, each a contiguous run of
         the split's shards, reading only the samples its rows hold)
      -> packed Parquet shards, flat/ (joined from the tasks' parts) + manifest.json per split

Output is deterministic: Ray Data runs with `preserve_order`, the cache's keys
are checked to be in input order, and windows are cut by sample count, so the
same input, config and seed give byte-identical shards, flat/ and manifest
(timings aside) whatever the number of tokenizer actors or packing tasks.
Layout under `prepare.output_dir` (by default `<output_dir>/prepared`):

    tok-<hash>/tokenized/*.parquet        one row per sample piece, rejected or dropped record
    tok-<hash>/tokenized.json             counts of the tokenization pass
    tok-<hash>/rejected/rejected.jsonl    every rejected row: source file, row, reason, detail
    tok-<hash>/val-<hash>/                held-out conversations, one sample per row: part-*.parquet,
                                          flat/ and manifest.json (raypack.data.prepared)
    tok-<hash>/<arm>-<hash>/              train rows of one arm, the same files (padfree: padding's
                                          rows and shards, its manifest saying strategy padfree,
                                          attention isolated)

    raypack prepare jobs/quickstart.yaml [key=value ...]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from raypack.config import OVERLENGTH_POLICIES, ArmSpec, Config, DataConfig, PackConfig, PrepareConfig, SynthConfig, arm_spec
from raypack.data import features, formats, hub, synth
from raypack.data.arm import COMPOSITION_KEYS, ContentGroups, plan_arm
from raypack.data.holdout import holdout_mask
from raypack.data.local import expand_sources
from raypack.data.pack import PackPlan, pack_rows, row_supervised_tokens
from raypack.data.prepared import (FLAT_DIR, MANIFEST_VERSION, Manifest, ShardConverter, first_fitting, join_flat,
                                   publish_flat, shard_files, write_flat, write_manifest)
from raypack.data.overlength import LONG, kept_rows, policy_counts
from raypack.data.tokenize import IGNORE_INDEX, tokenize_pieces
from raypack.model import load_tokenizer
from raypack.ray_start import ensure_ray

KEY_ROW_BITS = 40  # key = file index << 40 | row number: input order, unique per record
STATUS_REJECTED = "rejected"
TOKENIZED_SCHEMA = pa.schema([
    ("key", pa.int64()), ("piece", pa.int32()), ("status", pa.string()), ("reason", pa.string()),
    ("detail", pa.string()), ("source", pa.string()), ("num_tokens", pa.int32()),
    ("num_supervised_tokens", pa.int32()), ("num_turns", pa.int32()), ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
])
CACHE_VERSION = 3  # 2: num_turns (assistant messages of the sample's conversation); 3: every piece of a long
# conversation, the over-length policy applied per split (raypack.data.overlength)
RAW_COLUMNS = ("key", "source", "raw", "fmt", "reason", "detail")


def _config_hash(*parts) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


class Inputs(NamedTuple):
    """The input files, resolved once on the driver: what the read tasks open, and what identifies them."""

    paths: list[str]  # one read task each, in input order (the file index of the keys): local paths, URIs, and
    # hf://datasets/ORG/NAME@REVISION/PATH for a Hugging Face dataset's data files (raypack.data.hub)
    fingerprint: list  # for the tokenized cache's hash: files with size and mtime, a dataset's pinned revision
    notes: tuple[str, ...] = ()  # what prepare prints: a dataset's files of the split that are not read


def resolve_inputs(data: DataConfig, synth_cfg: SynthConfig) -> Inputs:
    """Every source in order: files, globs and folders expanded, an hf: dataset listed at a pinned revision (only
    its file list and card are fetched here); with no sources, the synth settings identify the input."""
    if not data.sources:  # what the samples are made of; where `raypack synth` writes them is not
        return Inputs([], ["synth", {k: v for k, v in asdict(synth_cfg).items() if k != "out"}])
    paths, fingerprint, notes = [], [], []
    for src in data.sources:
        if src.startswith("hf:"):
            files = hub.resolve(src, data.hf_split, _hf_root(data))
            if files.skipped:
                notes.append(f"{src} split {data.hf_split}: not reading {len(files.skipped)} files that are not "
                             f"{'/'.join(formats.EXTENSIONS)}: {', '.join(files.skipped[:5])}")
            paths += files.uris
            fingerprint.append(files.fingerprint)
        elif "://" in src:
            paths.append(src)
            fingerprint.append([src])
        else:
            for path in expand_sources([src]):
                stat = os.stat(path)
                paths.append(path)
                fingerprint.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return Inputs(paths, fingerprint, tuple(notes))


def _hf_root(data: DataConfig) -> str:
    return os.path.abspath(data.hf_root) if data.hf_root else ""  # read tasks may run in another directory


# ---------------------------------------------------------------- read


def _raw_row(key: int, source: str, value, fmt: str) -> dict:
    if isinstance(value, formats.RowError):
        return {"key": key, "source": source, "raw": "", "fmt": fmt, "reason": value.reason, "detail": value.detail}
    return {"key": key, "source": source, "raw": json.dumps(value, ensure_ascii=False), "fmt": fmt,
            "reason": "", "detail": ""}


def _local_copy(path: str, tmp: str, hf_root: str) -> str:
    """Remote files (s3://, gs://, ...) are copied to the worker's disk, a Hugging Face dataset's file fetched into
    the node's hub cache (or found under data.hf_root), then read like local ones."""
    if path.startswith(hub.URI_PREFIX):
        return hub.fetch(path, hf_root)
    if "://" not in path:
        return path
    from pyarrow import fs as pafs

    filesystem, remote = pafs.FileSystem.from_uri(path)
    local = os.path.join(tmp, os.path.basename(remote))
    with filesystem.open_input_stream(remote) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return local


READ_CHUNK_ROWS = 1024
RAW_SCHEMA = pa.schema([("key", pa.int64()), ("source", pa.string()), ("raw", pa.string()), ("fmt", pa.string()),
                        ("reason", pa.string()), ("detail", pa.string())])


def _read_files(batch: dict, fmt: str, hf_root: str):
    """Stream every record of each file, in order, as JSON text with its key; bad rows keep their reason.

    A generator, so a large file leaves in chunks of READ_CHUNK_ROWS rows instead of
    being held whole in one worker.
    """
    for path, index in zip(batch["path"], batch["file_index"]):
        rows, file_fmt = [], None if fmt == "auto" else fmt
        with tempfile.TemporaryDirectory() as tmp:
            for row_num, value in formats.iter_raw_rows(_local_copy(str(path), tmp, hf_root)):
                if file_fmt is None and isinstance(value, dict):
                    try:
                        file_fmt = formats.detect_format(value)
                    except formats.FormatError as err:
                        raise formats.FormatError(f"{path}:{row_num}: {err}; or set data.format") from err
                rows.append(_raw_row((int(index) << KEY_ROW_BITS) | row_num, f"{path}:{row_num}", value,
                                     file_fmt or ""))
                if len(rows) == READ_CHUNK_ROWS:
                    yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
                    rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def _synth_rows(batch: dict, preset: str, seed: int, num_samples: int):
    for block in batch["id"]:
        first = int(block) * synth.BLOCK_SIZE
        rows = synth.synth_block(preset, seed, int(block), min(synth.BLOCK_SIZE, num_samples - first))
        yield pa.Table.from_pylist([_raw_row(first + i + 1, f"synth:{preset}:{first + i + 1}", row, "messages")
                                    for i, row in enumerate(rows)], schema=RAW_SCHEMA)


def read_sources(cfg: Config, inputs: Inputs | None = None) -> ray.data.Dataset:
    """One row per input record: key (input order), source, raw JSON, format, and a read error if any.

    One read task per file (a Hugging Face dataset's data files too: each is fetched inside its task, never on the
    driver); `inputs` are resolve_inputs(cfg.data, cfg.synth), resolved here if not given."""
    data = cfg.data
    if not data.sources:
        n = cfg.synth.num_samples
        num_blocks = -(-n // synth.BLOCK_SIZE)
        return ray.data.range(num_blocks, override_num_blocks=num_blocks).map_batches(
            _synth_rows, batch_size=1, fn_kwargs={"preset": cfg.synth.preset, "seed": cfg.synth.seed,
                                                  "num_samples": n}, num_cpus=cfg.prepare.read_num_cpus)
    paths = (inputs or resolve_inputs(data, cfg.synth)).paths
    items = [{"file_index": i, "path": p} for i, p in enumerate(paths)]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_files, batch_size=1, fn_kwargs={"fmt": data.format, "hf_root": _hf_root(data)},
        num_cpus=cfg.prepare.read_num_cpus)


# ---------------------------------------------------------------- tokenize


def _list_column(arrays: list[np.ndarray]) -> pa.ListArray:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


class TokenizeBatch:
    """Ray Data actor: normalise and tokenize a batch of records (every piece of a long one: tokenize_pieces)."""

    def __init__(self, data_cfg: dict):
        self.data = data_cfg
        self.tokenizer = load_tokenizer(data_cfg["tokenizer"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = batch.select(list(RAW_COLUMNS)).to_pylist()
        rows_of: list[list[dict]] = [[] for _ in records]  # output rows per record, in input order
        conversations, conv_record = [], []
        for i, rec in enumerate(records):
            reason, detail = rec["reason"], rec["detail"]
            if not reason:
                try:
                    conversations.append(formats.normalise_row(json.loads(rec["raw"]), rec["fmt"], rec["source"]))
                    conv_record.append(i)
                    continue
                except formats.RowError as err:
                    reason, detail = err.reason, err.detail
            if self.data["strict"]:
                raise formats.FormatError(f"{rec['source']}: {reason}: {detail}")
            rows_of[i].append(self._row(rec, 0, STATUS_REJECTED, reason, detail))
        result = tokenize_pieces(conversations, self.tokenizer, self.data["max_seq_len"],
                                 template=self.data["template"])
        for sample in result.samples:
            i = conv_record[sample["conversation"]]
            turns = formats.num_assistant_turns(conversations[sample["conversation"]])
            rows_of[i].append(self._row(records[i], sample["piece"], result.outcomes[sample["conversation"]],
                                        "", "", sample, turns))
        for conv_index, outcome in enumerate(result.outcomes):
            i = conv_record[conv_index]
            if not rows_of[i]:  # dropped: one row records the outcome so the counts reconcile
                rows_of[i].append(self._row(records[i], 0, outcome, "", ""))
        return self._table([row for rows in rows_of for row in rows])

    @staticmethod
    def _row(rec: dict, piece: int, status: str, reason: str, detail: str, sample: dict | None = None,
             num_turns: int = 0) -> dict:
        empty = np.zeros(0, dtype=np.int32)
        ids = sample["input_ids"] if sample else empty
        labels = sample["labels"] if sample else empty
        return {"key": rec["key"], "piece": piece, "status": status, "reason": reason, "detail": detail,
                "source": rec["source"], "num_turns": num_turns, "input_ids": ids, "labels": labels}

    @staticmethod
    def _table(rows: list[dict]) -> pa.Table:
        ids = [r["input_ids"] for r in rows]
        labels = [r["labels"] for r in rows]
        columns = {name: [r[name] for r in rows]
                   for name in ("key", "piece", "status", "reason", "detail", "source", "num_turns")}
        columns["num_tokens"] = [len(a) for a in ids]
        columns["num_supervised_tokens"] = [int(np.count_nonzero(a != IGNORE_INDEX)) for a in labels]
        arrays = [pa.array(columns[f.name], f.type) for f in TOKENIZED_SCHEMA if f.name in columns]
        return pa.Table.from_arrays(arrays + [_list_column(ids), _list_column(labels)], schema=TOKENIZED_SCHEMA)


def _user_error(err: BaseException) -> formats.FormatError | None:
    """The FormatError (a bad file, or a bad row in strict mode) behind a Ray task failure, if any.

    Ray re-raises a worker's exception as a RayTaskError whose text carries the
    original traceback; the original object is not always kept, so read the text.
    """
    marker = f"{formats.FormatError.__module__}.FormatError: "
    for line in reversed(str(err).splitlines()):
        if line.startswith(marker):
            return formats.FormatError(line[len(marker):])
    return None


_sorted_parquet_files = shard_files


def tokenize_to_cache(cfg: Config, tok_dir: Path, inputs: Inputs | None = None) -> dict:
    """Run read -> tokenize on Ray Data into tok_dir/tokenized; returns the pass's counts."""
    prep: PrepareConfig = cfg.prepare
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the cache must be in input order
    # Small blocks, so every tokenizer actor gets work even when the input is one big file.
    ctx.target_max_block_size = prep.block_mb * 2**20
    ds = read_sources(cfg, inputs).map_batches(
        TokenizeBatch, batch_format="pyarrow", batch_size=prep.tokenize_batch_size,
        compute=ray.data.ActorPoolStrategy(size=prep.num_tokenizer_actors), num_cpus=prep.actor_num_cpus,
        fn_constructor_kwargs={"data_cfg": asdict(cfg.data)})
    staging = tok_dir / "tokenized.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        ds.write_parquet(str(staging), ray_remote_args={"num_cpus": prep.write_num_cpus})
    except Exception as err:  # Ray wraps a worker's exception; surface ours as itself
        raise _user_error(err) or err
    counts = summarise_tokenized(_sorted_parquet_files(staging))
    _write_rejected(_sorted_parquet_files(staging), tok_dir / "rejected" / "rejected.jsonl")
    shutil.rmtree(tok_dir / "tokenized", ignore_errors=True)
    staging.rename(tok_dir / "tokenized")
    (tok_dir / "tokenized.json").write_text(json.dumps(counts, indent=2))
    return counts


def summarise_tokenized(files: list[str]) -> dict:
    """Counts of the tokenization pass, from the cache's small columns; checks the input order.

    `num_long`: conversations longer than max_seq_len (kept as all their pieces); `num_tokens`: every token the
    tokenizer produced; `policies`: what each over-length policy makes of the input (raypack.data.overlength).
    """
    table = pq.read_table(files, columns=["key", "piece", "status", "reason", "num_tokens",
                                          "num_supervised_tokens"]) if files else TOKENIZED_SCHEMA.empty_table()
    key = table.column("key").to_numpy()
    piece = table.column("piece").to_numpy()
    order_ok = np.all((np.diff(key) > 0) | ((np.diff(key) == 0) & (np.diff(piece) == 1)))
    if not order_ok:
        raise RuntimeError("tokenized cache is not in input order; Ray Data did not preserve order "
                           "(please report this with your Ray version)")
    status = np.array(table.column("status").to_pylist(), dtype=object)
    first = piece == 0
    reasons = [r for r, s in zip(table.column("reason").to_pylist(), status) if s == STATUS_REJECTED]
    num_tokens, num_supervised = (table.column(c).to_numpy() for c in ("num_tokens", "num_supervised_tokens"))
    return {
        "num_input_rows": int(first.sum()),
        "num_rejected_rows": int((status == STATUS_REJECTED).sum()),
        "rejected_reasons": {r: reasons.count(r) for r in formats.REJECT_REASONS},
        "num_conversations": int((first & (status != STATUS_REJECTED)).sum()),
        "num_long": int((first & (status == LONG)).sum()),
        "num_tokens": int(num_tokens.sum()),
        "policies": {policy: policy_counts(key, status, piece, num_tokens, num_supervised, policy)
                     for policy in OVERLENGTH_POLICIES},
    }
def _write_rejected(files: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for path in files:
            table = pq.read_table(path, columns=["status", "source", "reason", "detail"])
            for row in table.filter(pa.compute.equal(table["status"], STATUS_REJECTED)).to_pylist():
                source, _, row_num = row["source"].rpartition(":")
                f.write(json.dumps({"source": source, "row": int(row_num), "reason": row["reason"],
                                    "detail": row["detail"]}) + "\n")


# ---------------------------------------------------------------- hold out and pack
#
# A split is packed in three steps, its output the same whatever the number of tasks:
#   plan_split   one task: reads lengths (+ turn counts, clusters) only and plans the split
#                (raypack.data.arm.plan_arm: a plan per buffer and the split's stats record);
#   pack_shards  prepare.pack_workers tasks, each a contiguous run of the split's shards
#                (whole buffers, or rows of one buffer's plan): reads only the samples its
#                rows hold, materialises the rows, writes the shards and a flat/ part;
#   join_flat_parts  one task: joins the parts into flat/.


def _kept(table, overlength: str) -> np.ndarray:
    """Which rows of a cache table or batch are samples under the over-length policy."""
    status = np.array(table.column("status").to_pylist(), dtype=object)
    return kept_rows(status, table.column("piece").to_numpy(), table.column("num_supervised_tokens").to_numpy(),
                     overlength)


def _candidates(table) -> np.ndarray:
    """Rows some policy may keep (every row that fits, every long piece with a target): what the content groups
    cover, so that one grouping serves every arm."""
    return _kept(table, "split")


def _chosen(batch, holdout_keys: np.ndarray, select: str, overlength: str) -> tuple[np.ndarray, np.ndarray]:
    """Which rows of a cache batch are candidates, and which of those are samples of the train or val split."""
    held = np.isin(batch.column("key").to_numpy(), holdout_keys)
    return _candidates(batch), _kept(batch, overlength) & (held if select == "val" else ~held)


def _row_group_batches(row_groups: list[tuple[str, int]], columns: list[str]):
    """((path, row group), an iterator over its batches) for each of these row groups of the cache, in order."""
    pf, opened = None, None
    for path, group in row_groups:
        if path != opened:
            pf, opened = pq.ParquetFile(path), path
        yield (path, group), pf.iter_batches(batch_size=2048, row_groups=[group], columns=columns)


class _SplitPlan(NamedTuple):
    """What plan_split hands to the packing tasks: every buffer's plan and where its samples are."""

    plans: list[PackPlan]  # one per buffer; piece_sample indexes the buffer's samples
    buffer_starts: np.ndarray  # split ordinal (kept samples of this split, in cache order) of each buffer's first sample
    row_groups: list[tuple[str, int, int, int]]  # (file, row group, first split ordinal, split samples in it)


class _Shard(NamedTuple):
    """One Parquet shard: rows lo:hi of buffer `buffer`'s plan, written as part-{buffer}-{chunk}."""

    buffer: int
    chunk: int
    lo: int
    hi: int
    first_row: int  # global row_index of its first row
    num_tokens: int


def _read_lengths(files: list[str], holdout_keys: np.ndarray, select: str, overlength: str) -> dict:
    """The split's kept samples in cache order, from the cache's small columns: no tokens are read."""
    columns = ["key", "piece", "status", "num_tokens", "num_supervised_tokens", "num_turns"]
    groups = [(path, g) for path in files for g in range(pq.ParquetFile(path).num_row_groups)]
    parts, row_groups, kept_base, ordinal = [], [], 0, 0
    for (path, group), batches in _row_group_batches(groups, columns):
        first = ordinal
        for batch in batches:
            kept, chosen = _chosen(batch, holdout_keys, select, overlength)
            kept_index = kept_base + np.cumsum(kept) - 1
            kept_base += int(kept.sum())
            parts.append({"key": batch.column("key").to_numpy()[chosen],
                          "piece": batch.column("piece").to_numpy()[chosen],
                          "length": batch.column("num_tokens").to_numpy()[chosen].astype(np.int64),
                          "turns": batch.column("num_turns").to_numpy()[chosen], "kept_index": kept_index[chosen]})
            ordinal += int(chosen.sum())
        if ordinal > first:
            row_groups.append((path, group, first, ordinal - first))
    out = {name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0, np.int64)
           for name in ("key", "piece", "length", "turns", "kept_index")}
    out["row_groups"] = row_groups
    return out


@ray.remote
def plan_split(files: list[str], holdout_keys: np.ndarray, select: str, spec: ArmSpec, window: int,
               group_buffer: int, groups_dir: str | None, max_seq_len: int, micro_batch_size: int,
               rows_per_shard: int, seed: int) -> tuple[dict, _SplitPlan]:
    """Plan the split from lengths alone (raypack.data.arm.plan_arm); returns (its stats record and shards,
    the plans).

    A buffer is `window` samples (all when 0); a grouped arm buffers `group_buffer`
    samples (all when 0), orders them by cluster and packs each cluster in windows.
    Call with num_returns=2: the driver reads the stats, the packing tasks the plans.
    """
    start = time.time()
    split = _read_lengths(files, holdout_keys, select, spec.overlength)
    groups = None
    if groups_dir:
        loaded = load_groups(groups_dir)
        kept_index = split["kept_index"]
        if not (np.array_equal(loaded["keys"][kept_index], split["key"])
                and np.array_equal(loaded["pieces"][kept_index], split["piece"])):
            raise RuntimeError("grouping stage output is not aligned with the tokenized cache; prepare again "
                               "with prepare.reuse=false")
        groups = ContentGroups(loaded["clusters"][kept_index], loaded["vectors"][kept_index], loaded["num_clusters"],
                               loaded["backend"])
    arm = plan_arm(split["length"], spec, max_seq_len=max_seq_len, window=window, group_buffer=group_buffer,
                   micro_batch_size=micro_batch_size, seed=seed, turns=split["turns"], groups=groups)
    shards, num_rows = [], 0
    for b, plan in enumerate(arm.plans):
        lens = plan.row_lengths()
        for c, r in enumerate(range(0, plan.num_rows, rows_per_shard)):
            r_hi = min(r + rows_per_shard, plan.num_rows)
            shards.append(_Shard(b, c, r, r_hi, num_rows + r, int(lens[r:r_hi].sum())))
        num_rows += plan.num_rows
    return {**arm.stats, "shards": shards, "start": start}, _SplitPlan(arm.plans, arm.buffer_starts,
                                                                       split["row_groups"])


def _shard_plan(plan: PackPlan, lo: int, hi: int) -> PackPlan:
    """Rows lo:hi of a plan (piece_sample still indexes the plan's samples)."""
    p_lo, p_hi = plan.row_offsets[lo], plan.row_offsets[hi]
    return PackPlan(plan.piece_sample[p_lo:p_hi], plan.piece_start[p_lo:p_hi], plan.piece_end[p_lo:p_hi],
                    plan.row_offsets[lo:hi + 1] - p_lo)


def _read_samples(split: _SplitPlan, holdout_keys: np.ndarray, select: str, overlength: str, needed: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Keys, pieces and tokens (copies) of the split's samples at the sorted ordinals `needed`.

    Row groups holding none of them are skipped; nothing else of the split is kept.
    """
    keys, pieces = np.zeros(len(needed), np.int64), np.zeros(len(needed), np.int32)
    tokens: list[dict] = [{} for _ in needed]
    wanted = [(path, group, first) for path, group, first, count in split.row_groups
              if np.searchsorted(needed, first) < np.searchsorted(needed, first + count)]
    firsts = {(path, group): first for path, group, first in wanted}
    columns = ["key", "piece", "status", "num_supervised_tokens", "input_ids", "labels"]
    for (path, group), batches in _row_group_batches([(p, g) for p, g, _ in wanted], columns):
        ordinal = firsts[(path, group)]
        for batch in batches:
            _, chosen = _chosen(batch, holdout_keys, select, overlength)
            rows = np.flatnonzero(chosen)
            ordinals = ordinal + np.arange(len(rows))
            ordinal += len(rows)
            slot = np.searchsorted(needed, ordinals)
            hit = slot < len(needed)
            hit[hit] = needed[slot[hit]] == ordinals[hit]
            if not hit.any():
                continue
            ids_col, lab_col = batch.column("input_ids"), batch.column("labels")
            offsets = ids_col.offsets.to_numpy()
            ids_values = ids_col.values.to_numpy(zero_copy_only=False)
            lab_values = lab_col.values.to_numpy(zero_copy_only=False)
            batch_keys, batch_pieces = batch.column("key").to_numpy(), batch.column("piece").to_numpy()
            for i, s in zip(rows[hit], slot[hit]):
                lo, hi = offsets[i], offsets[i + 1]
                keys[s], pieces[s] = batch_keys[i], batch_pieces[i]
                tokens[s] = {"input_ids": ids_values[lo:hi].copy(), "labels": lab_values[lo:hi].copy()}
    if not all(tokens):
        raise RuntimeError(f"{sum(not t for t in tokens)} planned samples were not found in the tokenized cache; "
                           "prepare again with prepare.reuse=false")
    return keys, pieces, tokens


@ray.remote
def pack_shards(split: _SplitPlan, shards: list[_Shard], holdout_keys: np.ndarray, select: str, overlength: str,
                attention: str, out: str, part: str) -> dict:
    """Materialise and write these consecutive shards of a split, and their rows as a flat/ part.

    Holds only the samples its rows hold. Returns the rows' supervised tokens and the
    position rules they follow (join_flat_parts picks one for the whole split).
    """
    needed = np.unique(np.concatenate(
        [split.buffer_starts[s.buffer] + _shard_plan(split.plans[s.buffer], s.lo, s.hi).piece_sample
         for s in shards]))
    keys, pieces, tokens = _read_samples(split, holdout_keys, select, overlength, needed)
    converter = ShardConverter(part, first_row=shards[0].first_row)
    num_supervised = 0
    for s in shards:
        plan = _shard_plan(split.plans[s.buffer], s.lo, s.hi)
        local = np.searchsorted(needed, split.buffer_starts[s.buffer] + plan.piece_sample)
        used, piece_sample = np.unique(local, return_inverse=True)
        rows = pack_rows(PackPlan(piece_sample.astype(np.int64), plan.piece_start, plan.piece_end, plan.row_offsets),
                         [tokens[i] for i in used], attention)
        supervised = row_supervised_tokens(rows)
        table = _rows_table(rows, supervised, keys[local], pieces[local], plan.row_offsets, s.first_row)
        path = Path(out) / f"part-{s.buffer:05d}-{s.chunk:03d}.parquet"
        pq.write_table(table, path)
        converter.add(table, path)
        num_supervised += int(supervised.sum())
    fits = converter.close(out)  # a part that follows no rule fails here, as its split would as a whole
    return {"num_supervised_tokens": num_supervised, "fits": fits}


@ray.remote
def join_flat_parts(out: str, parts: list[str], *results: dict) -> dict:
    """flat/ of the split from the packing tasks' parts (in row order); returns the totals and the end time."""
    positions = first_fitting([r["fits"] for r in results], out)
    publish_flat(Path(out) / FLAT_DIR, lambda tmp: join_flat(parts, tmp, positions))
    if parts:
        shutil.rmtree(Path(parts[0]).parent)
    return {"num_supervised_tokens": sum(r["num_supervised_tokens"] for r in results), "end": time.time()}


def _runs(num_tokens: list[int], num: int) -> list[tuple[int, int]]:
    """At most `num` contiguous, non-empty runs of shards with about the same tokens each."""
    if not num_tokens:
        return []
    cum = np.cumsum(num_tokens)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, num) / num) + 1
    bounds = np.unique(np.concatenate([[0], np.minimum(cuts, len(cum)), [len(cum)]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _pack_split(refs, select: str, spec: ArmSpec, holdout_ref, prep: PrepareConfig, out: Path) -> tuple[dict, object]:
    """Start a planned split's packing tasks (prep.pack_workers runs of shards) and the join after them.

    `refs` are plan_split's two results; returns the split's stats and the join's ref.
    """
    stats_ref, plan_ref = refs
    stats = ray.get(stats_ref)
    shards = stats.pop("shards")
    parts, results = [], []
    for i, (lo, hi) in enumerate(_runs([s.num_tokens for s in shards], prep.pack_workers)):
        parts.append(str(out / ".flat-parts" / f"{i:03d}"))
        results.append(pack_shards.options(num_cpus=prep.pack_num_cpus).remote(
            plan_ref, shards[lo:hi], holdout_ref, select, spec.overlength, spec.attention or "isolated", str(out),
            parts[-1]))
    return stats, join_flat_parts.options(num_cpus=prep.pack_num_cpus).remote(str(out), parts, *results)


def _rows_table(rows: list[dict], supervised: np.ndarray, sample_keys: np.ndarray, sample_pieces: np.ndarray,
                row_offsets: np.ndarray, first_row: int) -> pa.Table:
    n = len(rows)
    offsets = pa.array(row_offsets.astype(np.int32))
    return pa.table({
        "row_index": pa.array(np.arange(first_row, first_row + n, dtype=np.int64)),
        "input_ids": _list_column([r["input_ids"] for r in rows]),
        "labels": _list_column([r["labels"] for r in rows]),
        "position_ids": _list_column([r["position_ids"] for r in rows]),
        "seq_lens": _list_column([r["seq_lens"] for r in rows]),
        "sample_keys": pa.ListArray.from_arrays(offsets, pa.array(sample_keys.astype(np.int64))),
        "sample_pieces": pa.ListArray.from_arrays(offsets, pa.array(sample_pieces.astype(np.int32))),
        "num_tokens": pa.array([len(r["input_ids"]) for r in rows], pa.int32()),
        "num_supervised_tokens": pa.array(supervised.astype(np.int32)),
    })


def _finish(partial: Path, final: Path, manifest: Manifest) -> None:
    write_manifest(partial, manifest)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)


# ---------------------------------------------------------------- group (content clusters for pack.grouping)


def _kept_token_lists(batch: pa.Table) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Keys, pieces and token ids of the batch's candidate samples (both splits, any policy: _candidates)."""
    batch = batch.filter(pa.array(_candidates(batch)))
    ids = batch.column("input_ids").combine_chunks()
    offsets, values = ids.offsets.to_numpy(), ids.values.to_numpy(zero_copy_only=False)
    samples = [values[offsets[i]:offsets[i + 1]] for i in range(len(batch))]
    return batch.column("key").to_numpy(), batch.column("piece").to_numpy(), samples


def _vector_table(keys: np.ndarray, pieces: np.ndarray, vectors: np.ndarray) -> pa.Table:
    flat = pa.array(vectors.astype(np.float16).reshape(-1))
    return pa.table({"key": pa.array(keys, pa.int64()), "piece": pa.array(pieces, pa.int32()),
                     "vector": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})


def _df_batch(batch: pa.Table, num_buckets: int) -> pa.Table:
    _, _, samples = _kept_token_lists(batch)
    df = features.document_frequency(samples, num_buckets).astype(np.int32)
    return pa.table({"num_docs": pa.array([len(samples)], pa.int64()),
                     "df": pa.FixedSizeListArray.from_arrays(pa.array(df), num_buckets)})


def _tfidf_batch(batch: pa.Table, df: np.ndarray, num_docs: int, dim: int, seed: int) -> pa.Table:
    keys, pieces, samples = _kept_token_lists(batch)
    return _vector_table(keys, pieces, features.tfidf_vectors(samples, df, num_docs, dim=dim, seed=seed))


class EmbedBatch:
    """Ray Data actor: sentence embeddings of the samples' decoded text (pack.group_backend=embedding)."""

    def __init__(self, model: str, tokenizer: str, device: str):
        from raypack.model import load_sentence_encoder  # torch, only in these actors

        self.tokenizer = load_tokenizer(tokenizer)
        self.encoder = load_sentence_encoder(model, device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys, pieces, samples = _kept_token_lists(batch)
        texts = self.tokenizer.batch_decode([s.tolist() for s in samples], skip_special_tokens=True)
        vectors = self.encoder.encode(texts, normalize_embeddings=True, batch_size=64, show_progress_bar=False)
        return _vector_table(keys, pieces, np.asarray(vectors, dtype=np.float32).reshape(len(samples), -1))


def _assign_batch(batch: pa.Table, centroids: np.ndarray) -> pa.Table:
    vectors = _vectors_of(batch)
    return pa.table({"key": batch.column("key"), "piece": batch.column("piece"),
                     "cluster": pa.array(features.assign_clusters(vectors, centroids), pa.int32())})


def _vectors_of(table: pa.Table) -> np.ndarray:
    column = table.column("vector").combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(table), column.type.list_size)


@ray.remote
def _fit_centroids(vector_files: list[str], k: int, max_samples: int, seed: int) -> np.ndarray:
    """k-means centroids fitted on at most max_samples evenly spaced vectors."""
    vectors = _vectors_of(pq.read_table(vector_files, columns=["vector"])).astype(np.float32)
    return features.fit_kmeans(vectors, k, seed=seed, max_samples=max_samples)


def _groups_dir(pack: PackConfig, seed: int, tok_dir: Path) -> Path:
    """Where build_groups writes the content clusters for the pack section's grouping settings."""
    model = pack.embedding_model if pack.group_backend == "embedding" else None
    settings = _config_hash(pack.group_backend, model, pack.feature_dim, pack.num_clusters, pack.kmeans_samples, seed)
    return tok_dir / f"groups-{settings}"


def build_groups(cfg: Config, tok_dir: Path, files: list[str]) -> Path:
    """Content vectors and k-means clusters of every kept sample, as Ray Data stages; reused when present.

    tok-<hash>/groups-<hash>/vectors/*.parquet (key, piece, vector in float16) and
    clusters.npz (keys, pieces, clusters in candidate-sample order), plus groups.json.
    """
    pack, prep = cfg.pack, cfg.prepare
    model = pack.embedding_model if pack.group_backend == "embedding" else None
    out = _groups_dir(pack, cfg.seed, tok_dir)
    if prep.reuse and (out / "groups.json").exists():
        return out
    start = time.perf_counter()
    print(f"raypack prepare: grouping samples by content ({pack.group_backend})", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    columns = ["key", "piece", "status", "num_supervised_tokens", "input_ids"]
    ds = ray.data.read_parquet(files).select_columns(columns)
    if pack.group_backend == "tfidf":
        num_buckets = features.NUM_BUCKETS
        df, num_docs = np.zeros(num_buckets, np.int64), 0
        for batch in ds.map_batches(_df_batch, batch_format="pyarrow", batch_size=prep.tokenize_batch_size * 8,
                                    fn_kwargs={"num_buckets": num_buckets},
                                    num_cpus=prep.read_num_cpus).iter_batches(batch_format="pyarrow"):
            num_docs += int(pa.compute.sum(batch.column("num_docs")).as_py() or 0)
            df += batch.column("df").combine_chunks().values.to_numpy().reshape(len(batch), -1).sum(axis=0)
        vectors = ds.map_batches(_tfidf_batch, batch_format="pyarrow", batch_size=prep.tokenize_batch_size * 4,
                                 fn_kwargs={"df": df, "num_docs": num_docs, "dim": pack.feature_dim, "seed": cfg.seed},
                                 num_cpus=prep.read_num_cpus)
    else:
        vectors = ds.map_batches(
            EmbedBatch, batch_format="pyarrow", batch_size=prep.tokenize_batch_size,
            compute=ray.data.ActorPoolStrategy(size=prep.num_tokenizer_actors), num_cpus=prep.actor_num_cpus,
            num_gpus=prep.embed_num_gpus,
            fn_constructor_kwargs={"model": model, "tokenizer": cfg.data.tokenizer,
                                   "device": "cuda" if prep.embed_num_gpus else "cpu"})
    vectors.write_parquet(str(out / "vectors"), ray_remote_args={"num_cpus": prep.write_num_cpus})
    vector_files = _sorted_parquet_files(out / "vectors")
    num_samples = sum(pq.ParquetFile(f).metadata.num_rows for f in vector_files)
    k = features.resolve_num_clusters(pack.num_clusters, num_samples)
    centroids = ray.get(_fit_centroids.options(num_cpus=prep.pack_num_cpus).remote(
        vector_files, k, pack.kmeans_samples, cfg.seed))
    assigned = pa.concat_tables(ray.data.read_parquet(vector_files).map_batches(
        _assign_batch, batch_format="pyarrow", fn_kwargs={"centroids": centroids},
        num_cpus=prep.read_num_cpus).iter_batches(batch_format="pyarrow"))
    clusters = assigned.column("cluster").to_numpy()
    np.savez(out / "clusters.npz", keys=assigned.column("key").to_numpy(),
             pieces=assigned.column("piece").to_numpy(), clusters=clusters, centroids=centroids)
    info = {"backend": pack.group_backend, "model": model, "num_samples": int(num_samples),
            "num_clusters": int(k), "cluster_sizes": np.bincount(clusters, minlength=k).tolist(),
            "seconds": time.perf_counter() - start}
    (out / "groups.json").write_text(json.dumps(info, indent=2))
    print(f"raypack prepare: {num_samples:,} samples in {k} clusters ({info['seconds']:.1f} s)", flush=True)
    return out


def load_groups(folder: str | Path) -> dict:
    """What build_groups wrote: keys, pieces, clusters and float16 vectors in candidate-sample order (_candidates)."""
    folder = Path(folder)
    arrays = np.load(folder / "clusters.npz")
    info = json.loads((folder / "groups.json").read_text())
    vectors = _vectors_of(pq.read_table(_sorted_parquet_files(folder / "vectors"), columns=["vector"]))
    return {"keys": arrays["keys"], "pieces": arrays["pieces"], "clusters": arrays["clusters"], "vectors": vectors,
            "num_clusters": info["num_clusters"], "backend": info["backend"]}


# ---------------------------------------------------------------- prepare


def _tok_hash(cfg: Config, inputs: Inputs) -> str:
    d = cfg.data  # not d.overlength: the cache keeps every piece and each split applies its own policy
    return _config_hash(inputs.fingerprint, d.format, d.strict, d.tokenizer, d.template, d.max_seq_len,
                        d.hf_split, CACHE_VERSION)


def _holdout_keys(files: list[str], data: DataConfig, seed: int) -> np.ndarray:
    """Validation conversations: drawn from those data.overlength keeps, the same whatever the arms' policies."""
    table = pq.read_table(files, columns=["key", "piece", "status", "num_supervised_tokens"])
    kept = _kept(table, data.overlength)
    conv_keys = np.unique(table.column("key").to_numpy()[kept])
    if len(conv_keys) == 0:
        return conv_keys
    mask = holdout_mask(conv_keys, seed, fraction=data.val_fraction, count=data.val_count)
    return conv_keys[mask]


class _Job(NamedTuple):
    """One split prepare() writes: which samples, how they are packed, and its config hash."""

    select: str  # "val" or "train"
    spec: ArmSpec
    window: int
    groups: Path | None  # build_groups' folder, for packed arms when some arm is grouped
    hash: str
    folder: Path  # <tok_dir>/<name>-<hash>


def _prepare_jobs(cfg: Config, inputs: Inputs) -> tuple[Path, dict[str, _Job]]:
    """The tokenized cache folder and every split of cfg ("val" first, then each arm), by config hash only."""
    root = cfg.prepared_root()
    tok_hash = _tok_hash(cfg, inputs)
    tok_dir = root / f"tok-{tok_hash}"
    # data.overlength chooses the conversations the validation split is drawn from (_holdout_keys).
    split_hash = _config_hash(tok_hash, cfg.seed, cfg.data.val_fraction, cfg.data.val_count, cfg.data.overlength)
    # Each split's over-length policy is its arm's suffix, else data.overlength (the validation split's too).
    specs = {arm: replace(spec, overlength=spec.overlength or cfg.data.overlength)
             for arm, spec in ((arm, arm_spec(arm, cfg.pack)) for arm in cfg.pack.arms)}
    grouped = any(spec.grouping != "none" for spec in specs.values())
    groups_dir = _groups_dir(cfg.pack, cfg.seed, tok_dir) if grouped else None
    jobs = {"val": _Job("val", ArmSpec("padding", None, overlength=cfg.data.overlength), 0, None, split_hash,
                        tok_dir / f"val-{split_hash}")}
    for arm, spec in specs.items():
        packed_groups = groups_dir if spec.packer != "padding" else None
        arm_hash = _config_hash(split_hash, spec.strategy, spec.attention, cfg.pack.window, cfg.train.micro_batch_size,
                                cfg.prepare.rows_per_shard, spec.grouping, spec.only_single_turn,
                                packed_groups and packed_groups.name, cfg.pack.group_buffer if spec.grouping != "none" else None,
                                spec.overlength)
        jobs[arm] = _Job("train", spec, cfg.pack.window, packed_groups, arm_hash, tok_dir / f"{arm}-{arm_hash}")
    return tok_dir, jobs


def prepared_folders(cfg: Config) -> dict[str, Path]:
    """Where prepare() writes the validation split ("val") and each arm, computed from the config alone
    (no Ray, nothing read but the input files' size and mtime, or an hf: dataset's file list at its resolved
    revision); a split is ready once its manifest.json exists."""
    _, jobs = _prepare_jobs(cfg, resolve_inputs(cfg.data, cfg.synth))
    return {name: job.folder for name, job in jobs.items()}


def prepare(cfg: Config) -> dict:
    """Prepare the validation split and every arm of cfg.pack.arms; returns {name: folder}.

    Outputs whose config hash matches are reused (prepare.reuse), so a sweep's trials
    never re-tokenize. The returned dict has "val" plus one entry per arm.
    """
    ensure_ray()
    inputs = resolve_inputs(cfg.data, cfg.synth)  # once: the hash and the read see the same revision of a dataset
    tok_dir, jobs = _prepare_jobs(cfg, inputs)
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
    files = _sorted_parquet_files(tok_dir / "tokenized")
    holdout = _holdout_keys(files, cfg.data, cfg.seed)
    if any(job.groups for job in jobs.values()):
        build_groups(cfg, tok_dir, files)
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
        stats, join_ref = _pack_split(refs, jobs[name].select, spec, holdout_ref, cfg.prepare, partial)
        pending[name] = (partial, job_hash, spec, window, stats, join_ref)
    for name, (partial, job_hash, spec, window, stats, join_ref) in pending.items():
        joined = ray.get(join_ref)
        stats.update(num_supervised_tokens=joined["num_supervised_tokens"], seconds=joined["end"] - stats.pop("start"))
        manifest = _manifest(counts, stats, cfg.data.max_seq_len, cfg.train.micro_batch_size, spec, window,
                             job_hash, tokenize_seconds,
                             split="val" if name == "val" else "train", num_val_conversations=int(len(holdout)))
        _finish(partial, folders[name], manifest)
    return {name: str(path) for name, path in folders.items()}


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
