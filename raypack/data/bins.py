"""Bin-packing kernels: the sorting, segment trees and row bookkeeping behind the fit packers (pure core).

``fit_rows`` plans greedy (first-fit decreasing) and bfd (best-fit decreasing)
rows from lengths alone, for ``raypack.data.pack.plan_pack`` and, with a cluster
per sample that a row should not hold twice, for ``raypack.data.compose``'s
``unrelated`` grouping. It returns the samples in row order and the CSR offsets
of the rows:

>>> import numpy as np
>>> lengths = np.array([5, 5, 5, 2, 2, 1])
>>> fit_rows(lengths, 8, window=0, best_fit=True)
(array([0, 3, 5, 1, 4, 2]), array([0, 3, 5, 6]))
>>> fit_rows(lengths, 8, window=0, best_fit=True, clusters=np.array([0, 1, 0, 1, 0, 1]), max_skips=1000)
(array([0, 3, 1, 4, 2, 5]), array([0, 2, 4, 6]))

The rows are [0, 3, 5], [1, 4], [2]: sample 5 goes to the tightest row with
room. With clusters, row [0, 3] already holds cluster 1, so sample 5 (cluster 1)
goes on to row [2].

The kernels are numba-compiled and take every work array from the caller, so
that tracemalloc, which sees numpy's allocations but not numba's, measures the
planner's real peak memory. Two structures carry the search:

- a max segment tree over leaves (``tree_set``, ``tree_leftmost``,
  ``tree_next``): leaf ``i`` of ``tree`` is ``tree[len(tree) // 2 + i]``, an inner
  node holds the max of its two children, so the leftmost leaf with a value >= x
  is found in O(log n):

  >>> tree = np.zeros(2 * next_pow2(5), dtype=np.int32)
  >>> for leaf, room in enumerate([3, 7, 2, 7, 5]):
  ...     tree_set(tree, leaf, room)
  >>> int(tree_leftmost(tree, 6)), int(tree_next(tree, 6, 2)), int(tree_next(tree, 8, 0))
  (1, 3, -1)

- for best fit, FIFO queues of the open rows with equal room (``head``,
  ``tail``, ``nxt``; ``prv`` too when a row may leave from the middle), so that
  ties go to the row that reached that room first.
"""

import numba
import numpy as np

from raypack.config import STRATEGIES

# ---------------------------------------------------------------- input checks


def check_lengths(lengths) -> np.ndarray:
    """Sample lengths as a 1-D int64 array; ValueError unless every length is >= 1."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or (lengths.size and not np.issubdtype(lengths.dtype, np.integer)):
        raise ValueError(f"lengths must be a 1-D integer array, got shape {lengths.shape} dtype {lengths.dtype}")
    lengths = lengths.astype(np.int64, copy=False)
    if lengths.size and lengths.min() < 1:
        num_empty = int((lengths < 1).sum())
        raise ValueError(f"{num_empty} samples have length < 1; drop empty samples before packing")
    return lengths


def check_positive_int(name: str, value) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def check_fits(lengths: np.ndarray, max_seq_len: int, strategy: str) -> None:
    """ValueError when a sample is longer than ``max_seq_len`` (for the strategies that never split one)."""
    over = lengths > max_seq_len
    if over.any():
        raise ValueError(
            f"{int(over.sum())} samples are longer than max_seq_len={max_seq_len} (longest: "
            f"{int(lengths.max())} tokens); strategy {strategy!r} never splits a sample, so apply an "
            "over-length policy (truncate, drop or split) when tokenizing, or use strategy 'random'"
        )


def check_plan_inputs(lengths, max_seq_len, strategy: str, window) -> tuple[np.ndarray, int, int]:
    """The checks every planner makes: a known strategy, lengths >= 1, max_seq_len >= 1, window >= 0 and,
    unless ``strategy`` is ``random``, every sample fitting a row. Returns (lengths, max_seq_len, window)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; use one of {STRATEGIES}")
    lengths = check_lengths(lengths)
    max_seq_len = check_positive_int("max_seq_len", max_seq_len)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0 = plan all samples at once), got {window!r}")
    if strategy != "random":
        check_fits(lengths, max_seq_len, strategy)
    return lengths, max_seq_len, int(window)


# ---------------------------------------------------------------- first fit and best fit


