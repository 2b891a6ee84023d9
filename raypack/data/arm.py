"""One arm's plan and counts from tokenized samples: what `raypack compare` and `raypack prepare` report (pure core).

An arm (``ArmSpec``: strategy, attention, grouping, single-turn-only) is planned
from the samples' lengths alone, plus their assistant-turn counts when it packs
only single-turn samples and their content groups (a cluster and a vector per
sample) when some arm of the run is grouped; ``padfree`` is planned as ``padding``
(``ArmSpec.packer``: the same rows). ``raypack compare`` packs
``ArmPlan.plan`` in process; ``raypack prepare`` writes the shards of each plan of
``ArmPlan.plans`` on Ray Data. Both report ``ArmPlan.stats``, completed with the
supervised tokens counted on the rows (``pack.row_supervised_tokens``), since
random packing loses targets at its cuts and lengths cannot tell which.

Buffers: an ungrouped arm is planned ``window`` samples at a time (all when 0;
padding and padfree have one sample per row, so that changes nothing but the shards); a grouped
arm reads ``group_buffer`` samples at a time (all when 0) and packs each cluster in
windows (``raypack.data.compose``). No row mixes two buffers.

The stats record, one dict whose keys are in this order:

- the plan's counts (``pack.plan_stats``): ``num_samples``, ``num_rows``,
  ``num_tokens``, ``num_supervised_tokens`` (None here), ``num_capacity_tokens``,
  ``efficiency``, ``num_batch_tokens``, ``padding_fraction``, ``lower_bound_rows``,
  ``rows_over_lower_bound``, ``num_split_samples``, ``max_row_len``; a padfree
  micro-batch is one flat row without pads, so its ``num_batch_tokens`` is
  ``num_tokens`` and its ``padding_fraction`` 0;
- what went into the packs (``COMPOSITION_KEYS``): ``grouping`` and
  ``only_single_turn`` always; for a single-turn-only arm
  ``num_single_turn_samples``, ``num_multi_turn_samples``, ``num_multi_turn_rows``;
  for a packed arm given content groups ``num_clusters`` (the k fitted),
  ``group_backend``, ``within_pack_cosine`` and ``across_pack_cosine`` (the mean
  cosine of sample pairs sharing a row and of pairs in different rows, from
  ``features.pack_similarity`` over the whole arm, all buffers as one plan, seeded
  by ``seed``, on the vectors in float16 as prepare stores them),
  ``num_similarity_pairs``, ``num_shared_rows`` (rows of two or more samples),
  ``num_mixed_cluster_rows`` (those holding two or more clusters) and
  ``num_repeated_cluster_rows`` (those holding some cluster twice). Topic groups
  (``group_backend`` topic: the data's own topics, no vectors) have no cosine keys,
  and are planned strictly (``raypack.data.compose``: related rows hold one topic,
  unrelated rows no topic twice).

Example: six samples, bfd, rows of 8 tokens, the multi-turn sample 3 alone:

>>> import numpy as np
>>> from raypack.config import ArmSpec
>>> lengths, turns = np.array([5, 5, 5, 2, 2, 1]), np.array([1, 1, 1, 3, 1, 1])
>>> arm = plan_arm(lengths, ArmSpec("bfd", "cross", "none", True), max_seq_len=8, window=0, group_buffer=0,
...                micro_batch_size=1, seed=0, turns=turns)
>>> [arm.plan.piece_sample[a:b].tolist() for a, b in zip(arm.plan.row_offsets[:-1], arm.plan.row_offsets[1:])]
[[0, 4, 5], [1], [2], [3]]
>>> {key: arm.stats[key] for key in ("num_rows", "lower_bound_rows", "num_multi_turn_rows", "num_single_turn_samples")}
{'num_rows': 4, 'lower_bound_rows': 3, 'num_multi_turn_rows': 1, 'num_single_turn_samples': 5}
"""

from dataclasses import dataclass

import numpy as np

from raypack.config import ArmSpec
from raypack.data.compose import composition_stats, plan_composed
from raypack.data.features import pack_similarity
from raypack.data.pack import PackPlan, concat_plans, plan_stats

COMPOSITION_KEYS = ("grouping", "only_single_turn", "num_single_turn_samples", "num_multi_turn_samples",
                    "num_multi_turn_rows", "num_clusters", "group_backend", "within_pack_cosine",
                    "across_pack_cosine", "num_similarity_pairs", "num_shared_rows", "num_mixed_cluster_rows",
                    "num_repeated_cluster_rows")


