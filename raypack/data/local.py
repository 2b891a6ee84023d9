"""In-process preparation of every arm from one tokenization pass (no Ray).

The reference path for small datasets, tests and the quickstart: read or
synthesise conversations, tokenize them once, then pack the same samples for
every arm (each under its over-length policy: data.overlength or its +truncate/
+split/+drop suffix) and report each arm's counts side by side. The validation split is
held out as `raypack prepare` holds it out (raypack.data.holdout: the same keys, seed and
data.val_fraction / data.val_count), and each arm is planned and counted by
``raypack.data.arm.plan_arm``, as the Ray Data pipeline plans it on a cluster, so both
report the same counts: an arm's here are its manifest's, what training sees.

    from raypack.config import load_config
    report = prepare_local(load_config("jobs/quickstart.yaml"))
    compare(load_config("jobs/quickstart.yaml"))   # `raypack compare`: prints, writes <output_dir>/<name>/
"""

from __future__ import annotations

import glob
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from raypack.config import OVERLENGTH_POLICIES, Config, DataConfig, PackConfig, SynthConfig, arm_spec, to_dict
from raypack.data import features, formats, synth
from raypack.data.arm import ContentGroups, plan_arm
from raypack.data.holdout import held_out_keys, record_key
from raypack.data.pack import pack_rows, row_supervised_tokens
from raypack.data.summary import COMPARE_COLUMNS, arms_table, composition_lines
from raypack.data.overlength import cache_columns, kept_rows, policy_counts
from raypack.data.tokenize import tokenize_pieces
from raypack.model import load_tokenizer


OVERLENGTH_COUNTS = ("num_truncated", "num_split", "num_dropped_too_long", "num_dropped_no_supervised")


@dataclass
class ArmResult:
    arm: str
    rows: list[dict]
    stats: dict


@dataclass
class LocalPrep:
    load: formats.LoadResult
    token_counts: dict
    arms: list[ArmResult]
    validation: dict  # the held-out conversations and their samples, tokens, supervised tokens (data.overlength)


def expand_sources(sources: list[str]) -> list[str]:
    """Files named by paths, globs or folders, sorted; an empty match is an error."""
    paths: list[str] = []
    for src in sources:
        if Path(src).is_dir():
            found = sorted(str(p) for ext in ("json", "jsonl", "parquet") for p in Path(src).glob(f"*.{ext}"))
        else:
            found = sorted(glob.glob(src))
        if not found:
            raise ValueError(f"data.sources: {src!r} matches no file (give JSON/JSONL/Parquet paths, globs "
                             "or folders)")
        paths += found
    return paths


def load_or_synth(data: DataConfig, synth_cfg: SynthConfig) -> formats.LoadResult:
    """Conversations from data.sources, or synthetic ones when there are none."""
    if data.sources:
        return formats.load_conversations(expand_sources(data.sources), fmt=data.format, strict=data.strict)
    rows, prefix = synth.synth_rows(synth_cfg, data.tokenizer), synth.source_prefix(synth_cfg)
    convs = [formats.normalise_row(r, "messages", f"{prefix}:{i + 1}") for i, r in enumerate(rows)]
    return formats.LoadResult(conversations=convs, rejected=[], num_input_rows=len(convs),
                              rejected_reasons={r: 0 for r in formats.REJECT_REASONS})


def conversation_keys(data: DataConfig, conversations: list[dict]) -> np.ndarray:
    """Each conversation's key as `raypack prepare`'s read stage gives it (raypack.data.holdout.record_key): the
    index of its file among expand_sources(data.sources) and its row, from its source "path:row"; a synthetic
    conversation's row number when there are no sources.

    load_conversations reads the files in order and each file's rows in order, so a row number that does not
    grow means the next file of that path (a file listed twice has two indices, as in prepare)."""
    if not data.sources:
        return np.arange(1, len(conversations) + 1, dtype=np.int64)
    paths = expand_sources(data.sources)
    keys, index, last_row = np.zeros(len(conversations), np.int64), -1, 0
    for i, conversation in enumerate(conversations):
        path, _, row = conversation["source"].rpartition(":")
        if index < 0 or paths[index] != path or int(row) <= last_row:
            index = next(j for j in range(index + 1, len(paths)) if paths[j] == path)
        keys[i], last_row = record_key(index, int(row)), int(row)
    return keys


