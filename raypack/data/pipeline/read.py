"""Stage 1 of `raypack prepare`, read: every input record as one row, with the key that fixes its place.

Input: the config's sources (`data.sources`: files, globs, folders, pyarrow URIs, `hf:` datasets), or with no
sources the synth settings. `resolve_inputs` lists them once on the driver; `read_sources` reads them as a Ray
Data dataset, one read task per file (a Hugging Face dataset's data file is fetched inside its task) or per
synth block.

Output: one row per input record, columns RAW_SCHEMA:

    key     int64   file index << KEY_ROW_BITS | row number (1-based: raypack.data.holdout.record_key); a
                    synthetic row's number. Unique per record and increasing in input order: every later
                    stage joins and orders by it, and the validation hold-out hashes it
    source  string  "path:row" (or "synth:preset:row"), for error messages and rejected.jsonl
    raw     string  the record as JSON text ("" for a record that could not be read)
    fmt     string  its format (detected per file unless data.format is set)
    reason, detail  why the record could not be read ("" when it could)

Order: each task yields its file's records in row order, in chunks of READ_CHUNK_ROWS rows; the tasks are in
input order (file index, synth block), which the next stage keeps (raypack.data.pipeline.cache).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import NamedTuple

import pyarrow as pa
import ray
import ray.data

from raypack.config import Config, DataConfig, SynthConfig
from raypack.data import formats, hub, synth
from raypack.data.holdout import record_key
from raypack.data.local import expand_sources

READ_CHUNK_ROWS = 1024
RAW_COLUMNS = ("key", "source", "raw", "fmt", "reason", "detail")
RAW_SCHEMA = pa.schema([("key", pa.int64()), ("source", pa.string()), ("raw", pa.string()), ("fmt", pa.string()),
                        ("reason", pa.string()), ("detail", pa.string())])


class Inputs(NamedTuple):
    """The input files, resolved once on the driver: what the read tasks open, and what identifies them."""

    paths: list[str]  # one read task each, in input order (the file index of the keys): local paths, URIs, and
    # hf://datasets/ORG/NAME@REVISION/PATH for a Hugging Face dataset's data files (raypack.data.hub)
    fingerprint: list  # for the tokenized cache's hash: files with size and mtime, a dataset's pinned revision
    notes: tuple[str, ...] = ()  # what prepare prints: a dataset's files of the split that are not read


def resolve_inputs(data: DataConfig, synth_cfg: SynthConfig) -> Inputs:
    """Every source in order: files, globs and folders expanded, an hf: dataset listed at a pinned revision (only
    its file list and card are fetched here); with no sources, the synth settings identify the input."""
    if not data.sources:  # what the samples are made of; where `raypack synth` writes them is not
        return Inputs([], ["synth", synth.identity(synth_cfg)])
    paths, fingerprint, notes = [], [], []
    for src in data.sources:
        if src.startswith("hf:"):
            files = hub.resolve(src, data.hf_split, _hf_root(data))
            if files.skipped:
                notes.append(f"{src} split {data.hf_split}: not reading {len(files.skipped)} files that are not "
                             f"{'/'.join(formats.EXTENSIONS)}: {', '.join(files.skipped[:5])}")
            paths += files.uris
            fingerprint.append(files.fingerprint)
        elif "://" in src:
            paths.append(src)
            fingerprint.append([src])
        else:
            for path in expand_sources([src]):
                stat = os.stat(path)
                paths.append(path)
                fingerprint.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return Inputs(paths, fingerprint, tuple(notes))


def _hf_root(data: DataConfig) -> str:
    return os.path.abspath(data.hf_root) if data.hf_root else ""  # read tasks may run in another directory


def _raw_row(key: int, source: str, value, fmt: str) -> dict:
    if isinstance(value, formats.RowError):
        return {"key": key, "source": source, "raw": "", "fmt": fmt, "reason": value.reason, "detail": value.detail}
    return {"key": key, "source": source, "raw": json.dumps(value, ensure_ascii=False), "fmt": fmt,
            "reason": "", "detail": ""}


def _local_copy(path: str, tmp: str, hf_root: str) -> str:
    """Remote files (s3://, gs://, ...) are copied to the worker's disk, a Hugging Face dataset's file fetched into
    the node's hub cache (or found under data.hf_root), then read like local ones."""
    if path.startswith(hub.URI_PREFIX):
        return hub.fetch(path, hf_root)
    if "://" not in path:
        return path
    from pyarrow import fs as pafs

    filesystem, remote = pafs.FileSystem.from_uri(path)
    local = os.path.join(tmp, os.path.basename(remote))
    with filesystem.open_input_stream(remote) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return local


def _read_files(batch: dict, fmt: str, hf_root: str):
    """Stream every record of each file, in order, as JSON text with its key; bad rows keep their reason.

    A generator, so a large file leaves in chunks of READ_CHUNK_ROWS rows instead of
    being held whole in one worker.
    """
    for path, index in zip(batch["path"], batch["file_index"]):
        rows, file_fmt = [], None if fmt == "auto" else fmt
        with tempfile.TemporaryDirectory() as tmp:
            for row_num, value in formats.iter_raw_rows(_local_copy(str(path), tmp, hf_root)):
                if file_fmt is None and isinstance(value, dict):
                    try:
                        file_fmt = formats.detect_format(value)
                    except formats.FormatError as err:
                        raise formats.FormatError(f"{path}:{row_num}: {err}; or set data.format") from err
                rows.append(_raw_row(record_key(int(index), row_num), f"{path}:{row_num}", value, file_fmt or ""))
                if len(rows) == READ_CHUNK_ROWS:
                    yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
                    rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def _synth_rows(batch: dict, synth_cfg: SynthConfig, tokenizer: str):
    prefix = synth.source_prefix(synth_cfg)
    for block in batch["id"]:
        first = int(block) * synth.BLOCK_SIZE
        rows = synth.synth_block(synth_cfg, int(block), tokenizer)
        yield pa.Table.from_pylist([_raw_row(first + i + 1, f"{prefix}:{first + i + 1}", row, "messages")
                                    for i, row in enumerate(rows)], schema=RAW_SCHEMA)


def read_sources(cfg: Config, inputs: Inputs | None = None) -> ray.data.Dataset:
    """One row per input record: key (input order), source, raw JSON, format, and a read error if any.

    One read task per file (a Hugging Face dataset's data files too: each is fetched inside its task, never on the
    driver); `inputs` are resolve_inputs(cfg.data, cfg.synth), resolved here if not given."""
    data = cfg.data
    if not data.sources:
        num_blocks = synth.num_blocks(cfg.synth)
        return ray.data.range(num_blocks, override_num_blocks=num_blocks).map_batches(
            _synth_rows, batch_size=1, fn_kwargs={"synth_cfg": cfg.synth, "tokenizer": data.tokenizer},
            num_cpus=cfg.prepare.read_num_cpus)
    paths = (inputs or resolve_inputs(data, cfg.synth)).paths
    items = [{"file_index": i, "path": p} for i, p in enumerate(paths)]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_files, batch_size=1, fn_kwargs={"fmt": data.format, "hf_root": _hf_root(data)},
        num_cpus=cfg.prepare.read_num_cpus)
