"""Stage 4 of `raypack prepare`, plan and pack: one split (the validation split or an arm's train split) into rows.

Input: the tokenized cache's files (raypack.data.pipeline.cache), the held-out conversations' keys (prepare
draws them: raypack.data.holdout), the split's ArmSpec (strategy, attention, over-length policy, grouping,
single-turn-only) and, for a grouped arm, the content groups (raypack.data.pipeline.group). A split's samples are
the cache rows its over-length policy keeps (raypack.data.overlength), of the held-out conversations for "val",
of the others for "train"; each is addressed by its ordinal: its place among the split's samples in cache order.

Output: the split's folder, `part-BBBBB-CCC.parquet` shards (buffer B's plan, chunk C of prepare.rows_per_shard
rows) with the columns of _rows_table:

    row_index  int64        the row's place in the split, from 0, in shard-name order
    input_ids, labels, position_ids, seq_lens    the packed row (raypack.data.pack.pack_rows)
    sample_keys, sample_pieces   (key, piece) of every sample the row holds, in row order
    sample_topics  the topic of each of them (the record's topic field, "" without one: what the probe's
                   topic contexts are drawn by, raypack.data.prepared.row_topics)
    num_tokens, num_supervised_tokens

and flat/ (raypack.data.prepared: the same rows memory-mapped for training). Order: rows in plan order, buffer
by buffer; the manifest is prepare's. Three steps, the output the same whatever the number of tasks:

    plan_split       one task: reads lengths (+ turn counts, clusters) only and plans the split
                     (raypack.data.arm.plan_arm: a plan per buffer and the split's stats record);
    pack_shards      prepare.pack_workers tasks, each a contiguous run of the split's shards
                     (whole buffers, or rows of one buffer's plan): reads only the samples its
                     rows hold, materialises the rows, writes the shards and a flat/ part;
    join_flat_parts  one task: joins the parts into flat/.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raypack.config import ArmSpec, PrepareConfig
from raypack.data.arm import ContentGroups, plan_arm
from raypack.data.pack import PackPlan, pack_rows, row_supervised_tokens
from raypack.data.pipeline.cache import candidates, kept, list_column
from raypack.data.pipeline.group import load_groups
from raypack.data.prepared import FLAT_DIR, ShardConverter, first_fitting, join_flat, publish_flat


def _chosen(batch, holdout_keys: np.ndarray, select: str, overlength: str) -> tuple[np.ndarray, np.ndarray]:
    """Which rows of a cache batch are candidates, and which of those are samples of the train or val split."""
    held = np.isin(batch.column("key").to_numpy(), holdout_keys)
    return candidates(batch), kept(batch, overlength) & (held if select == "val" else ~held)


def _row_group_batches(row_groups: list[tuple[str, int]], columns: list[str]):
    """((path, row group), an iterator over its batches) for each of these row groups of the cache, in order."""
    pf, opened = None, None
    for path, group in row_groups:
        if path != opened:
            pf, opened = pq.ParquetFile(path), path
        yield (path, group), pf.iter_batches(batch_size=2048, row_groups=[group], columns=columns)


class SplitPlan(NamedTuple):
    """What plan_split hands to the packing tasks: every buffer's plan and where its samples are."""

    plans: list[PackPlan]  # one per buffer; piece_sample indexes the buffer's samples
    buffer_starts: np.ndarray  # split ordinal (kept samples of this split, in cache order) of each buffer's first sample
    keys: np.ndarray  # key and piece of every sample of the split, by split ordinal: what the packing tasks'
    pieces: np.ndarray  # samples are checked against
    row_groups: list[tuple[str, int, int, int]]  # (file, row group, first split ordinal, split samples in it)