def fit_rows(lengths: np.ndarray, max_seq_len: int, window: int, best_fit: bool,
             clusters: np.ndarray | None = None, max_skips: int = 0, strict: bool = False
             ) -> tuple[np.ndarray, np.ndarray]:
    """First-fit (``best_fit=False``) or best-fit decreasing rows of whole samples, each window on its own.

    ``lengths`` are checked (``check_lengths``) and each ``<= max_seq_len``;
    ``window`` samples are planned together (0: all). Each window's samples are
    taken longest first (stable) and each goes to the first row (first fit) or
    the row with the least room (best fit; ties: the row that reached that room
    first) among the rows it fits, else to a new row. With ``clusters`` (one int
    per sample), a sample skips the fitting rows that already hold a sample of its
    cluster, up to ``max_skips`` of them; when none is left it takes the row the
    plain rule picks, or with ``strict`` a new row (so no row holds a cluster
    twice). Returns ``(piece_sample, row_offsets)``: the samples in row
    order (a row keeps its insertion order), row ``r`` holding
    ``piece_sample[row_offsets[r]:row_offsets[r + 1]]``; see the module docstring.
    """
    n = len(lengths)
    win = max(min(window, n) if window > 0 else n, 1)
    piece_sample = np.empty(n, dtype=np.int64)
    row_offsets = np.empty(n + 1, dtype=np.int64)
    order = np.empty(n, dtype=np.int64)
    row_of = np.empty(n, dtype=np.int64)
    counts = np.empty(max(max_seq_len + 1, win), dtype=np.int64)
    dense = table = None
    num_clusters, row_links = 0, 1
    if clusters is not None:
        labels, dense = np.unique(clusters, return_inverse=True)
        dense, num_clusters = dense.astype(np.int64), max(len(labels), 1)
        # Which (row, cluster) pairs exist: open addressing, at most half full.
        table = np.empty(next_pow2(2 * win), dtype=np.int64)
        row_links = 3  # nxt, prv and room_of: a row may leave its queue from the middle
    if best_fit:
        # Tree over room sizes 0..max_seq_len; head and tail per room, then the links per row.
        tree = np.empty(2 * next_pow2(max_seq_len + 1), dtype=np.int32)
        chains = np.empty(2 * (max_seq_len + 1) + row_links * win, dtype=np.int64)
    else:
        # Tree over the rows of a window; a window never needs more rows than samples.
        tree = np.empty(2 * next_pow2(win), dtype=np.int32)
        chains = np.empty(0, dtype=np.int64)
    # Without clusters the kernels get None for them and numba compiles the cluster code out.
    num_rows = fit_windows(lengths, dense, num_clusters, max_seq_len, win, best_fit, max_skips, strict,
                           order, row_of, counts, table, tree, chains, piece_sample, row_offsets)
    return piece_sample, row_offsets[: num_rows + 1].copy()


@numba.njit(cache=True)
def fit_windows(lengths, clusters, num_clusters, max_seq_len, window, best_fit, max_skips, strict,
                order, row_of, counts, table, tree, chains, piece_sample, row_offsets):
    """``fit_rows``'s loop: sort, fit and emit each window; returns the total number of rows.

    ``clusters`` and ``table`` are None without clusters.
    """
    n = len(lengths)
    num_rows = 0
    size = max_seq_len + 1
    for lo in range(0, n, window):
        hi = min(lo + window, n)
        win = hi - lo
        sort_descending(lengths, lo, hi, max_seq_len, counts, order)
        if best_fit:
            head, tail, nxt = chains[:size], chains[size: 2 * size], chains[2 * size: 2 * size + win]
            if clusters is None:
                rows = best_fit_window(lengths, None, 0, order, lo, hi, max_seq_len, 0, False, None, 0, tree,
                                       head, tail, nxt, None, None, row_of)
            else:
                mask = next_pow2(2 * win) - 1
                table[: mask + 1] = -1
                prv = chains[2 * size + win: 2 * size + 2 * win]
                room_of = chains[2 * size + 2 * win: 2 * size + 3 * win]
                rows = best_fit_window(lengths, clusters, num_clusters, order, lo, hi, max_seq_len, max_skips, strict,
                                       table, mask, tree, head, tail, nxt, prv, room_of, row_of)
        elif clusters is None:
            rows = first_fit_window(lengths, None, 0, order, lo, hi, max_seq_len, 0, False, None, 0, tree, row_of)
        else:
            mask = next_pow2(2 * win) - 1
            table[: mask + 1] = -1
            rows = first_fit_window(lengths, clusters, num_clusters, order, lo, hi, max_seq_len, max_skips, strict,
                                    table, mask, tree, row_of)
        emit_rows(order, row_of, lo, hi, rows, num_rows, counts, piece_sample, row_offsets)
        num_rows += rows
    row_offsets[num_rows] = n
    return num_rows