@dataclass(frozen=True)
class ContentGroups:
    """What the samples are about (``raypack.data.features``), one entry per sample."""

    clusters: np.ndarray  # int cluster label
    vectors: np.ndarray | None  # content vector (samples x dim); None for topic groups
    num_clusters: int  # the k the clusters were fitted with (topic: the distinct topics)
    backend: str  # pack.group_backend: tfidf, embedding or topic

    def take(self, index: np.ndarray) -> "ContentGroups":
        """These samples' groups (the same k and backend)."""
        vectors = None if self.vectors is None else self.vectors[index]
        return ContentGroups(self.clusters[index], vectors, self.num_clusters, self.backend)


@dataclass(frozen=True)
class ArmPlan:
    """An arm's plan, buffer by buffer and as a whole, and its stats record (see the module docstring)."""

    plans: list[PackPlan]  # one per buffer; piece_sample indexes the buffer's samples
    buffer_starts: np.ndarray  # the first sample of each buffer
    plan: PackPlan  # the buffers' plans in turn; piece_sample indexes all the samples
    stats: dict


def plan_arm(lengths: np.ndarray, spec: ArmSpec, *, max_seq_len: int, window: int, group_buffer: int,
             micro_batch_size: int, seed: int, turns: np.ndarray | None = None,
             groups: ContentGroups | None = None) -> ArmPlan:
    """Plan the arm ``spec`` for samples of the given lengths and count what it holds.

    ``turns`` (assistant turns per sample) is needed when ``spec.only_single_turn``;
    ``groups`` when ``spec.grouping`` is not ``none``, and with it every packed
    arm reports its content stats (padding ignores it). See the module docstring.
    """
    n = len(lengths)
    if spec.only_single_turn and (turns is None or len(turns) != n):
        raise ValueError("a single-turn-only arm needs turns: the number of assistant turns of each sample")
    content = groups if spec.packer != "padding" else None
    if content is not None and (len(content.clusters) != n or (content.vectors is not None
                                                                and len(content.vectors) != n)):
        num_vectors = "no" if content.vectors is None else len(content.vectors)
        raise ValueError(f"content groups cover {len(content.clusters)} clusters and {num_vectors} vectors "
                         f"but there are {n} samples; give one of each per sample")
    strict = content is not None and content.backend == "topic"
    multi_turn = np.asarray(turns) > 1 if spec.only_single_turn else None
    size = (group_buffer if spec.grouping != "none" else window) or max(n, 1)
    starts = np.arange(0, n, size, dtype=np.int64)
    plans = [plan_composed(lengths[lo:lo + size], max_seq_len, spec.packer, window, spec.grouping,
                           None if content is None else content.clusters[lo:lo + size],
                           None if multi_turn is None else multi_turn[lo:lo + size], strict)
             for lo in starts.tolist()]
    plan = concat_plans(plans, [np.arange(lo, min(lo + size, n), dtype=np.int64) for lo in starts.tolist()])
    # A padfree micro-batch is its rows end to end, one flat row (raypack.data.collate): it computes no pad, as
    # rows collated one at a time would.
    counts = plan_stats(plan, lengths, max_seq_len, 1 if spec.strategy == "padfree" else micro_batch_size)
    stats = {"num_samples": counts.pop("num_samples"), "num_rows": counts.pop("num_rows"),
             "num_tokens": counts.pop("num_tokens"), "num_supervised_tokens": None, **counts,
             **_composition(plan, spec, multi_turn, content, seed)}
    return ArmPlan(plans, starts, plan, stats)


def _composition(plan: PackPlan, spec: ArmSpec, multi_turn: np.ndarray | None, content: ContentGroups | None,
                 seed: int) -> dict:
    """The record's COMPOSITION_KEYS for this arm."""
    out = {"grouping": spec.grouping, "only_single_turn": spec.only_single_turn}
    counts = composition_stats(plan, None if content is None else content.clusters, multi_turn)
    if multi_turn is not None:
        out.update(num_single_turn_samples=int((~multi_turn).sum()), num_multi_turn_samples=int(multi_turn.sum()),
                   num_multi_turn_rows=counts["num_multi_turn_rows"])
    if content is not None:
        out.update(num_clusters=int(content.num_clusters), group_backend=content.backend)
        if content.vectors is not None:
            similarity = {"within_pack_cosine": None, "across_pack_cosine": None, "num_pairs": 0}
            if len(content.vectors):
                # float16: the precision prepare keeps the vectors in, so both commands measure the same cosines.
                similarity = pack_similarity(np.asarray(content.vectors, dtype=np.float16), plan, seed=seed)
            out.update(within_pack_cosine=similarity["within_pack_cosine"],
                       across_pack_cosine=similarity["across_pack_cosine"],
                       num_similarity_pairs=similarity["num_pairs"])
        out.update(num_shared_rows=counts["num_packed_rows"], num_mixed_cluster_rows=counts["num_mixed_cluster_rows"],
                   num_repeated_cluster_rows=counts["num_repeated_cluster_rows"])
    return out