def prepare_local(cfg: Config) -> LocalPrep:
    """Tokenize once, hold out the validation split as prepare does, pack every arm of cfg.pack.arms (each under
    its over-length policy) from the rest, collect each arm's stats."""
    load = load_or_synth(cfg.data, cfg.synth)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    tok = tokenize_pieces(load.conversations, tokenizer, cfg.data.max_seq_len, template=cfg.data.template)
    columns = cache_columns(tok)
    counts = {policy: policy_counts(*columns, policy) for policy in OVERLENGTH_POLICIES}
    held, validation = _hold_out(cfg, load.conversations, columns)
    # As prepare: content groups cover every sample some policy may keep; each arm takes its policy's samples.
    candidates = np.flatnonzero(_kept(columns, "split"))
    samples = [tok.samples[i] for i in candidates]
    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
    turns = np.array([formats.num_assistant_turns(load.conversations[s["conversation"]]) for s in samples],
                     dtype=np.int64)
    specs = {arm: arm_spec(arm, cfg.pack) for arm in cfg.pack.arms}
    groups = None
    if any(spec.grouping != "none" for spec in specs.values()):
        conversations = [load.conversations[s["conversation"]] for s in samples]
        groups = content_groups(samples, cfg.pack, cfg.data.tokenizer, cfg.seed,
                                topics=[c["topic"] for c in conversations], sources=[c["source"] for c in conversations])
    arms = []
    for arm, spec in specs.items():
        start = time.perf_counter()
        policy = spec.overlength or cfg.data.overlength
        chosen = np.flatnonzero((_kept(columns, policy) & ~held)[candidates])
        arm_groups = groups and groups.take(chosen)
        planned = plan_arm(lengths[chosen], spec, max_seq_len=cfg.data.max_seq_len, window=cfg.pack.window,
                           group_buffer=cfg.pack.group_buffer, micro_batch_size=cfg.train.micro_batch_size,
                           seed=cfg.seed, turns=turns[chosen], groups=arm_groups)
        rows = pack_rows(planned.plan, [samples[i] for i in chosen], spec.attention or "isolated")
        stats = {**planned.stats, "num_supervised_tokens": int(row_supervised_tokens(rows).sum()),
                 "overlength": policy, **{name: counts[policy][name] for name in OVERLENGTH_COUNTS},
                 "num_val_conversations": validation["num_val_conversations"]}
        stats["seconds"] = time.perf_counter() - start
        arms.append(ArmResult(arm, rows, stats))
    token_counts = {"num_conversations": len(load.conversations), "overlength": cfg.data.overlength,
                    **counts[cfg.data.overlength]}
    return LocalPrep(load=load, token_counts=token_counts, arms=arms, validation=validation)


def _hold_out(cfg: Config, conversations: list[dict], columns: tuple[np.ndarray, ...]) -> tuple[np.ndarray, dict]:
    """Which rows of the cache's columns are of held-out conversations (prepare's rule: raypack.data.holdout on
    each conversation's input key), and the validation split's counts (its samples under data.overlength)."""
    key = conversation_keys(cfg.data, conversations)[columns[0]]  # the columns' key is the conversation's index
    _, status, piece, num_tokens, num_supervised = columns
    held_keys = held_out_keys(key, status, piece, num_supervised, cfg.data.overlength, cfg.seed,
                              fraction=cfg.data.val_fraction, count=cfg.data.val_count)
    held = np.isin(key, held_keys)
    val = _kept(columns, cfg.data.overlength) & held  # prepare's val split: these samples, one per row
    return held, {"num_val_conversations": len(held_keys), "num_val_samples": int(val.sum()),
                  "num_val_tokens": int(num_tokens[val].sum()),
                  "num_val_supervised_tokens": int(num_supervised[val].sum())}