@numba.njit(cache=True)
def first_fit_window(lengths, clusters, num_clusters, order, lo, hi, max_seq_len, max_skips, strict, table, mask,
                     tree, row_of):
    """First-fit rows for samples order[lo:hi]; row_of[k] is the window-local row of order[k]; returns the rows.

    Leaf r of the tree is the room left in row r. Rows not yet opened have full
    room, so the leftmost leaf that fits is either an open row or the next new
    row, and opening a row needs no special case. With clusters (None: without),
    the fitting rows are walked left to right (``tree_next``) past those holding
    the sample's cluster, whose (row, cluster) keys ``table`` holds; ``strict``
    opens a new row when that walk finds none.
    """
    tree[:] = max_seq_len
    rows = 0
    for k in range(lo, hi):
        sample = order[k]
        length = lengths[sample]
        row = -1
        if clusters is not None:
            start = 0
            skips = 0
            while start < rows and skips < max_skips:
                r = tree_next(tree, length, start)
                if r < 0 or r >= rows:  # only unopened rows are left
                    break
                if not table_has(table, mask, r * num_clusters + clusters[sample]):
                    row = r
                    break
                skips += 1
                start = r + 1
        if row < 0:
            # A new row's leaf has full room, so rows is the next row a strict sample may open.
            row = rows if clusters is not None and strict else tree_leftmost(tree, length)
        if row == rows:
            rows += 1
        row_of[k] = row
        tree_set(tree, row, tree[len(tree) // 2 + row] - length)
        if clusters is not None:
            table_add(table, mask, row * num_clusters + clusters[sample])
    return rows


@numba.njit(cache=True)
def best_fit_window(lengths, clusters, num_clusters, order, lo, hi, max_seq_len, max_skips, strict, table, mask,
                    tree, head, tail, nxt, prv, room_of, row_of):
    """Best-fit rows for samples order[lo:hi]; row_of[k] is the window-local row of order[k]; returns the rows.

    Leaf r of the tree is r while some open row has exactly r tokens of room, else 0,
    so the leftmost leaf >= length is the tightest room that fits. Rows with equal
    room queue FIFO: head[r], tail[r], nxt[row]. With clusters (None: without,
    and then ``prv`` and ``room_of`` are None too) the queues are doubly linked
    (prv[row], and room_of[row]), so that a row found past the rows holding the
    sample's cluster can leave from the middle and the others keep their order;
    ``strict`` opens a new row when the search finds none. The search and the
    queue updates are written out here, not called: through helper functions
    numba ran this loop 15-30% slower.
    """
    tree[:] = 0
    head[:] = -1
    tail[:] = -1
    rows = 0
    for k in range(lo, hi):
        sample = order[k]
        length = lengths[sample]
        row = -1
        if tree[1] >= length:
            if clusters is not None:
                # The tightest rooms first, each room's rows in queue order; skip rows holding the cluster.
                cluster = clusters[sample]
                skips = 0
                room = tree_next(tree, length, length)
                while room >= 0 and skips < max_skips:
                    r = head[room]
                    while r != -1 and skips < max_skips:
                        if not table_has(table, mask, r * num_clusters + cluster):
                            row = r
                            break
                        skips += 1
                        r = nxt[r]
                    if row >= 0:
                        break
                    room = tree_next(tree, length, room + 1)
            if row < 0 and not (clusters is not None and strict):
                room = tree_leftmost(tree, length)
                row = head[room]
            if row >= 0:  # else strict, and every row with room holds the cluster: a new row below
                if clusters is None:
                    # The row is its queue's head.
                    head[room] = nxt[row]
                    if head[room] == -1:
                        tail[room] = -1
                else:
                    room = room_of[row]
                    if prv[row] == -1:
                        head[room] = nxt[row]
                    else:
                        nxt[prv[row]] = nxt[row]
                    if nxt[row] == -1:
                        tail[room] = prv[row]
                    else:
                        prv[nxt[row]] = prv[row]
                if head[room] == -1:
                    tree_set(tree, room, 0)
        if row < 0:
            row = rows
            rows += 1
            room = max_seq_len
        row_of[k] = row
        room -= length
        if clusters is not None:
            table_add(table, mask, row * num_clusters + clusters[sample])
            room_of[row] = room
        if room > 0:  # full rows leave the tree for good; the others join the back of their room's queue
            nxt[row] = -1
            if clusters is not None:
                prv[row] = tail[room]
            if tail[room] == -1:
                head[room] = row
                tree_set(tree, room, room)
            else:
                nxt[tail[room]] = row
            tail[room] = row
    return rows


# ---------------------------------------------------------------- building blocks


@numba.njit(cache=True)
def next_pow2(x):
    """The smallest power of two >= x (1 for x <= 1)."""
    p = 1
    while p < x:
        p *= 2
    return p


@numba.njit(cache=True)
def sort_descending(lengths, lo, hi, max_seq_len, counts, order):
    """Stable counting sort of samples lo..hi by length, longest first, into order[lo:hi]."""
    counts[: max_seq_len + 1] = 0
    for i in range(lo, hi):
        counts[lengths[i]] += 1
    pos = lo
    for length in range(max_seq_len, -1, -1):
        c = counts[length]
        counts[length] = pos
        pos += c
    for i in range(lo, hi):
        length = lengths[i]
        order[counts[length]] = i
        counts[length] += 1


@numba.njit(cache=True)
def tree_set(tree, leaf, value):
    """Set a leaf of a max segment tree (leaves start at len(tree) // 2) and fix its ancestors."""
    i = len(tree) // 2 + leaf
    tree[i] = value
    i >>= 1
    while i >= 1:
        left = tree[2 * i]
        right = tree[2 * i + 1]
        tree[i] = left if left >= right else right
        i >>= 1


@numba.njit(cache=True)
def tree_leftmost(tree, value):
    """Index of the leftmost leaf >= value; the caller checks tree[1] >= value first."""
    size = len(tree) // 2
    i = 1
    while i < size:
        i = 2 * i if tree[2 * i] >= value else 2 * i + 1
    return i - size


@numba.njit(cache=True)
def tree_next(tree, value, start):
    """Index of the leftmost leaf >= start whose value is >= value, or -1."""
    size = len(tree) // 2
    if start >= size:
        return -1
    i = start + size
    while tree[i] < value:
        while i & 1:  # a right child: climb until the next subtree to the right exists
            i >>= 1
        if i == 0:
            return -1
        i += 1
    while i < size:
        i = 2 * i if tree[2 * i] >= value else 2 * i + 1
    return i - size


@numba.njit(cache=True)
def table_slot(table, mask, key):
    """Slot of key >= 0 in an open-addressing table of -1s: where it is, or the empty slot where it would go."""
    h = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    i = np.int64((h ^ (h >> np.uint64(29))) & np.uint64(mask))
    while table[i] != -1 and table[i] != key:
        i = (i + 1) & mask
    return i


@numba.njit(cache=True)
def table_has(table, mask, key):
    """Whether the table holds key."""
    return table[table_slot(table, mask, key)] == key


@numba.njit(cache=True)
def table_add(table, mask, key):
    """Add key to the table (which must keep an empty slot)."""
    table[table_slot(table, mask, key)] = key


@numba.njit(cache=True)
def emit_rows(order, row_of, lo, hi, rows, row_base, counts, piece_sample, row_offsets):
    """Write the window's samples in row order (stable: a row keeps its insertion order).

    Sample ``order[k]`` went to window-local row ``row_of[k]``; the window's rows
    become rows ``row_base..row_base + rows`` and its samples slots ``lo..hi`` of
    ``piece_sample``.
    """
    counts[:rows] = 0
    for k in range(lo, hi):
        counts[row_of[k]] += 1
    pos = lo  # one piece per sample, so this window's pieces occupy slots lo..hi
    for r in range(rows):
        row_offsets[row_base + r] = pos
        c = counts[r]
        counts[r] = pos
        pos += c
    for k in range(lo, hi):
        r = row_of[k]
        piece_sample[counts[r]] = order[k]
        counts[r] += 1