class Shard(NamedTuple):
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
               rows_per_shard: int, seed: int) -> tuple[dict, SplitPlan]:
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
        kept_index = split["kept_index"]  # the split's samples among the candidates, which the groups hold
        if (len(kept_index) and kept_index[-1] >= len(loaded["keys"])) or not (
                np.array_equal(loaded["keys"][kept_index], split["key"])
                and np.array_equal(loaded["pieces"][kept_index], split["piece"])):
            raise RuntimeError(f"content groups {groups_dir} do not hold the tokenized cache's samples (keys or "
                               "pieces differ); prepare again with prepare.reuse=false")
        groups = ContentGroups(loaded["clusters"], loaded["vectors"], loaded["num_clusters"],
                               loaded["backend"]).take(kept_index)
    arm = plan_arm(split["length"], spec, max_seq_len=max_seq_len, window=window, group_buffer=group_buffer,
                   micro_batch_size=micro_batch_size, seed=seed, turns=split["turns"], groups=groups)
    shards, num_rows = [], 0
    for b, plan in enumerate(arm.plans):
        lens = plan.row_lengths()
        for c, r in enumerate(range(0, plan.num_rows, rows_per_shard)):
            r_hi = min(r + rows_per_shard, plan.num_rows)
            shards.append(Shard(b, c, r, r_hi, num_rows + r, int(lens[r:r_hi].sum())))
        num_rows += plan.num_rows
    return {**arm.stats, "shards": shards, "start": start}, SplitPlan(arm.plans, arm.buffer_starts, split["key"],
                                                                      split["piece"], split["row_groups"])


def _shard_plan(plan: PackPlan, lo: int, hi: int) -> PackPlan:
    """Rows lo:hi of a plan (piece_sample still indexes the plan's samples)."""
    p_lo, p_hi = plan.row_offsets[lo], plan.row_offsets[hi]
    return PackPlan(plan.piece_sample[p_lo:p_hi], plan.piece_start[p_lo:p_hi], plan.piece_end[p_lo:p_hi],
                    plan.row_offsets[lo:hi + 1] - p_lo)


def _read_samples(split: SplitPlan, holdout_keys: np.ndarray, select: str, overlength: str, needed: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, list[dict], np.ndarray]:
    """Keys, pieces, tokens (copies) and topics of the split's samples at the sorted ordinals `needed`.

    Row groups holding none of them are skipped; nothing else of the split is kept.
    """
    keys, pieces = np.zeros(len(needed), np.int64), np.zeros(len(needed), np.int32)
    tokens: list[dict] = [{} for _ in needed]
    topics = np.full(len(needed), "", dtype=object)
    wanted = [(path, group, first) for path, group, first, count in split.row_groups
              if np.searchsorted(needed, first) < np.searchsorted(needed, first + count)]
    firsts = {(path, group): first for path, group, first in wanted}
    columns = ["key", "piece", "status", "num_supervised_tokens", "topic", "input_ids", "labels"]
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
            batch_topics = batch.column("topic").to_pylist()
            for i, s in zip(rows[hit], slot[hit]):
                lo, hi = offsets[i], offsets[i + 1]
                keys[s], pieces[s], topics[s] = batch_keys[i], batch_pieces[i], batch_topics[i]
                tokens[s] = {"input_ids": ids_values[lo:hi].copy(), "labels": lab_values[lo:hi].copy()}
    if not all(tokens):
        raise RuntimeError(f"{sum(not t for t in tokens)} planned samples were not found in the tokenized cache; "
                           "prepare again with prepare.reuse=false")
    return keys, pieces, tokens, topics