def _kept(columns: tuple[np.ndarray, ...], policy: str) -> np.ndarray:
    key, status, piece, num_tokens, num_supervised = columns
    return kept_rows(status, piece, num_supervised, policy)


def compare(cfg: Config) -> Path:
    """`raypack compare`: every arm's counts printed side by side and written to <output_dir>/<name>/compare.json
    (with the resolved config.yaml and the rejected input rows); returns that folder. The validation split is
    held out first, as `raypack prepare` holds it out, so each arm's counts are its manifest's."""
    out = Path(cfg.output_dir) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    source = ", ".join(cfg.data.sources) or f"synthetic {synth.describe(cfg.synth)}"
    print(f"raypack compare: {source}, max_seq_len {cfg.data.max_seq_len}, window {cfg.pack.window}", flush=True)
    start = time.perf_counter()
    prep = prepare_local(cfg)
    load = prep.load
    rejected = {k: v for k, v in load.rejected_reasons.items() if v}
    print(f"input rows {load.num_input_rows}: {len(load.conversations)} conversations, "
          f"{len(load.rejected)} rejected {rejected or ''}")
    print("tokenized: " + ", ".join(f"{k} {v}" for k, v in prep.token_counts.items()))
    print(f"held out for validation: {prep.validation['num_val_conversations']} conversations "
          f"({prep.validation['num_val_samples']} samples), as `raypack prepare` holds them out; the arms pack the "
          "rest")
    arms = {a.arm: a.stats for a in prep.arms}
    print("\n".join([arms_table(arms, COMPARE_COLUMNS), *composition_lines(arms)]))
    report = {"config": to_dict(cfg), "num_input_rows": load.num_input_rows,
              "num_rejected_rows": len(load.rejected), "rejected_reasons": load.rejected_reasons,
              "tokenize": prep.token_counts, "validation": prep.validation, "arms": arms}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    if load.rejected:
        with (out / "rejected.jsonl").open("w") as f:
            for r in load.rejected:
                f.write(json.dumps(r) + "\n")
    print(f"done in {time.perf_counter() - start:.1f} s; report: {out / 'compare.json'}")
    return out


def content_groups(samples: list[dict], pack: PackConfig, tokenizer: str, seed: int, topics: list[str] | None = None,
                   sources: list[str] | None = None) -> ContentGroups:
    """Content vectors and k-means clusters of the samples, in process (pack.group_backend); for topic, the
    samples' topics (and sources, which the error for a sample without one names) as clusters, no vectors."""
    if pack.group_backend == "topic":
        if topics is None:
            raise ValueError("pack.group_backend=topic needs each sample's topic")
        clusters, distinct = features.topic_clusters(topics, sources)
        return ContentGroups(clusters, None, len(distinct), "topic")
    ids = [s["input_ids"] for s in samples]
    if pack.group_backend == "tfidf":
        vectors, clusters, k = features.tfidf_clusters(ids, pack.num_clusters, seed=seed, dim=pack.feature_dim,
                                                       max_fit_samples=pack.kmeans_samples)
        return ContentGroups(clusters, vectors, k, pack.group_backend)
    from raypack.model import load_sentence_encoder

    texts = load_tokenizer(tokenizer).batch_decode([i.tolist() for i in ids], skip_special_tokens=True)
    vectors = np.asarray(load_sentence_encoder(pack.embedding_model).encode(
        texts, normalize_embeddings=True, show_progress_bar=False), dtype=np.float32)
    k = features.resolve_num_clusters(pack.num_clusters, len(ids))
    centroids = features.fit_kmeans(vectors, k, seed=seed, max_samples=pack.kmeans_samples)
    return ContentGroups(features.assign_clusters(vectors, centroids), vectors, k, pack.group_backend)
