"""Content features of tokenized samples: hashed tf-idf sketches, k-means clusters, pack similarity (pure core).

What a sample is about is read from its token ids alone, so no tokenizer, model or
text is needed and every data worker can compute it on the samples it holds:

1. ``document_frequency(samples)``: how many samples contain each hashed term.
   Terms are the unigrams and bigrams of token ids, hashed with a fixed 64-bit
   mixer (splitmix64's finaliser, the same in every process; Python's ``hash()``
   is salted per process) into ``num_buckets`` buckets. The caller sums the counts
   of its batches.
2. ``tfidf_vectors(samples, df, num_docs)``: per term ``(1 + log tf) * idf`` with
   ``idf = log((1 + N) / (1 + df)) + 1``, then a signed random projection of the
   buckets to ``dim`` coordinates (bucket ``b`` adds to coordinate
   ``h1(b) % dim`` with sign ``±1`` from ``h2(b)``, both seeded) and L2
   normalisation. The projection keeps dot products in expectation, so the cosine
   of two sketches estimates the cosine of their tf-idf vectors.
3. ``fit_kmeans`` / ``assign_clusters``: spherical (cosine) mini-batch k-means
   with k-means++ initialisation, deterministic by seed.
4. ``pack_similarity(vectors, plan)``: mean cosine of sample pairs that share a row
   against pairs in different rows, which says whether a plan grouped related samples.

Data that carries its own topic (a record's ``topic`` field) needs none of this:
``topic_clusters`` labels each sample by its topic (``pack.group_backend: topic``).

Example: two samples on one topic share terms, the third shares none.

>>> import numpy as np
>>> samples = [np.array([5, 6, 7, 8, 5, 6], dtype=np.int32), np.array([5, 6, 7, 9], dtype=np.int32),
...            np.array([40, 41, 42], dtype=np.int32)]
>>> df = document_frequency(samples)
>>> int(df.sum())  # distinct unigrams + bigrams per sample: 4 + 4, 4 + 3, 3 + 2
20
>>> vectors = tfidf_vectors(samples, df, num_docs=3, dim=64)
>>> bool(vectors[0] @ vectors[1] > 0.5), bool(abs(vectors[0] @ vectors[2]) < 0.3)
(True, True)
"""

import math

import numba
import numpy as np

from raypack.data.pack import PackPlan

NUM_BUCKETS = 2**20
NUM_INITS = 3  # k-means runs from different seeds; the best is kept
# Bigram keys are (a << 32) | b < 2**63 for token ids < 2**31; unigram keys get the top bit.
_UNIGRAM_TAG = np.uint64(1 << 63)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SIGN_SALT = np.uint64(0xD6E8FEB86659FD93)
_S27, _S30, _S31, _S32, _S63 = (np.uint64(s) for s in (27, 30, 31, 32, 63))


# ---------------------------------------------------------------- hashed terms


@numba.njit(cache=True)
def _mix(x):
    """splitmix64's finaliser: a bijection of uint64 whose output bits all depend on every input bit."""
    x = (x ^ (x >> _S30)) * _MIX_1
    x = (x ^ (x >> _S27)) * _MIX_2
    return x ^ (x >> _S31)


@numba.njit(cache=True)
def _term_buckets(tokens, lo, hi, num_buckets, out):
    """Buckets of the unigrams then bigrams of tokens[lo:hi] into out; returns how many."""
    m = 0
    for i in range(lo, hi):
        out[m] = _mix(np.uint64(tokens[i]) | _UNIGRAM_TAG) % num_buckets
        m += 1
    for i in range(lo, hi - 1):
        key = (np.uint64(tokens[i]) << _S32) | np.uint64(tokens[i + 1])
        out[m] = _mix(key) % num_buckets
        m += 1
    return m


@numba.njit(cache=True)
def _df_kernel(tokens, offsets, num_buckets, terms, stamp, df):
    """df[b] += 1 once per sample whose terms hit bucket b (stamp[b] = last sample seen there)."""
    for d in range(len(offsets) - 1):
        m = _term_buckets(tokens, offsets[d], offsets[d + 1], np.uint64(num_buckets), terms)
        for j in range(m):
            b = terms[j]
            if stamp[b] != d:
                stamp[b] = d
                df[b] += 1


