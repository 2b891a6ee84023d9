"""Pack composition: which samples share a row, by content cluster and by turn count (pure core).

``plan_composed`` returns a ``PackPlan`` exactly like ``plan_pack`` (its
``piece_sample`` indexes the given arrays), with two extra choices:

- ``grouping`` (``GROUPINGS``), given a cluster label per sample (from
  ``raypack.data.features``):

  - ``none``: ``plan_pack`` as it is.
  - ``related``: each cluster is planned on its own with ``plan_pack`` (its
    samples in input order, in chunks of ``window``), so no row mixes two
    clusters. Clusters follow each other in increasing label order. With
    ``greedy``/``bfd`` the least-filled row of each cluster, when at most
    ``TAIL_FILL`` full, is taken apart and its samples are packed with the other
    clusters' tails at the end: at most about one mixed row per cluster, and rows
    back at the ungrouped packer's count.
  - ``unrelated``: rows mix clusters on purpose. ``random`` packs the samples in
    round-robin order (the first sample of every cluster in label order, then the
    second of every cluster, ...). ``greedy`` and ``bfd`` keep their order
    (longest first, stable) and put each sample in the first-fit (greedy) or
    best-fit (bfd) row among the rows with room that hold no sample of its
    cluster; failing that, in the first-fit or best-fit row among all rows with
    room; failing that, in a new row. The search for a row without the cluster
    gives up after ``MAX_SKIPS`` fitting rows that hold it (then the fallback
    applies), which bounds the work when one cluster is in almost every row.
    Greedy and bfd only choose among rows that have room, and longest-first order
    leaves few such rows when lengths are unimodal, so there ``unrelated`` removes
    only some repeats; the round-robin order of ``random`` removes nearly all.

  ``padding`` has one sample per row, so it only takes ``grouping="none"``.

- ``strict`` (for clusters that are the data's own topics, ``pack.group_backend:
  topic``): ``related`` greedy/bfd keep every cluster's rows to themselves (no
  tails pooled: every packed row holds one cluster, at the price of up to one
  part-filled row per cluster), and ``unrelated`` greedy/bfd open a new row rather
  than put a sample in a row that holds its cluster (no packed row holds a
  cluster twice; a new row is opened only where every row with room holds the
  cluster, or after ``MAX_SKIPS`` such rows). ``random`` is the same either way:
  ``related`` never pools, and ``unrelated`` repeats a cluster only where the
  round-robin order runs out of other clusters (one cluster far larger than the
  rest).

- ``multi_turn``, a bool per sample: multi-turn samples are not packed. Each
  gets rows of its own (one row, or for ``random`` a sample longer than
  ``max_seq_len`` is cut into rows of its own), after all the packed rows; only
  the single-turn samples are planned with the rules above (the paper's
  single-turn-only packing).

Example, ``max_seq_len=8``, six samples whose clusters alternate (``bfd`` takes
them in input order, which is already longest first):

>>> import numpy as np
>>> lengths = np.array([5, 5, 5, 2, 2, 1])
>>> clusters = np.array([0, 1, 0, 1, 0, 1])
>>> def rows(plan):
...     return [plan.piece_sample[a:b].tolist() for a, b in zip(plan.row_offsets[:-1], plan.row_offsets[1:])]
>>> rows(plan_composed(lengths, 8, "bfd"))
[[0, 3, 5], [1, 4], [2]]
>>> rows(plan_composed(lengths, 8, "bfd", grouping="related", clusters=clusters))
[[0, 4], [1, 3, 5], [2]]
>>> rows(plan_composed(lengths, 8, "bfd", grouping="unrelated", clusters=clusters))
[[0, 3], [1, 4], [2, 5]]

The plain plan puts samples 3 and 5 (both cluster 1) in one row; ``related``
plans cluster 0 (samples 0, 2, 4), then cluster 1, and repacks cluster 0's
part-filled row [2] at the end (cluster 1's only row is full); ``unrelated`` sends sample 5
past the tighter rows 0 and 1, which already hold cluster 1, to row 2. Single-turn-only
packing with sample 3 multi-turn: it gets a row of its own, after the packed rows.

>>> multi_turn = np.array([False, False, False, True, False, False])
>>> rows(plan_composed(lengths, 8, "bfd", grouping="unrelated", clusters=clusters, multi_turn=multi_turn))
[[0, 5], [1, 4], [2], [3]]

Strict: ``related`` keeps cluster 0's part-filled row [2] to itself. ``unrelated``, four samples of which three
are of cluster 0: the last one finds room only in rows holding cluster 0, so it joins the tightest of them,
or strictly opens a row of its own.

>>> rows(plan_composed(lengths, 8, "bfd", grouping="related", clusters=clusters, strict=True))
[[0, 4], [2], [1, 3, 5]]
>>> lengths, clusters = np.array([5, 5, 2, 1]), np.array([0, 1, 0, 0])
>>> rows(plan_composed(lengths, 8, "bfd", grouping="unrelated", clusters=clusters))
[[0], [1, 2, 3]]
>>> rows(plan_composed(lengths, 8, "bfd", grouping="unrelated", clusters=clusters, strict=True))
[[0], [1, 2], [3]]
"""

