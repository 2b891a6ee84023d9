"""The Ray Data pipeline (`raypack prepare`): the one package that imports ray.data, one module per stage.

It only maps the pure core (formats, tokenize, overlength, holdout, features, arm, pack, prepared) over a cluster:

    read.py      records of every source, keyed by (file index, row)           -> raw rows
    cache.py     normalise + tokenize in an actor pool                          -> the tokenized cache
    group.py     content vectors and k-means clusters (grouped arms only)       -> groups-<hash>/
    pack.py      plan each split from lengths, pack it in parallel              -> shards, flat/
    prepare.py   the stages in order, the validation hold-out, the manifests    -> {split: folder}

Each module's docstring states its stage's input and output (columns, keys, order). What the rest of raypack
uses is re-exported here:

    from raypack.data.pipeline import prepare, prepared_folders
    folders = prepare(load_config("jobs/quickstart.yaml"))   # {"val": ..., "padding": ..., ...}
"""

from raypack.data.holdout import KEY_ROW_BITS
from raypack.data.pipeline.prepare import prepare, prepared_folders
from raypack.data.pipeline.read import Inputs, read_sources, resolve_inputs

__all__ = ["KEY_ROW_BITS", "Inputs", "prepare", "prepared_folders", "read_sources", "resolve_inputs"]
