"""Context probe: does a model use, over-rely on, or ignore what precedes a sample in its row?

The paper's third question (arXiv 2410.08081): packing puts samples in one
attention context, so a model may learn to lean on (or to ignore) earlier,
related or unrelated, samples. For held-out targets the probe measures the mean
loss over each target's supervised tokens when the target is preceded, in ONE
causal row with positions running on (no isolation, as in `cross` packing), by

    (a) nothing            loss_alone
    (b) an unrelated sample (another cluster)   loss_unrelated
    (c) a related sample    (the same cluster)  loss_related

and reports the paired per-target changes (b)-(a) and (c)-(a) (and (c)-(b),
which cancels any effect of merely having a longer context), each with a 95%
bootstrap confidence interval over targets. A model that ignores its context
shows ~0 for all three; one that relies on it drops with related context and,
if it copies blindly, rises with unrelated context.

    raypack probe jobs/quickstart.yaml train.arm=bfd-cross [probe.num_samples=256 probe.num_clusters=0 ...]
    raypack probe CONFIG eval.model_dir=MODEL eval.val_dir=out/prepared/tok-<hash>/val-<hash> [probe.out=F.json]

    result = probe_model(model_dir, val_folder, cfg.probe, seed=cfg.seed,   # one process, saved HF model
                         by_topic=cfg.pack.group_backend == "topic")
    result = run_probe(forward, samples, clusters, num_samples, seed, max_seq_len, pad_token_id)  # pure core

Rules:
- Clusters are k-means over hashed tf-idf vectors of each sample's token ids
  (raypack.data.features); `num_clusters=0` picks k with `auto_num_clusters`.
  With pack.group_backend=topic (`by_topic`) they are the samples' own topics
  instead, as the packs were grouped: related = the same topic, unrelated =
  another topic (the validation split's shards keep each sample's topic:
  raypack.data.prepared.row_topics). The result says which: `contexts_by` is
  "tfidf" or "topic".
- A target must be at most max_seq_len // 2 tokens, so every context keeps at
  least as many tokens as the target; a context that does not fit is cut from
  its LEFT (its end, nearest the target, is kept). Contexts carry no labels.
- The target's first label is never scored: alone nothing predicts it, so it is
  dropped in all three rows to keep them comparable.
- max_seq_len defaults to the shorter of the longest validation row (about the
  training length) and the model's max_position_embeddings.

Example row (context [1, 7, 8, 9], target [1, 5, 6] with labels [-100, -100, 6],
max_seq_len 6, so the context loses its first token):

    input_ids     [7, 8, 9, 1, 5, 6]
    labels        [-100, -100, -100, -100, -100, 6]
    position_ids  [0, 1, 2, 3, 4, 5]

The result is JSON-ready:

    {"num_samples": 256, "num_clusters": 16, "loss_alone": 1.93, "loss_unrelated": 1.95,
     "loss_related": 1.71, "delta_unrelated": 0.02, "delta_unrelated_ci": [0.01, 0.03],
     "delta_related": -0.22, "delta_related_ci": [-0.27, -0.18], "related_minus_unrelated": -0.24, ...}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from raypack.config import ProbeConfig
from raypack.data.collate import collate
from raypack.data.tokenize import IGNORE_INDEX
from raypack.train.loss import token_losses

NUM_RESAMPLES = 2000
CONTEXTS = ("alone", "unrelated", "related")


def probe_pairs(clusters: np.ndarray, num_samples: int, seed: int,
                eligible: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target, related, unrelated) sample indices, up to num_samples of each, deterministic by seed.

    A target is an `eligible` sample (default: all) whose cluster holds another
    sample and which has a sample in another cluster; the rest are skipped.
    Related and unrelated contexts are drawn uniformly among those (any length).

    >>> [x.tolist() for x in probe_pairs(np.array([0, 0, 1]), 5, seed=0)]  # sample 2: alone in its cluster
    [[0, 1], [1, 0], [2, 2]]
    """
    clusters = np.asarray(clusters, dtype=np.int64)
    n = len(clusters)
    eligible = np.ones(n, dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    order = np.argsort(clusters, kind="stable")  # members of a cluster are contiguous in `order`
    ids, start, count = np.unique(clusters[order], return_index=True, return_counts=True)
    block = np.searchsorted(ids, clusters)
    first, size = start[block], count[block]
    candidates = np.flatnonzero(eligible & (size >= 2) & (size < n))
    rng = np.random.default_rng(seed)
    targets = rng.permutation(candidates)[:num_samples]
    related, unrelated = np.empty_like(targets), np.empty_like(targets)
    for i, t in enumerate(targets):
        members = order[first[t]:first[t] + size[t]]
        r = members[rng.integers(size[t] - 1)]
        related[i] = r if r != t else members[-1]  # uniform over the other members
        k = rng.integers(n - size[t])
        unrelated[i] = order[k if k < first[t] else k + size[t]]  # skip the target's block
    return targets, related, unrelated


def build_probe_rows(target: dict, context: np.ndarray | None, max_seq_len: int) -> dict | None:
    """The probe row for one target: `context` (token ids, or None for alone) then the target.

    Returns {"input_ids", "labels", "position_ids"} int64 arrays (see the module
    docstring's example), or None when the target alone is longer than
    max_seq_len. The context gets IGNORE_INDEX labels and is cut from its left to
    fit; the target's first label is dropped (never scored alone).
    """
    ids = np.asarray(target["input_ids"], dtype=np.int64)
    labels = np.asarray(target["labels"], dtype=np.int64).copy()
    if len(ids) > max_seq_len:
        return None
    labels[:1] = IGNORE_INDEX
    room = max_seq_len - len(ids)
    context = np.zeros(0, dtype=np.int64) if context is None or room == 0 else \
        np.asarray(context, dtype=np.int64)[-room:]
    input_ids = np.concatenate([context, ids])
    return {"input_ids": input_ids,
            "labels": np.concatenate([np.full(len(context), IGNORE_INDEX, dtype=np.int64), labels]),
            "position_ids": np.arange(len(input_ids), dtype=np.int64)}


@torch.no_grad()
def probe_losses(forward: Callable[[dict], torch.Tensor], rows: list[dict], pad_token_id: int,
                 micro_batch_size: int = 8, log: Callable[[str], None] | None = None,
                 log_every: int = 50) -> np.ndarray:
    """Mean token loss over each row's supervised targets, float64 [len(rows)].

    Rows are batched longest first and right-padded with an attention_mask, as
    `collate(..., "padding")` does (positions are 0..L-1, one causal sequence per
    row; `position_ids` is in the batch for forwards that want it). A row with no
    target gets NaN. Each row's losses are summed on their own, so identical token
    losses give bit-identical means whatever the padding.
    """
    lengths = np.array([len(r["input_ids"]) for r in rows])
    order = np.argsort(-lengths, kind="stable")
    groups = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    out = np.full(len(rows), np.nan)
    for g, idx in enumerate(groups):
        batch = collate([rows[i] for i in idx], "padding", pad_token_id)
        length = batch["input_ids"].shape[1]
        batch["position_ids"] = torch.arange(length, dtype=torch.long).expand(len(idx), length).clone()
        losses, mask = token_losses(forward(batch), batch["labels"])
        losses, mask = losses.double().cpu(), mask.cpu()
        for j, i in enumerate(idx):
            values = losses[j][mask[j]].numpy()
            if len(values):
                out[i] = values.mean()
        if log and ((g + 1) % log_every == 0 or g + 1 == len(groups)):
            log(f"probe: {g + 1}/{len(groups)} micro-batches")
    return out


def _mean_ci(values: np.ndarray, rng: np.random.Generator, num_resamples: int):
    """Mean and 95% percentile-bootstrap interval [lo, hi] of the mean (None when empty)."""
    if len(values) == 0:
        return None, [None, None]
    means = values[rng.integers(0, len(values), (num_resamples, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), [float(lo), float(hi)]


def summarise_probe(loss_alone: np.ndarray, loss_unrelated: np.ndarray, loss_related: np.ndarray,
                    seed: int = 0, num_resamples: int = NUM_RESAMPLES) -> dict:
    """Mean losses, paired mean deltas and their bootstrap 95% CIs (the same resamples for every delta)."""
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (loss_alone, loss_unrelated, loss_related))
    if not (len(a) == len(b) == len(c)):
        raise ValueError(f"the three loss arrays must be paired, got lengths {len(a)}, {len(b)}, {len(c)}")
    result = {"num_samples": len(a), "num_resamples": num_resamples,
              "loss_alone": float(a.mean()) if len(a) else None,
              "loss_unrelated": float(b.mean()) if len(a) else None,
              "loss_related": float(c.mean()) if len(a) else None}
    for name, delta in (("delta_unrelated", b - a), ("delta_related", c - a), ("related_minus_unrelated", c - b)):
        result[name], result[f"{name}_ci"] = _mean_ci(delta, np.random.default_rng(seed), num_resamples)
    return result


def run_probe(forward: Callable[[dict], torch.Tensor], samples: list[dict], clusters: np.ndarray,
              num_samples: int, seed: int, max_seq_len: int, pad_token_id: int, micro_batch_size: int = 8,
              log: Callable[[str], None] | None = None) -> dict:
    """The probe on samples ({"input_ids", "labels"} each) with given clusters (pure core).

    Targets are samples of at most max_seq_len // 2 tokens with a target after
    their first token; the result is `summarise_probe`'s plus counts.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len} leaves no room for a context; give at least 2")
    if len(clusters) != len(samples):
        raise ValueError(f"{len(clusters)} cluster ids for {len(samples)} samples")
    short = np.array([len(s["input_ids"]) <= max_seq_len // 2 for s in samples], dtype=bool)
    scored = np.array([bool((np.asarray(s["labels"])[1:] != IGNORE_INDEX).any()) for s in samples], dtype=bool)
    targets, related, unrelated = probe_pairs(clusters, num_samples, seed, short & scored)
    rows = [build_probe_rows(samples[t], None if k == 0 else samples[ctx[i]]["input_ids"], max_seq_len)
            for k, ctx in enumerate((None, unrelated, related)) for i, t in enumerate(targets)]
    losses = probe_losses(forward, rows, pad_token_id, micro_batch_size, log) if rows else np.zeros(0)
    a, b, c = losses.reshape(3, len(targets))
    result = summarise_probe(a, b, c, seed)
    result.update({"num_val_samples": len(samples), "num_too_long": int((~short).sum()),
                   "max_seq_len": int(max_seq_len), "seed": int(seed)})
    return result


def cluster_samples(samples: list[np.ndarray], num_clusters: int, seed: int) -> tuple[np.ndarray, int]:
    """Cluster ids of token-id samples (tf-idf + k-means, raypack.data.features) and the k used."""
    from raypack.data.features import tfidf_clusters

    if num_clusters < 0:
        raise ValueError(f"num_clusters={num_clusters}: give 0 (automatic) or a positive number")
    _, clusters, k = tfidf_clusters(samples, num_clusters, seed=seed)
    return np.asarray(clusters), int(k)


def topic_samples(val_folder: str) -> tuple[np.ndarray, int]:
    """Cluster ids of a validation split's samples by their topics (one sample per row) and the number of topics;
    ValueError when a sample has none (raypack.data.features.topic_clusters)."""
    from raypack.data.features import topic_clusters
    from raypack.data.prepared import row_topics

    topics = [row[0] for row in row_topics(val_folder)]
    clusters, distinct = topic_clusters(topics)
    return clusters, len(distinct)


def probe_model(model_dir: str, val_folder: str, probe: ProbeConfig, seed: int,
                log: Callable[[str], None] | None = None, by_topic: bool = False) -> dict:
    """The probe of a saved Hugging Face model on a prepared validation split (one process, on probe.device);
    related and unrelated contexts by the samples' topics when `by_topic` (pack.group_backend=topic), else by
    tf-idf clusters."""
    from transformers import AutoModelForCausalLM

    from raypack.data.prepared import RowStore
    from raypack.model import load_tokenizer

    rows = RowStore.open(val_folder)
    if np.any(rows.num_samples_per_row() != 1):
        raise ValueError(f"{val_folder} holds packed rows; give a validation split (one sample per row)")
    samples = [{"input_ids": r["input_ids"].astype(np.int64), "labels": r["labels"].astype(np.int64)}
               for r in rows.take(np.arange(rows.num_rows))]
    if len(samples) < 3:
        raise ValueError(f"{val_folder} has {len(samples)} samples; the probe needs at least 3")
    if by_topic:
        clusters, k = topic_samples(val_folder)
        if len(clusters) != len(samples):
            raise ValueError(f"{val_folder}: {len(clusters)} topics for {len(samples)} rows; prepare it again")
    else:
        clusters, k = cluster_samples([s["input_ids"] for s in samples], probe.num_clusters, seed)
    device = probe.device if probe.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_dir)  # a pad token even if the folder's has none
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    max_seq_len = probe.max_seq_len
    if not max_seq_len:
        longest = max(len(s["input_ids"]) for s in samples)
        max_seq_len = min(longest, getattr(model.config, "max_position_embeddings", None) or longest)

    def forward(batch: dict) -> torch.Tensor:
        inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
        return model(**inputs, use_cache=False).logits

    result = run_probe(forward, samples, clusters, probe.num_samples, seed, max_seq_len, tokenizer.pad_token_id,
                       probe.micro_batch_size, log)
    return {"model": str(model_dir), "val": str(val_folder), "contexts_by": "topic" if by_topic else "tfidf",
            "num_clusters": k, "num_nonempty_clusters": len(np.unique(clusters)), **result}


def probe_on_ray(model_dir: str, val_folder: str, probe: ProbeConfig, seed: int, num_gpus: float,
                 num_cpus: float, by_topic: bool = False) -> dict:
    """`probe_model` as one Ray task holding `num_gpus` GPUs (device cuda when > 0) and `num_cpus` CPUs.

    What `raypack study` runs for every arm; paths are made absolute, so they must be
    visible from the worker's node (a shared filesystem on a cluster).
    """
    import ray  # only this entry point needs Ray

    remote = ray.remote(probe_model).options(num_gpus=num_gpus, num_cpus=num_cpus)
    probe = replace(probe, device="cuda" if num_gpus > 0 else "cpu")
    return ray.get(remote.remote(str(Path(model_dir).resolve()), str(Path(val_folder).resolve()), probe, seed=seed,
                                 by_topic=by_topic))


def format_probe(result: dict) -> str:
    """A short table: mean loss per context, and the paired change against alone with its 95% CI."""
    def num(x, sign=""):
        return "n/a" if x is None else f"{x:{sign}.4f}"

    groups = "topics" if result.get("contexts_by") == "topic" else "clusters"
    lines = [(f"context probe: {result['num_samples']} targets, {result.get('num_clusters', '?')} {groups}, "
              f"max_seq_len {result['max_seq_len']} (loss on each target's supervised tokens)"),
             f"{'context':<10} {'mean loss':>10} {'vs alone':>10}  95% CI",
             f"{'alone':<10} {num(result['loss_alone']):>10}"]
    for name in ("unrelated", "related"):
        lo, hi = result[f"delta_{name}_ci"]
        lines.append(f"{name:<10} {num(result[f'loss_{name}']):>10} {num(result[f'delta_{name}'], '+'):>10}  "
                     f"[{num(lo, '+')}, {num(hi, '+')}]")
    lo, hi = result["related_minus_unrelated_ci"]
    lines.append(f"related - unrelated: {num(result['related_minus_unrelated'], '+')} "
                 f"[{num(lo, '+')}, {num(hi, '+')}]")
    return "\n".join(lines)