import numpy as np

from raypack.config import GROUPINGS
from raypack.data.bins import check_plan_inputs, fit_rows
from raypack.data.pack import PackPlan, concat_plans, plan_pack

# Fitting rows that hold the sample's cluster, skipped before the fallback (see the module docstring).
MAX_SKIPS = 1000
TAIL_FILL = 0.9  # related greedy/bfd: a cluster's least-filled row at most this full is repacked with the others


def plan_composed(lengths: np.ndarray, max_seq_len: int, strategy: str, window: int = 0, grouping: str = "none",
                  clusters: np.ndarray | None = None, multi_turn: np.ndarray | None = None,
                  strict: bool = False) -> PackPlan:
    """Plan rows like ``plan_pack``, grouping samples by cluster and leaving multi-turn samples unpacked;
    ``strict`` groups strictly by cluster (topics: no pooled tails, no repeats).

    See the module docstring for the rules and an example.
    """
    lengths, max_seq_len, window = check_plan_inputs(lengths, max_seq_len, strategy, window)
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; use one of {GROUPINGS}")
    if strategy == "padding" and grouping != "none":
        raise ValueError(f"grouping {grouping!r} needs a packing strategy: padding has one sample per row, "
                         "so use grouping 'none' with padding, or strategy 'random', 'greedy' or 'bfd'")
    clusters = _check_clusters(clusters, len(lengths), grouping)
    multi_turn = _check_multi_turn(multi_turn, len(lengths))

    single = np.flatnonzero(~multi_turn)
    packed = _plan_grouped(lengths[single], max_seq_len, strategy, window, grouping,
                           None if clusters is None else clusters[single], strict)
    multi = np.flatnonzero(multi_turn)
    # window=1 plans every multi-turn sample alone: one row, or rows of its own when random splits it.
    alone = plan_pack(lengths[multi], max_seq_len, "random" if strategy == "random" else "padding", 1)
    return concat_plans([packed, alone], [single, multi])


def _check_clusters(clusters, n: int, grouping: str) -> np.ndarray | None:
    if clusters is None:
        if grouping != "none":
            raise ValueError(f"grouping {grouping!r} needs clusters: one int label >= 0 per sample "
                             "(e.g. from raypack.data.features.assign_clusters)")
        return None
    clusters = np.asarray(clusters)
    if clusters.shape != (n,) or (n and not np.issubdtype(clusters.dtype, np.integer)):
        raise ValueError(f"clusters must be a 1-D int array with one label per sample ({n}), "
                         f"got shape {clusters.shape} dtype {clusters.dtype}")
    clusters = clusters.astype(np.int64, copy=False)
    if n and clusters.min() < 0:
        raise ValueError(f"cluster labels must be >= 0, got {int(clusters.min())}")
    return clusters


def _check_multi_turn(multi_turn, n: int) -> np.ndarray:
    if multi_turn is None:
        return np.zeros(n, dtype=bool)
    multi_turn = np.asarray(multi_turn)
    if multi_turn.shape != (n,) or (n and multi_turn.dtype != np.bool_):
        raise ValueError(f"multi_turn must be a 1-D bool array with one flag per sample ({n}), "
                         f"got shape {multi_turn.shape} dtype {multi_turn.dtype}")
    return multi_turn.astype(bool, copy=False)


def _plan_grouped(lengths, max_seq_len, strategy, window, grouping, clusters, strict) -> PackPlan:
    if grouping == "none":
        return plan_pack(lengths, max_seq_len, strategy, window)
    if grouping == "related":
        by_cluster = np.argsort(clusters, kind="stable")
        bounds = np.flatnonzero(np.diff(clusters[by_cluster])) + 1
        members = np.split(by_cluster, bounds) if len(by_cluster) else []
        plans = [plan_pack(lengths[m], max_seq_len, strategy, window) for m in members]
        if strategy in ("greedy", "bfd") and not strict:
            return _repack_tails(plans, members, lengths, max_seq_len, strategy, window)
        return concat_plans(plans, members)
    if strategy == "random":
        order = _round_robin(clusters)
        return concat_plans([plan_pack(lengths[order], max_seq_len, "random", window)], [order])
    # Longest first, each sample to the first-fit or best-fit row that does not hold its cluster yet.
    return PackPlan.of_whole_samples(*fit_rows(lengths, max_seq_len, window, strategy == "bfd", clusters, MAX_SKIPS,
                                              strict), lengths)


