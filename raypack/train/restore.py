"""A checkpoint as a local folder for the ranks of one node (`restored`): read in place, or fetched from object
storage file by file, each node fetching only the files its own ranks load.

Pure of Ray and DeepSpeed: a checkpoint is anything with `.filesystem` (pyarrow.fs)
and `.path`, as Ray Train's Checkpoint has; `barrier` is a collective the caller
passes (raypack.train.loop.barrier). Used by the training loop on resume.

What a rank's `engine.load_checkpoint(folder, tag="ds")` reads (DeepSpeed 0.19,
raypack's data parallelism only: model-parallel rank 00, DP rank = world rank):

    ds/mp_rank_00_model_states.pt                      ZeRO 0-2: the module (stage 0: also the optimizer);
                                                       every rank reads it
    ds/zero_pp_rank_<r>_mp_rank_00_model_states.pt     ZeRO-3: rank r's module state; rank r's glob
                                                       (_get_all_ckpt_names) matches its own file only
    ds/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt
                                                       ZeRO 1-3 (bf16_ for bf16 at stage 0): rank r's
                                                       optimizer shard, read by rank r only
                                                       (_get_all_zero_checkpoint_state_dicts), unless
                                                       zero_optimization.elastic_checkpoint, where every
                                                       rank reads every shard: every_rank=True
    latest, zero_to_fp32.py, zero_to_torch.py          not read (the tag is given)
    position.json, config.json                         raypack's, small; the loop reads position.json

The rule: a file belongs to rank r when a part of its path (relative to the
checkpoint) carries rank r as `rank<r>`, `rank_<r>` or `rank-<r>`
(zero_pp_rank_3_..., rng-rank3.json, rng/rank_3.pt, offloaded_tensors/rank003/); a
number after `mp_rank` (the model-parallel rank) or `expp_rank` (an expert-parallel
rank) is not a data-parallel rank. Every other file is shared. Local rank 0 fetches
the shared files and every rank its own files, into one folder per node, so a node
reads from object storage its ranks' files and one copy of the shared ones: for 70B
at ZeRO-3 on 4 nodes of 8 GPUs, a quarter of the optimizer shards (~210 GB of
~840 GB) instead of all of them, fetched by 8 processes at once.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs

_RANK = re.compile(r"(?<![A-Za-z])(?<!mp_)(?<!expp_)rank[_-]?(\d+)")


def file_ranks(relative_path: str) -> set[int]:
    """The data-parallel ranks a checkpoint file belongs to (the module docstring's rule); empty when shared.

    >>> file_ranks("ds/zero_pp_rank_3_mp_rank_00_optim_states.pt"), file_ranks("ds/mp_rank_00_model_states.pt")
    ({3}, set())
    >>> file_ranks("rng-rank12.json"), file_ranks("position.json")
    ({12}, set())
    """
    return {int(n) for part in PurePosixPath(relative_path).parts for n in _RANK.findall(part)}


def files_to_fetch(relative_paths: list[str], rank: int, local_rank: int, every_rank: bool = False) -> list[str]:
    """The files this rank fetches into its node's folder: its own rank's, plus the shared ones on local rank 0.
    every_rank (DeepSpeed's elastic checkpoint: each rank reads every shard): local rank 0 fetches everything.

    >>> names = ["latest", "ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ...          "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    >>> files_to_fetch(names, rank=1, local_rank=0)
    ['latest', 'ds/mp_rank_00_model_states.pt', 'ds/zero_pp_rank_1_mp_rank_00_optim_states.pt']
    >>> files_to_fetch(names, rank=0, local_rank=1)
    ['ds/zero_pp_rank_0_mp_rank_00_optim_states.pt']
    """
    if every_rank:
        return list(relative_paths) if local_rank == 0 else []
    picked = []
    for path in relative_paths:
        ranks = file_ranks(path)
        if rank in ranks or (not ranks and local_rank == 0):
            picked.append(path)
    return picked


def checkpoint_files(filesystem: pafs.FileSystem, root: str) -> dict[str, int]:
    """Every file under `root` as {path relative to root: size in bytes}."""
    root = root.rstrip("/")
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    return {info.path[len(root) + 1:]: info.size for info in infos if info.type == pafs.FileType.File}


@contextmanager
def restored(checkpoint, rank: int, local_rank: int, barrier: Callable[[], None],
             every_rank: bool = False) -> Iterator[str]:
    """The checkpoint as a local folder for every rank of this node; `rank` is this rank's world rank.

    On a filesystem path (local or shared) it is read in place. From object storage,
    local rank 0 empties the node's folder; then, after `barrier` (a collective over
    every rank), each rank fetches the files files_to_fetch gives it; after a second
    barrier every rank of the node finds its files there, and the folder is removed
    once every rank has loaded (a third). Ray's `Checkpoint.as_directory` downloads the
    whole checkpoint, and shares a download only between processes that ask at the
    same moment.
    """
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path
        return
    key = hashlib.sha1(f"{checkpoint.filesystem.type_name}:{checkpoint.path}".encode()).hexdigest()[:16]
    local = Path(tempfile.gettempdir()) / f"raypack-restore-{key}"
    if local_rank == 0:
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
    barrier()
    files = checkpoint_files(checkpoint.filesystem, checkpoint.path)
    for name in files_to_fetch(sorted(files), rank, local_rank, every_rank):
        target = local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{checkpoint.path.rstrip('/')}/{name}", str(target),
                        source_filesystem=checkpoint.filesystem, destination_filesystem=pafs.LocalFileSystem())
    barrier()
    try:
        yield str(local)
    finally:
        barrier()
        if local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
