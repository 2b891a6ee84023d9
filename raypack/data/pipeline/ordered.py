"""How rows keep their order between the stages of `raypack prepare`: the Ray Data setting and the Parquet writer.

Every stage's output is keyed by (key, piece) (raypack.data.pipeline.read), and two of them are read by their
order as well: the tokenized cache (a split's samples are addressed by their ordinal in it) and the content
vectors (k-means fits on evenly spaced vectors). So each stage runs

- under `input_order()`: Ray Data's `preserve_order`, so blocks leave every operator in input order; it is set
  by each stage for its own datasets, also when the tokenized cache is reused in a new process (where Ray's
  default, False, would otherwise apply), and restored afterwards;
- and writes Parquet with `write_in_order` (OrderedParquetSink): each write task's blocks, in order, into one
  file named by the task's index, each record batch a row group, by one thread.

Ray's own `Dataset.write_parquet` is not used: Ray 2.60's Parquet sink hands a task's blocks to
`pyarrow.dataset.write_dataset(use_threads=True)` without pyarrow's `preserve_order`, so when the writing
worker's pyarrow has more than one thread (OMP_NUM_THREADS > 1: an image that sets it, or a write task given 2+
CPUs) the record batches of a block made of many chunks (many small tokenizer batches) land out of order: on this
machine's 2 cores, a 128-chunk table came back out of order in 10 of 20 writes, and a Ray Data write of
313-chunk blocks in 10 of 10 with OMP_NUM_THREADS=4. Readers check the order anyway
(raypack.data.pipeline.cache.read_cache_index) or join by key (raypack.data.pipeline.group.load_groups).
"""

from __future__ import annotations

from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data


@contextmanager
def input_order(block_mb: int):
    """Ray Data datasets created inside keep their input order and aim at blocks of `block_mb` MiB (small blocks
    spread one large file over every actor); the previous settings come back on exit."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.target_max_block_size
    ctx.execution_options.preserve_order = True
    ctx.target_max_block_size = block_mb * 2**20
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.target_max_block_size = saved


def write_in_order(table: pa.Table, where) -> None:
    """Write the table's rows in their order: each non-empty record batch a row group, one after the other."""
    with pq.ParquetWriter(where, table.schema) as writer:
        for batch in table.to_batches():
            if batch.num_rows:
                writer.write_batch(batch)


class OrderedParquetSink(ray.data.BlockBasedFileDatasink):
    """Ray Data sink: a write task's blocks, in order, into one Parquet file `<write uuid>_<task index>.parquet`."""

    def __init__(self, path: str):
        super().__init__(path, file_format="parquet")

    def write_block_to_file(self, block, file) -> None:
        write_in_order(block.to_arrow(), file)


def write_parquet_in_order(ds: ray.data.Dataset, folder: str, num_cpus: float) -> None:
    """ds into folder/*.parquet, rows in the dataset's order (file names sort as the write tasks' indices)."""
    ds.write_datasink(OrderedParquetSink(folder), ray_remote_args={"num_cpus": num_cpus})