def _repack_tails(plans: list[PackPlan], members: list[np.ndarray], lengths, max_seq_len, strategy, window
                  ) -> PackPlan:
    """Each cluster's least-filled row, unless over TAIL_FILL full, gives its samples back; those are packed
    together at the end.

    Packing every cluster on its own leaves up to one part-filled row per cluster
    (about 4% more rows than the lower bound for 10 clusters of ~50 samples); pooling
    those tails brings the row count back to the ungrouped packer's, at the price of
    at most about one mixed-cluster row per cluster (counted in the manifest).
    """
    kept_plans, kept_members, pool = [], [], []
    for plan, m in zip(plans, members, strict=True):
        if plan.num_rows == 0:
            continue
        tail = int(np.argmin(plan.row_lengths()))
        if plan.row_lengths()[tail] > TAIL_FILL * max_seq_len:  # full enough: the cluster keeps it
            kept_plans.append(plan)
            kept_members.append(m)
            continue
        lo, hi = plan.row_offsets[tail], plan.row_offsets[tail + 1]
        pool.append(m[plan.piece_sample[lo:hi]])
        keep = np.ones(len(plan.piece_sample), dtype=bool)
        keep[lo:hi] = False
        counts = np.delete(np.diff(plan.row_offsets), tail)
        kept_plans.append(PackPlan(plan.piece_sample[keep], plan.piece_start[keep], plan.piece_end[keep],
                                   np.concatenate(([0], np.cumsum(counts))).astype(np.int64)))
        kept_members.append(m)
    if pool:
        pooled = np.concatenate(pool)
        kept_plans.append(plan_pack(lengths[pooled], max_seq_len, strategy, window))
        kept_members.append(pooled)
    return concat_plans(kept_plans, kept_members)


def _round_robin(clusters: np.ndarray) -> np.ndarray:
    """Sample order that cycles over the clusters in label order, each cluster's samples in input order."""
    by_cluster = np.argsort(clusters, kind="stable")
    sorted_labels = clusters[by_cluster]
    group_start = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(clusters), dtype=np.int64)
    rank[by_cluster] = np.arange(len(clusters)) - group_start
    return np.lexsort((clusters, rank))


# ---------------------------------------------------------------- statistics


def composition_stats(plan: PackPlan, clusters: np.ndarray | None = None,
                      multi_turn: np.ndarray | None = None) -> dict:
    """What the rows are made of, for a manifest: clusters per packed row and where multi-turn samples went.

    A packed row holds >= 2 distinct samples. Cluster keys need ``clusters``,
    multi-turn keys ``multi_turn`` (both indexed like the plan's samples).
    """
    piece_row = np.repeat(np.arange(plan.num_rows, dtype=np.int64), np.diff(plan.row_offsets))
    num_samples = int(plan.piece_sample.max()) + 1 if len(plan.piece_sample) else 0
    keys = np.unique(piece_row * max(num_samples, 1) + plan.piece_sample)
    rows, samples = keys // max(num_samples, 1), keys % max(num_samples, 1)
    samples_per_row = np.bincount(rows, minlength=plan.num_rows)
    packed = samples_per_row >= 2
    stats = {"num_rows": plan.num_rows, "num_packed_rows": int(packed.sum()),
             "mean_samples_per_packed_row": float(samples_per_row[packed].mean()) if packed.any() else 0.0}
    if clusters is not None:
        clusters = _check_clusters(clusters, len(clusters), "related")
        _check_covers(clusters, num_samples, "clusters")
        labels, dense = np.unique(clusters[samples], return_inverse=True)
        row_clusters = np.unique(rows * max(len(labels), 1) + dense) // max(len(labels), 1)
        clusters_per_row = np.bincount(row_clusters, minlength=plan.num_rows)
        num_packed = max(int(packed.sum()), 1)
        num_mixed = int((clusters_per_row[packed] >= 2).sum())
        num_repeated = int((clusters_per_row[packed] < samples_per_row[packed]).sum())
        stats.update({
            "num_clusters_used": len(labels),
            "num_mixed_cluster_rows": num_mixed,
            "num_repeated_cluster_rows": num_repeated,
            "mean_clusters_per_packed_row": float(clusters_per_row[packed].mean()) if packed.any() else 0.0,
            "mixed_cluster_row_fraction": num_mixed / num_packed,
            "repeated_cluster_row_fraction": num_repeated / num_packed,
        })
    if multi_turn is not None:
        multi_turn = _check_multi_turn(multi_turn, len(multi_turn))
        _check_covers(multi_turn, num_samples, "multi_turn")
        multi_rows = np.zeros(plan.num_rows, dtype=bool)
        multi_rows[rows[multi_turn[samples]]] = True
        stats.update({
            "num_single_turn_samples": int((~multi_turn).sum()),
            "num_multi_turn_samples": int(multi_turn.sum()),
            "num_multi_turn_rows": int(multi_rows.sum()),
            # 0 when multi_turn was given to plan_composed: those samples are alone in their rows.
            "num_packed_rows_with_multi_turn": int((multi_rows & packed).sum()),
        })
    return stats


def _check_covers(values: np.ndarray, num_samples: int, name: str) -> None:
    if len(values) < num_samples:
        raise ValueError(f"plan refers to sample {num_samples - 1} but {name} has {len(values)} entries; "
                         "pass one entry per sample the plan was made from")
