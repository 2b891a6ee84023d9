"""Which rows each rank trains on at each step (pure NumPy): the data order that makes resume exact.

Packed arms are written longest-first within windows, so an epoch read in file
order would be biased. Each epoch instead reads a permutation of the row indices
drawn from (seed, epoch) alone, so any rank can recompute any step's rows from
the step number: resuming at step s trains exactly the rows a run that never
stopped would have trained. The permutation is trimmed to whole optimizer steps
(the last `num_rows % rows_per_step` rows of that epoch's order sit out, a
different few each epoch), so every rank takes the same number of steps.

Inside a step of R = world_size * micro_batch_size * grad_accum rows, micro-batch
m of rank r holds positions (m * world_size + r) * micro_batch_size onwards.
With 10 rows, 2 ranks, micro-batch 1, accumulation 2 (R = 4, 2 steps per epoch):

    order = epoch_order(10, seed=0, epoch=0)      [4, 6, 2, 7, 3, 5, 9, 0, 8, 1]
    step_rows(order, 0, 0, 2, 1, 2)               [array([4]), array([2])]   (step 0, rank 0)
    step_rows(order, 0, 1, 2, 1, 2)               [array([6]), array([7])]   (step 0, rank 1)
    step_rows(order, 1, 0, 2, 1, 2)               [array([3]), array([9])]   (step 1, rank 0)
    rows 8 and 1 are not trained in this epoch.
"""

import numpy as np


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of 0..num_rows-1 that depends only on (seed, epoch)."""
    if num_rows < 0 or seed < 0 or epoch < 0:
        raise ValueError(f"num_rows, seed and epoch must be >= 0, got {num_rows}, {seed}, {epoch}")
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def step_rows(order: np.ndarray, step_in_epoch: int, rank: int, world_size: int, micro_batch_size: int,
              grad_accum: int) -> list[np.ndarray]:
    """The row indices of this rank's `grad_accum` micro-batches in step `step_in_epoch` of the epoch."""
    rows_per_step = world_size * micro_batch_size * grad_accum
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if step_in_epoch < 0 or (step_in_epoch + 1) * rows_per_step > len(order):
        raise ValueError(f"step {step_in_epoch} is past the {len(order) // rows_per_step} whole steps of "
                         f"{rows_per_step} rows in {len(order)} rows")
    base = step_in_epoch * rows_per_step
    out = []
    for m in range(grad_accum):
        start = base + (m * world_size + rank) * micro_batch_size
        out.append(order[start:start + micro_batch_size])
    return out


def balanced_step_rows(order: np.ndarray, step_in_epoch: int, rank: int, world_size: int,
                       micro_batch_size: int, grad_accum: int, row_tokens: np.ndarray) -> list[np.ndarray]:
    """step_rows with the step's rows dealt so every rank gets about the same number of tokens.

    The same rows as step_rows for the step as a whole (so the epoch, resume and
    row accounting are unchanged), re-dealt: sorted longest first (ties by row
    index), dealt snake-wise over the ranks (0, 1, .., W-1, W-1, .., 0) so each
    rank gets the same number of rows and close token totals, and each rank's rows,
    still longest first, cut into its micro-batches, so rows of similar length
    share a micro-batch (less padding in the padding arm). `row_tokens[i]` is row
    i's real token count (the manifest's `num_tokens` column).
    """
    rows = np.concatenate([m for r in range(world_size)
                           for m in step_rows(order, step_in_epoch, r, world_size, micro_batch_size, grad_accum)])
    rows = rows[np.lexsort((rows, -np.asarray(row_tokens)[rows]))]
    lap = np.arange(len(rows)) % (2 * world_size)
    owner = np.where(lap < world_size, lap, 2 * world_size - 1 - lap)
    mine = rows[owner == rank]
    return [mine[m * micro_batch_size:(m + 1) * micro_batch_size] for m in range(grad_accum)]