@ray.remote
def pack_shards(split: SplitPlan, shards: list[Shard], holdout_keys: np.ndarray, select: str, overlength: str,
                attention: str, out: str, part: str) -> dict:
    """Materialise and write these consecutive shards of a split, and their rows as a flat/ part.

    Holds only the samples its rows hold. Returns the rows' supervised tokens and the
    position rules they follow (join_flat_parts picks one for the whole split).
    """
    needed = np.unique(np.concatenate(
        [split.buffer_starts[s.buffer] + _shard_plan(split.plans[s.buffer], s.lo, s.hi).piece_sample
         for s in shards]))
    keys, pieces, tokens, topics = _read_samples(split, holdout_keys, select, overlength, needed)
    if not (np.array_equal(keys, split.keys[needed]) and np.array_equal(pieces, split.pieces[needed])):
        raise RuntimeError("the tokenized cache changed between planning and packing (its samples are not the "
                           "planned ones); prepare again with prepare.reuse=false")
    converter = ShardConverter(part, first_row=shards[0].first_row)
    num_supervised = 0
    for s in shards:
        plan = _shard_plan(split.plans[s.buffer], s.lo, s.hi)
        local = np.searchsorted(needed, split.buffer_starts[s.buffer] + plan.piece_sample)
        used, piece_sample = np.unique(local, return_inverse=True)
        rows = pack_rows(PackPlan(piece_sample.astype(np.int64), plan.piece_start, plan.piece_end, plan.row_offsets),
                         [tokens[i] for i in used], attention)
        supervised = row_supervised_tokens(rows)
        table = _rows_table(rows, supervised, keys[local], pieces[local], topics[local], plan.row_offsets,
                            s.first_row)
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


def shard_runs(num_tokens: list[int], num: int) -> list[tuple[int, int]]:
    """At most `num` contiguous, non-empty runs of shards with about the same tokens each."""
    if not num_tokens:
        return []
    cum = np.cumsum(num_tokens)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, num) / num) + 1
    bounds = np.unique(np.concatenate([[0], np.minimum(cuts, len(cum)), [len(cum)]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def pack_split(refs, select: str, spec: ArmSpec, holdout_ref, prep: PrepareConfig, out: Path) -> tuple[dict, object]:
    """Start a planned split's packing tasks (prep.pack_workers runs of shards) and the join after them.

    `refs` are plan_split's two results; returns the split's stats and the join's ref.
    """
    stats_ref, plan_ref = refs
    stats = ray.get(stats_ref)
    shards = stats.pop("shards")
    parts, results = [], []
    for i, (lo, hi) in enumerate(shard_runs([s.num_tokens for s in shards], prep.pack_workers)):
        parts.append(str(out / ".flat-parts" / f"{i:03d}"))
        results.append(pack_shards.options(num_cpus=prep.pack_num_cpus).remote(
            plan_ref, shards[lo:hi], holdout_ref, select, spec.overlength, spec.attention or "isolated", str(out),
            parts[-1]))
    return stats, join_flat_parts.options(num_cpus=prep.pack_num_cpus).remote(str(out), parts, *results)


def _rows_table(rows: list[dict], supervised: np.ndarray, sample_keys: np.ndarray, sample_pieces: np.ndarray,
                sample_topics: np.ndarray, row_offsets: np.ndarray, first_row: int) -> pa.Table:
    n = len(rows)
    offsets = pa.array(row_offsets.astype(np.int32))
    return pa.table({
        "row_index": pa.array(np.arange(first_row, first_row + n, dtype=np.int64)),
        "input_ids": list_column([r["input_ids"] for r in rows]),
        "labels": list_column([r["labels"] for r in rows]),
        "position_ids": list_column([r["position_ids"] for r in rows]),
        "seq_lens": list_column([r["seq_lens"] for r in rows]),
        "sample_keys": pa.ListArray.from_arrays(offsets, pa.array(sample_keys.astype(np.int64))),
        "sample_pieces": pa.ListArray.from_arrays(offsets, pa.array(sample_pieces.astype(np.int32))),
        "sample_topics": pa.ListArray.from_arrays(offsets, pa.array(sample_topics.tolist(), pa.string())),
        "num_tokens": pa.array([len(r["input_ids"]) for r in rows], pa.int32()),
        "num_supervised_tokens": pa.array(supervised.astype(np.int32)),
    })