@numba.njit(cache=True)
def _tfidf_kernel(tokens, offsets, df, num_docs, seed_key, terms, counts, touched, row, out):
    """One sketch per sample: counts[] holds tf while a sample is read and is zero again after."""
    num_buckets = len(df)
    dim = out.shape[1]
    log_n = math.log(1.0 + num_docs)
    for d in range(len(offsets) - 1):
        m = _term_buckets(tokens, offsets[d], offsets[d + 1], np.uint64(num_buckets), terms)
        distinct = 0
        for j in range(m):
            b = terms[j]
            if counts[b] == 0:
                touched[distinct] = b
                distinct += 1
            counts[b] += 1
        row[:] = 0.0
        for j in range(distinct):
            b = touched[j]
            tf = counts[b]
            weight = log_n - math.log(1.0 + df[b]) + 1.0
            if tf > 1:  # most terms occur once, and 1 + log 1 = 1
                weight *= 1.0 + math.log(tf)
            counts[b] = 0
            h = _mix(np.uint64(b) ^ seed_key)
            index = np.int64(h % np.uint64(dim))
            if (_mix(h ^ _SIGN_SALT) >> _S63) == np.uint64(1):
                row[index] -= weight
            else:
                row[index] += weight
        norm = 0.0
        for i in range(dim):
            norm += row[i] * row[i]
        norm = math.sqrt(norm)
        if norm > 0.0:
            for i in range(dim):
                out[d, i] = row[i] / norm


def _flatten(samples) -> tuple[np.ndarray, np.ndarray]:
    """All token ids in one int64 array, and the samples' offsets into it."""
    arrays = [np.asarray(s) for s in samples]
    for i, a in enumerate(arrays):
        if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"sample {i} must be a 1-D array of token ids, got shape {a.shape} dtype {a.dtype}")
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    tokens = np.concatenate(arrays).astype(np.int64, copy=False) if arrays else np.zeros(0, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**31):
        raise ValueError("token ids must lie in [0, 2**31); pass the tokenizer's input_ids")
    return tokens, offsets


def _term_scratch(offsets: np.ndarray) -> np.ndarray:
    longest = int(np.diff(offsets).max()) if len(offsets) > 1 else 0
    return np.empty(max(2 * longest, 1), dtype=np.uint64)


def document_frequency(samples: list[np.ndarray], num_buckets: int = NUM_BUCKETS) -> np.ndarray:
    """int64 ``(num_buckets,)``: how many of ``samples`` contain a term hashed to each bucket."""
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer)) or num_buckets < 1:
        raise ValueError(f"num_buckets must be an int >= 1, got {num_buckets!r}")
    tokens, offsets = _flatten(samples)
    df = np.zeros(int(num_buckets), dtype=np.int64)
    stamp = np.full(int(num_buckets), -1, dtype=np.int64)
    _df_kernel(tokens, offsets, int(num_buckets), _term_scratch(offsets), stamp, df)
    return df


def tfidf_vectors(samples: list[np.ndarray], df: np.ndarray, num_docs: int, dim: int = 256,
                  seed: int = 0) -> np.ndarray:
    """float32 ``(len(samples), dim)`` unit rows: signed random projections of the tf-idf vectors.

    ``df`` and ``num_docs`` describe the whole corpus (summed ``document_frequency``
    of every batch, and the number of samples); an empty sample gets a zero row.
    """
    df = np.asarray(df)
    if df.ndim != 1 or df.size == 0 or not np.issubdtype(df.dtype, np.integer):
        raise ValueError(f"df must be the 1-D integer array from document_frequency, got shape {df.shape}")
    for name, value, least in (("num_docs", num_docs, 1), ("dim", dim, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    tokens, offsets = _flatten(samples)
    terms = _term_scratch(offsets)
    out = np.zeros((len(offsets) - 1, int(dim)), dtype=np.float32)
    counts = np.zeros(len(df), dtype=np.int32)
    seed_key = _mix(np.uint64(seed) + _GOLDEN)
    _tfidf_kernel(tokens, offsets, df.astype(np.int64, copy=False), int(num_docs), seed_key, terms, counts,
                  np.empty(len(terms), dtype=np.uint64), np.empty(int(dim), dtype=np.float64), out)
    return out


# ---------------------------------------------------------------- clusters


def auto_num_clusters(num_samples: int) -> int:
    """Default k: ``clip(round(sqrt(num_samples / 20)), 2, 256)``.

    About 20 * k samples per cluster on average, so a cluster is large enough to
    fill rows of related samples (20k samples: 32 clusters; 326k: 128; 1.2M: 245).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 0:
        raise ValueError(f"num_samples must be an int >= 0, got {num_samples!r}")
    return int(np.clip(round(math.sqrt(num_samples / 20)), 2, 256))


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0).astype(np.float32)


def _check_vectors(vectors) -> np.ndarray:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not np.issubdtype(vectors.dtype, np.floating):
        raise ValueError(f"vectors must be a non-empty 2-D float array (samples x dim), got shape {vectors.shape}")
    return vectors


def resolve_num_clusters(num_clusters: int, num_samples: int) -> int:
    """The k to fit: ``num_clusters``, or ``auto_num_clusters`` when 0, never more than the samples (min 1)."""
    return min(num_clusters or auto_num_clusters(num_samples), max(num_samples, 1))


def tfidf_clusters(samples: list[np.ndarray], num_clusters: int, seed: int = 0, dim: int = 256,
                   max_fit_samples: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """In one process: TF-IDF vectors of the samples, their k-means clusters and the k used.

    The document frequencies come from the samples themselves; k is
    ``resolve_num_clusters(num_clusters, len(samples))``.
    """
    df = document_frequency(samples)
    vectors = tfidf_vectors(samples, df, len(samples), dim=dim, seed=seed)
    k = resolve_num_clusters(num_clusters, len(samples))
    centroids = fit_kmeans(vectors, k, seed=seed, max_samples=max_fit_samples)
    return vectors, assign_clusters(vectors, centroids), k


def fit_kmeans(vectors: np.ndarray, k: int, seed: int = 0, iters: int = 50, batch_size: int = 2048,
               max_samples: int = 0) -> np.ndarray:
    """``(k, dim)`` float32 unit centroids of spherical mini-batch k-means; k is reduced to n if n < k.

    With ``max_samples > 0`` only that many evenly spaced vectors (every
    ``ceil(n / max_samples)``-th) are used.

    Greedy k-means++ (probability of a point proportional to ``1 - cosine`` to its
    nearest centroid, which is half its squared distance on the unit sphere) seeds
    the centroids from ``max(3 * batch_size, 10 * k)`` random samples; then ``iters``
    mini-batches each move a centroid towards the mean of its batch members with
    step ``members / members seen so far`` (Sculley 2010) and renormalise it.
    This runs ``NUM_INITS`` times and keeps the centroids with the highest mean
    cosine of the seeding samples to their nearest centroid: k-means stays in the
    local optimum its seeds lead to, and one run in a few merges two true clusters.
    """
    if max_samples:
        vectors = vectors[::max(1, -(-len(vectors) // max_samples))]
    vectors = _check_vectors(vectors)
    for name, value in (("k", k), ("iters", iters), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    n = len(vectors)
    k = min(int(k), n)
    rng = np.random.default_rng(seed)
    init = _unit(vectors[np.sort(rng.choice(n, size=min(n, max(3 * batch_size, 10 * k)), replace=False))])
    best, best_score = None, -np.inf
    for _ in range(NUM_INITS):
        centroids = _mini_batch_kmeans(vectors, _kmeans_plus_plus(init, k, rng), rng, iters, batch_size)
        score = float(np.max(init @ centroids.T, axis=1).mean())
        if score > best_score:
            best, best_score = centroids, score
    return best.astype(np.float32)


def _mini_batch_kmeans(vectors, centroids, rng, iters, batch_size) -> np.ndarray:
    k, n = len(centroids), len(vectors)
    seen = np.zeros(k, dtype=np.float64)
    for _ in range(iters):
        batch = _unit(vectors[np.sort(rng.choice(n, size=min(n, batch_size), replace=False))])
        labels = np.argmax(batch @ centroids.T, axis=1)
        members = np.bincount(labels, minlength=k).astype(np.float64)
        sums = np.zeros_like(centroids, dtype=np.float64)
        np.add.at(sums, labels, batch)
        seen += members
        moved = members > 0
        step = (members[moved] / seen[moved])[:, None]
        means = sums[moved] / members[moved][:, None]
        centroids[moved] = _unit((1 - step) * centroids[moved] + step * means)
    return centroids


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeds from unit rows (as scikit-learn's default).

    Each step draws ``2 + log(k)`` candidates with probability proportional to
    ``1 - cosine`` to the nearest seed and keeps the one that lowers the total most,
    which avoids most of the seedings where two seeds land in one true cluster.
    """
    num_candidates = 2 + int(math.log(k))
    chosen = [int(rng.integers(len(points)))]
    best = np.minimum(1.0 - (points @ points[chosen[0]]).astype(np.float64), 1.0).clip(0.0)
    for _ in range(1, k):
        total = best.sum()
        if total > 0:
            draws = rng.random(num_candidates) * total
            candidates = np.minimum(np.searchsorted(np.cumsum(best), draws, side="right"), len(points) - 1)
        else:  # every point coincides with a seed: take any other point
            candidates = rng.choice(np.setdiff1d(np.arange(len(points)), chosen), size=1)
        distance = 1.0 - (points[candidates] @ points.T).astype(np.float64)
        totals = np.minimum(best[None, :], distance.clip(0.0)).sum(axis=1)
        pick = int(np.argmin(totals))
        chosen.append(int(candidates[pick]))
        best = np.minimum(best, distance[pick].clip(0.0))
    return points[chosen].copy()


def assign_clusters(vectors: np.ndarray, centroids: np.ndarray, batch: int = 65536) -> np.ndarray:
    """int32 index of each vector's nearest centroid by cosine (ties: the lower index)."""
    vectors = _check_vectors(vectors)
    centroids = _check_vectors(centroids)
    if centroids.shape[1] != vectors.shape[1]:
        raise ValueError(f"centroids have dim {centroids.shape[1]} but vectors have dim {vectors.shape[1]}; "
                         "fit the centroids on vectors of the same dim")
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    unit_centroids = _unit(centroids)
    out = np.empty(len(vectors), dtype=np.int32)
    for lo in range(0, len(vectors), batch):
        # A vector's own norm scales all its cosines alike, so the argmax needs no normalising.
        out[lo: lo + batch] = np.argmax(np.asarray(vectors[lo: lo + batch], np.float32) @ unit_centroids.T, axis=1)
    return out


def topic_clusters(topics, sources=None) -> tuple[np.ndarray, list[str]]:
    """Cluster labels from the samples' own topics: the dense index of each topic among the sorted distinct
    topics, and those topics. ValueError when a sample has no topic (""), naming how many and, from
    ``sources`` (one "path:row" per sample) when given, the first.

    >>> labels, topics = topic_clusters(["owl", "cat", "owl"])
    >>> labels.tolist(), topics
    ([1, 0, 1], ['cat', 'owl'])
    """
    topics = np.asarray(list(topics), dtype=object)
    missing = np.flatnonzero(topics == "")
    if len(missing):
        where = f" (the first: {sources[int(missing[0])]})" if sources is not None else ""
        raise ValueError(f"pack.group_backend=topic: {len(missing)} of {len(topics)} samples have no topic{where}; "
                         "give every record a string 'topic' field, or group data without topics by content "
                         "with pack.group_backend=tfidf or embedding")
    distinct, labels = np.unique(topics.astype(str), return_inverse=True) if len(topics) else ([], np.zeros(0))
    return np.asarray(labels, dtype=np.int64).reshape(-1), [str(t) for t in distinct]


# ---------------------------------------------------------------- similarity inside packs


def pack_similarity(vectors: np.ndarray, plan: PackPlan, max_pairs: int = 20000, seed: int = 0) -> dict:
    """Mean cosine of distinct samples sharing a row (within) and of samples in different rows (across).

    ``vectors[i]`` is sample ``i`` of the plan. Within: up to ``max_pairs`` pairs
    drawn uniformly without replacement from all pairs of distinct samples that
    share a row. Across: as many pairs drawn uniformly from all pairs of distinct
    samples in different rows. Both are ``None`` when the plan has no pair in a
    row (padding, or one sample per row), and across is ``None`` with one row.
    """
    vectors = _check_vectors(vectors)
    if isinstance(max_pairs, bool) or not isinstance(max_pairs, (int, np.integer)) or max_pairs < 1:
        raise ValueError(f"max_pairs must be an int >= 1, got {max_pairs!r}")
    if len(plan.piece_sample) and plan.piece_sample.max() >= len(vectors):
        raise ValueError(f"plan refers to sample {int(plan.piece_sample.max())} but only {len(vectors)} "
                         "vectors were given; pass one vector per sample the plan was made from")
    rng = np.random.default_rng(seed)
    rows, samples = _distinct_row_samples(plan)
    first, second = _pairs_within(rows, rng, max_pairs)
    result = {"within_pack_cosine": None, "across_pack_cosine": None, "num_pairs": len(first)}
    if len(first) == 0:
        return result
    result["within_pack_cosine"] = _mean_cosine(vectors, samples[first], samples[second])
    across = _pairs_across(rows, samples, rng, len(first))
    if across is not None:
        result["across_pack_cosine"] = _mean_cosine(vectors, *across)
    return result


def _distinct_row_samples(plan: PackPlan) -> tuple[np.ndarray, np.ndarray]:
    """(row, sample) of every distinct sample in every row, sorted by row then sample."""
    piece_row = np.repeat(np.arange(plan.num_rows, dtype=np.int64), np.diff(plan.row_offsets))
    num_samples = int(plan.piece_sample.max()) + 1 if len(plan.piece_sample) else 1
    keys = np.unique(piece_row * num_samples + plan.piece_sample)
    return keys // num_samples, keys % num_samples


def _pairs_within(rows: np.ndarray, rng: np.random.Generator, max_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """Entry indices (i < j, same row) of up to max_pairs same-row pairs, uniform without replacement."""
    row_starts = np.flatnonzero(np.diff(rows, prepend=-1)) if len(rows) else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.append(row_starts, len(rows)))
    pairs_per_row = sizes * (sizes - 1) // 2
    total = int(pairs_per_row.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    picks = np.arange(total) if total <= max_pairs else np.sort(rng.choice(total, size=max_pairs, replace=False))
    ends = np.cumsum(pairs_per_row)
    row = np.searchsorted(ends, picks, side="right")
    local = picks - (ends[row] - pairs_per_row[row])
    # Pair `local` of a row is (i, j), i < j, numbered j * (j - 1) / 2 + i.
    j = np.floor((1 + np.sqrt(1 + 8 * local.astype(np.float64))) / 2).astype(np.int64)
    j -= j * (j - 1) // 2 > local  # float rounding, at most one off either way
    j += (j + 1) * j // 2 <= local
    i = local - j * (j - 1) // 2
    return row_starts[row] + i, row_starts[row] + j


def _pairs_across(rows, samples, rng, count) -> tuple[np.ndarray, np.ndarray] | None:
    """Samples of `count` pairs uniform over distinct samples in different rows, or None if none exist."""
    n = len(rows)
    row_starts = np.flatnonzero(np.diff(rows, prepend=-1))
    sizes = np.diff(np.append(row_starts, n))
    entry_row = np.repeat(np.arange(len(sizes)), sizes)
    weight = (n - sizes[entry_row]).astype(np.float64)  # partners outside the entry's row
    if weight.sum() == 0:
        return None
    cumulative = np.cumsum(weight)
    first, second = [], []
    got = 0
    for _ in range(1000):  # a split sample can sit in two rows; such pairs are redrawn
        if got >= count:
            break
        a = np.minimum(np.searchsorted(cumulative, rng.random(count) * cumulative[-1], side="right"), n - 1)
        start, size = row_starts[entry_row[a]], sizes[entry_row[a]]
        b = (rng.random(count) * (n - size)).astype(np.int64)
        b = np.where(b >= start, b + size, b)  # skip over a's own row
        keep = samples[a] != samples[b]
        first.append(samples[a][keep])
        second.append(samples[b][keep])
        got += int(keep.sum())
    if got == 0:
        return None
    return np.concatenate(first)[:count], np.concatenate(second)[:count]


def _mean_cosine(vectors: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    va = np.asarray(vectors[a], dtype=np.float64)
    vb = np.asarray(vectors[b], dtype=np.float64)
    norms = np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1)
    dots = np.einsum("ij,ij->i", va, vb)
    return float(np.mean(np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)))
