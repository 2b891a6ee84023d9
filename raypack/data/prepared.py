"""Prepared data as training reads it: the manifest and the rows (pure core: no Ray, no torch); the step count
follows from the manifest in raypack.train.plan.

A prepared split is a folder that `raypack prepare` (raypack.data.pipeline) writes:

    manifest.json        the split's counts and settings: a Manifest (read_manifest, write_manifest)
    part-*.parquet       the rows with their sample keys, pieces and topics (for analysis and the probe's topics:
                         row_topics; training does not read them)
    flat/                the rows as flat token buffers, memory-mapped by every training worker:
      input_ids.npy      int32 [total tokens]  every row's tokens end to end, row 0 first
      labels.npy         int32 [total tokens]
      row_offsets.npy    int64 [num_rows + 1]  row i is input_ids[row_offsets[i]:row_offsets[i + 1]]
      seq_lens.npy       int32 [total samples] each row's sample (piece) lengths end to end
      seq_offsets.npy    int64 [num_rows + 1]  row i's samples are seq_lens[seq_offsets[i]:seq_offsets[i + 1]]
      num_tokens.npy     int32 [num_rows]
      num_supervised_tokens.npy  int32 [num_rows]
      flat.json          {"version", "num_rows", "num_tokens", "num_samples", "positions"}

position_ids are not stored: they follow from seq_lens. "isolated" positions
restart at 0 at every sample (isolated packed rows, and padding and validation
rows, which hold one sample each); "cross" positions run 0..n-1 over the whole
row (raypack.data.pack.pack_rows writes exactly these). The two rows of
pack.py's isolated example, as flat/ holds them:

    input_ids    [11, 12, 13, 21, 22, 23, 24, 25, 26, 31, 32, 41, 42, 43, 44]
    labels       [-100, 12, 13, -100, -100, 23, 24, 25, -100, -100, 32, -100, -100, 43, 44]
    row_offsets  [0, 8, 15]        seq_lens [3, 5, 1, 2, 4]     seq_offsets [0, 2, 5]
    num_tokens   [8, 7]            num_supervised_tokens [5, 3]  positions "isolated"
    RowStore.take([1]) -> [{"row_index": 1, "input_ids": [26, 31, 32, 41, 42, 43, 44],
                            "labels": [-100, -100, 32, -100, -100, 43, 44],
                            "position_ids": [0, 0, 1, 0, 1, 2, 3], "seq_lens": [1, 2, 4],
                            "num_tokens": 7, "num_supervised_tokens": 3}]  (arrays as int32)

The arrays are opened with `np.load(mmap_mode="r")` and a fetch reads its rows'
tokens with pread (RowStore says why): the workers of a node share one
page-cache copy, and a fetch reads only the tokens of the rows it takes.
`prepare` writes flat/ right after packing each split (each packing task converts
its rows into a part with ShardConverter, join_flat joins the parts); a folder prepared before
flat/ existed is converted from its Parquet shards by the first reader
(`RowStore.open`), shard by shard, into flat.partial-<pid>-* renamed into place
atomically (a reader that loses the race uses the winner's copy).

    store = RowStore.open(folder)
    rows = store.take([5, 17])     # list of dicts, what raypack.data.collate takes

manifest.json is a JSON object with "version" (MANIFEST_VERSION) and one key
per Manifest field; composition keys a split does not have are left out.
read_manifest refuses, with a ValueError naming the file and every bad key, a
manifest with missing keys, keys of the wrong type or a version it does not
know. One without "version", written before versions existed, has version 1's
keys: it is read as version 0 if every required key is there. Unknown keys are
kept in Manifest.extra and written back by to_dict.

    manifest = read_manifest(folder)   # manifest.num_rows, manifest.strategy, manifest.attention ...
    manifest.to_dict()                 # the JSON object again, the same keys
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raypack.data.tokenize import IGNORE_INDEX

FLAT_DIR = "flat"
FLAT_META = "flat.json"
FLAT_VERSION = 1
POSITIONS = ("isolated", "cross")
ROW_KEYS = ("row_index", "input_ids", "labels", "position_ids", "seq_lens", "num_tokens", "num_supervised_tokens")
_TOKEN_ARRAYS = ("input_ids", "labels")
_NPY_HEADER_BYTES = 128  # numpy's header for a 1-D array of any length below 10**15 (asserted when written)
_CONVERT_BATCH_ROWS = 512


# ---------------------------------------------------------------- manifest and steps

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# 0: a manifest written before manifests carried a version; its keys are version 1's (read as such).
MANIFEST_VERSIONS = (0, MANIFEST_VERSION)


@dataclass(frozen=True)
class Manifest:
    """A prepared split's manifest.json: what `raypack prepare` counted and the settings it packed with.

    Written by raypack.data.pipeline only; every reader takes it from read_manifest.
    A field without a default is always written (`attention` is None for padding);
    the composition fields are written only for the train arms that have them
    (None when absent). Keys this code does not know are kept in `extra`.
    """

    version: int
    # The tokenization pass, over the whole input (the same in every split of one prepare).
    num_input_rows: int
    num_rejected_rows: int
    rejected_reasons: dict[str, int]
    num_conversations: int
    num_truncated: int
    num_split: int
    num_dropped_too_long: int
    num_dropped_no_supervised: int
    num_val_conversations: int
    # This split's rows.
    split: str  # "train" or "val"
    num_samples: int
    num_split_samples: int
    num_rows: int
    num_tokens: int
    num_supervised_tokens: int
    num_capacity_tokens: int
    num_batch_tokens: int
    padding_fraction: float
    efficiency: float
    lower_bound_rows: int
    rows_over_lower_bound: float
    # The settings it was packed with.
    max_seq_len: int
    micro_batch_size: int
    strategy: str
    attention: str | None  # None for padding
    pack_window: int
    config_hash: str
    seconds: float
    tokenize_seconds: float
    # What went into the packs (raypack.data.compose): grouping and only_single_turn for every train arm,
    # the single-turn counts for single-turn-only arms, the cluster ones for grouped arms.
    # The over-length policy the split applied (its arm's +truncate/+split/+drop, else data.overlength);
    # num_truncated ... num_dropped_no_supervised are what it made of the whole input. None: written before it.
    overlength: str | None = None
    grouping: str | None = None
    only_single_turn: bool | None = None
    num_single_turn_samples: int | None = None
    num_multi_turn_samples: int | None = None
    num_multi_turn_rows: int | None = None
    num_clusters: int | None = None
    group_backend: str | None = None
    within_pack_cosine: float | None = None
    across_pack_cosine: float | None = None
    num_similarity_pairs: int | None = None
    num_shared_rows: int | None = None
    num_mixed_cluster_rows: int | None = None
    num_repeated_cluster_rows: int | None = None  # packed rows holding some cluster twice
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        assert not set(self.extra) & {f.name for f in fields(self)}, "extra holds only keys that are not fields"
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", "float | None") and type(value) is int:
                object.__setattr__(self, f.name, float(value))
        errors = _type_errors(self.to_dict(), "")
        if errors:
            raise ValueError(f"manifest fields of the wrong type: {'; '.join(errors)}")

    @classmethod
    def from_dict(cls, values: dict) -> "Manifest":
        """Validated: every missing key, key of the wrong type and an unknown version in one ValueError."""
        if not isinstance(values, dict):
            raise ValueError(f"a manifest is a JSON object, not {type(values).__name__}")
        values = {"version": 0, **values}
        if type(values["version"]) is not int or values["version"] not in MANIFEST_VERSIONS:
            raise ValueError(f"key 'version' is {values['version']!r}; this code reads manifest versions "
                             f"{MANIFEST_VERSIONS} (update raypack, or prepare the data again)")
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [f.name for f in fields(cls) if f.name in known and f.name not in values
                   and f.default is MISSING]
        errors = ([f"missing keys {missing}"] if missing else []) + _type_errors(values, "key ")
        if errors:
            raise ValueError("; ".join(errors))
        return cls(**{k: v for k, v in values.items() if k in known},
                   extra={k: v for k, v in values.items() if k not in known})

    def to_dict(self) -> dict:
        """manifest.json's content: every field written, except absent (None) optional ones; then `extra`."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"
               and not (f.default is None and getattr(self, f.name) is None)}
        return {**out, **self.extra}


def _type_errors(values: dict, prefix: str) -> list[str]:
    """'<prefix>'name' is 'x' (str), not int' for each known field in `values` of the wrong type."""
    errors = []
    for f in fields(Manifest):
        if f.name in values and f.name != "extra" and not _is_type(values[f.name], f.type):
            value = values[f.name]
            errors.append(f"{prefix}{f.name!r} is {value!r:.60} ({type(value).__name__}), not {f.type}")
    return errors


def _is_type(value, annotation: str) -> bool:
    if annotation.endswith(" | None"):
        return value is None or _is_type(value, annotation[:-len(" | None")])
    if annotation == "int":
        return type(value) is int
    if annotation == "float":
        return type(value) in (int, float)
    if annotation in ("str", "bool"):
        return type(value) is {"str": str, "bool": bool}[annotation]
    assert annotation == "dict[str, int]", annotation
    return isinstance(value, dict) and all(type(k) is str and type(v) is int for k, v in value.items())


def read_manifest(folder: str | Path) -> Manifest:
    """<folder>/manifest.json, validated; a ValueError names the folder and every bad key.

    A manifest without "version" (written before manifests had one) is read as
    version 0 when it holds every key version 1 requires (its keys were those);
    otherwise, like any invalid manifest, it is refused with the way out:
    prepare the data again.
    """
    path = Path(folder) / MANIFEST
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except ValueError as e:  # json.JSONDecodeError included
        raise ValueError(f"{path}: {e}. Prepare it again: raypack prepare CONFIG prepare.reuse=false") from None


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """<folder>/manifest.json; returns its path."""
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(manifest.to_dict(), indent=2))
    return path


def shard_files(folder: str | Path) -> list[str]:
    """The split's Parquet shards in row order."""
    return sorted(str(p) for p in Path(folder).glob("*.parquet"))


def row_topics(folder: str | Path) -> list[list[str]]:
    """Each row's samples' topics ("" for a sample without one), by row_index, from the split's shards.

    ValueError for a split prepared before the shards kept topics (prepare it again)."""
    files = shard_files(folder)
    if not files or "sample_topics" not in pq.read_schema(files[0]).names:
        raise ValueError(f"{folder}: no part-*.parquet with a sample_topics column (prepared before topics were "
                         "kept); prepare it again: raypack prepare CONFIG prepare.reuse=false")
    table = pq.read_table(files, columns=["row_index", "sample_topics"])
    order = np.argsort(table.column("row_index").to_numpy(), kind="stable")
    topics = table.column("sample_topics").to_pylist()
    return [topics[i] for i in order]


# ---------------------------------------------------------------- rows


class RowStore:
    """A split's rows from <folder>/flat/ (module docstring); `take` costs O(tokens taken).

    Every array is memory-mapped (`np.load(mmap_mode="r")`; `input_ids` and
    `labels` for whole-array reads). A fetch reads a row's tokens with pread
    instead, straight from the page cache into a fresh array: faulting on the
    mapping maps whole large folios around each access (measured on Linux 6.18:
    RSS +1 GB after 1,000 random rows of a 1.3 GB arm, against +3 MB with pread,
    at 9 us a row), which would make each worker's resident memory grow towards
    the arm's size over an epoch.
    """

    def __init__(self, flat: str | Path):
        flat = Path(flat)
        meta = json.loads((flat / FLAT_META).read_text())
        if meta.get("version") != FLAT_VERSION:
            raise RuntimeError(f"{flat} has layout version {meta.get('version')}, this code reads "
                               f"{FLAT_VERSION}; delete {flat} and it is converted again")
        self.folder, self.positions, self.num_rows = flat.parent, meta["positions"], meta["num_rows"]
        load = lambda name: np.load(flat / f"{name}.npy", mmap_mode="r")
        self.input_ids, self.labels = load("input_ids"), load("labels")
        self.row_offsets, self.seq_lens, self.seq_offsets = load("row_offsets"), load("seq_lens"), load("seq_offsets")
        self.num_tokens, self.num_supervised_tokens = load("num_tokens"), load("num_supervised_tokens")
        self._files = {name: _TokenFile(flat / f"{name}.npy") for name in _TOKEN_ARRAYS}

    @classmethod
    def open(cls, folder: str | Path) -> "RowStore":
        """The rows of a prepared split; converts its Parquet shards first if flat/ is missing."""
        return cls(write_flat(folder))

    def num_samples_per_row(self) -> np.ndarray:
        return np.diff(self.seq_offsets)

    def row(self, i: int) -> dict:
        """Row i with the keys of ROW_KEYS: int32 arrays for tokens and lengths, ints for counts (copies)."""
        i = int(i)
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} is not in 0..{self.num_rows - 1}")
        lo, hi = int(self.row_offsets[i]), int(self.row_offsets[i + 1])
        seq_lens = np.array(self.seq_lens[int(self.seq_offsets[i]):int(self.seq_offsets[i + 1])])
        return {"row_index": i, "input_ids": self._files["input_ids"].read(lo, hi),
                "labels": self._files["labels"].read(lo, hi), "position_ids": row_positions(seq_lens, self.positions),
                "seq_lens": seq_lens, "num_tokens": hi - lo,
                "num_supervised_tokens": int(self.num_supervised_tokens[i])}

    def take(self, indices) -> list[dict]:
        """The rows at `indices`, in that order."""
        return [self.row(i) for i in np.asarray(indices).reshape(-1)]


class _TokenFile:
    """An int32 .npy file read by element range with pread (no mapping, no file position: fork-safe)."""

    def __init__(self, path: Path):
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            self.start, self.size = f.tell(), shape[0]
        assert dtype == np.int32 and len(shape) == 1, (path, dtype, shape)
        self.path, self.fd = path, os.open(path, os.O_RDONLY)

    def read(self, lo: int, hi: int) -> np.ndarray:
        if not 0 <= lo <= hi <= self.size:
            raise IndexError(f"{self.path}: elements {lo}..{hi} are outside 0..{self.size}")
        out = np.empty(hi - lo, dtype=np.int32)
        view, offset = memoryview(out).cast("B"), self.start + 4 * lo
        while len(view):
            n = os.preadv(self.fd, [view], offset)
            if n == 0:
                raise EOFError(f"{self.path} ends before element {hi}")
            view, offset = view[n:], offset + n
        return out

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)


def row_positions(seq_lens: np.ndarray, positions: str) -> np.ndarray:
    """position_ids of one row with these sample lengths: restarting per sample ("isolated") or 0..n-1 ("cross")."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    out = np.arange(int(seq_lens.sum()), dtype=np.int64)
    if positions == "isolated":
        out -= np.repeat(np.cumsum(seq_lens) - seq_lens, seq_lens)
    elif positions != "cross":
        raise ValueError(f"positions={positions!r} is not one of {POSITIONS}")
    return out.astype(np.int32)


# ---------------------------------------------------------------- writing


class FlatWriter:
    """Streams rows into a flat/ folder: `append` a batch of rows at a time, then `close(positions)`.

    Token arrays go straight to disk (their .npy header, fixed at 128 bytes, is
    rewritten with the final length at close); only per-row and per-sample
    lengths stay in memory.
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.files = {name: (self.out / f"{name}.npy").open("wb") for name in _TOKEN_ARRAYS}
        for f in self.files.values():
            f.write(b"\0" * _NPY_HEADER_BYTES)
        self.num_tokens: list[np.ndarray] = []
        self.num_supervised: list[np.ndarray] = []
        self.seq_lens: list[np.ndarray] = []
        self.num_samples: list[np.ndarray] = []

    def append(self, input_ids: np.ndarray, labels: np.ndarray, num_tokens: np.ndarray, seq_lens: np.ndarray,
               num_samples: np.ndarray) -> None:
        """A batch of rows: their tokens and labels end to end, tokens per row, sample lengths end to end and
        samples per row."""
        num_tokens = np.asarray(num_tokens, dtype=np.int64)
        seq_lens, num_samples = np.asarray(seq_lens, dtype=np.int64), np.asarray(num_samples, dtype=np.int64)
        if not (len(input_ids) == len(labels) == num_tokens.sum() == seq_lens.sum()
                and len(num_samples) == len(num_tokens) and num_samples.sum() == len(seq_lens)):
            raise ValueError("rows do not add up: input_ids, labels, num_tokens and seq_lens must describe "
                             "the same tokens, and num_samples the same samples")
        sample_ends = np.concatenate([[0], np.cumsum(seq_lens)])[np.cumsum(num_samples)]
        if not np.array_equal(sample_ends, np.cumsum(num_tokens)):
            raise ValueError("a row's seq_lens do not add up to its num_tokens")
        self.files["input_ids"].write(np.ascontiguousarray(input_ids, dtype=np.int32).data)
        self.files["labels"].write(np.ascontiguousarray(labels, dtype=np.int32).data)
        supervised = np.concatenate([[0], np.cumsum(np.asarray(labels) != IGNORE_INDEX)])
        row_ends = np.cumsum(num_tokens)
        self.num_supervised.append(supervised[row_ends] - supervised[row_ends - num_tokens])
        self.num_tokens.append(num_tokens)
        self.seq_lens.append(seq_lens)
        self.num_samples.append(num_samples)

    def append_rows(self, rows: list[dict]) -> None:
        """Rows as dicts with input_ids, labels and seq_lens (pack_rows' output)."""
        cat = lambda key, dtype: np.concatenate([np.asarray(r[key], dtype) for r in rows]) if rows else \
            np.zeros(0, dtype)
        self.append(cat("input_ids", np.int32), cat("labels", np.int32), [len(r["input_ids"]) for r in rows],
                    cat("seq_lens", np.int64), [len(r["seq_lens"]) for r in rows])

    def close(self, positions: str) -> None:
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r} is not one of {POSITIONS}")
        cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
        num_tokens, seq_lens = cat(self.num_tokens, np.int32), cat(self.seq_lens, np.int32)
        total = int(num_tokens.sum(dtype=np.int64))
        for f in self.files.values():
            f.seek(0)
            np.lib.format.write_array_header_1_0(f, {"descr": "<i4", "fortran_order": False, "shape": (total,)})
            assert f.tell() == _NPY_HEADER_BYTES, f.tell()
            f.close()
        np.save(self.out / "num_tokens.npy", num_tokens)
        np.save(self.out / "num_supervised_tokens.npy", cat(self.num_supervised, np.int32))
        np.save(self.out / "seq_lens.npy", seq_lens)
        np.save(self.out / "row_offsets.npy", np.concatenate([[0], np.cumsum(num_tokens, dtype=np.int64)]))
        np.save(self.out / "seq_offsets.npy",
                np.concatenate([[0], np.cumsum(cat(self.num_samples, np.int64), dtype=np.int64)]))
        meta = {"version": FLAT_VERSION, "num_rows": len(num_tokens), "num_tokens": total,
                "num_samples": len(seq_lens), "positions": positions}
        (self.out / FLAT_META).write_text(json.dumps(meta, indent=2))


def write_flat(folder: str | Path) -> Path:
    """<folder>/flat/, converted from the folder's Parquet shards unless it exists; returns its path.

    Idempotent and safe to race: each writer fills its own flat.partial-<pid>-*
    folder and renames it into place; a writer that finds flat/ already there
    drops its copy. Reads one batch of rows at a time, never the whole split.
    """
    final = Path(folder) / FLAT_DIR
    if (final / FLAT_META).exists():
        return final
    if not Path(folder).is_dir():  # never create one: an empty split is a folder with no shards
        raise FileNotFoundError(f"{folder} is not a folder of prepared rows; give a folder that raypack prepare wrote")
    return publish_flat(final, lambda out: _convert_shards(shard_files(folder), out))


def write_rows(folder: str | Path, rows: list[dict], positions: str) -> Path:
    """<folder>/flat/ holding `rows` (dicts with input_ids, labels, seq_lens), for tests and benchmarks."""
    def fill(out: Path) -> None:
        writer = FlatWriter(out)
        writer.append_rows(rows)
        writer.close(positions)

    return publish_flat(Path(folder) / FLAT_DIR, fill)


def publish_flat(final: Path, fill) -> Path:
    """Run `fill(partial)` into a fresh partial folder next to `final`, then rename it to `final` atomically."""
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{final.name}.partial-{os.getpid()}-", dir=final.parent))
    try:
        fill(partial)
        try:
            os.rename(partial, final)
        except OSError:
            if not (final / FLAT_META).exists():  # not a lost race: something else is in the way
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def _convert_shards(files: list[str], out: Path) -> None:
    """Parquet rows (row_index, input_ids, labels, position_ids, seq_lens, num_supervised_tokens) -> flat/.

    Checks that row_index runs 0..n-1 in file order, that the supervised counts
    agree, and which rule the stored position_ids follow (a row of one sample
    fits both; a folder whose positions fit neither is refused).
    """
    converter = ShardConverter(out)
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_CONVERT_BATCH_ROWS, columns=SHARD_COLUMNS):
            converter.add(batch, path)
    converter.close(out.parent)


SHARD_COLUMNS = ["row_index", "input_ids", "labels", "position_ids", "seq_lens", "num_supervised_tokens"]


class ShardConverter:
    """Rows of Parquet shards, in row order, into a FlatWriter, checked as they come (see _convert_shards).

    `first_row` lets a slice of a split's rows be converted on its own (a flat/ part,
    joined by `join_flat`); `fits` is the position rules every row added so far follows.
    """

    def __init__(self, out: str | Path, first_row: int = 0):
        self.writer = FlatWriter(out)
        self.fits = {name: True for name in POSITIONS}
        self.next_row = first_row

    def add(self, rows, where) -> None:
        """A pyarrow RecordBatch or Table with SHARD_COLUMNS; `where` names it in errors."""
        batches = rows.to_batches(max_chunksize=_CONVERT_BATCH_ROWS) if isinstance(rows, pa.Table) else [rows]
        for batch in batches:
            self._add_batch(batch, where)

    def _add_batch(self, batch, where) -> None:
        values = lambda name: pc.list_flatten(batch.column(name)).to_numpy(zero_copy_only=False)
        row_index = batch.column("row_index").to_numpy()
        if not np.array_equal(row_index, np.arange(self.next_row, self.next_row + len(row_index))):
            raise RuntimeError(f"{where}: row_index is not {self.next_row}.. in file order; prepare it again "
                               "(raypack prepare) with prepare.reuse=false")
        self.next_row += len(row_index)
        num_tokens = pc.list_value_length(batch.column("input_ids")).to_numpy()
        seq_lens, num_samples = values("seq_lens"), pc.list_value_length(batch.column("seq_lens")).to_numpy()
        self.writer.append(values("input_ids"), values("labels"), num_tokens, seq_lens, num_samples)
        if not np.array_equal(self.writer.num_supervised[-1], batch.column("num_supervised_tokens").to_numpy()):
            raise RuntimeError(f"{where}: num_supervised_tokens does not match the labels; prepare it again")
        stored = values("position_ids")
        for name in POSITIONS:
            self.fits[name] = self.fits[name] and np.array_equal(stored, _batch_positions(num_tokens, seq_lens, name))

    def fitting(self) -> list[str]:
        return [name for name in POSITIONS if self.fits[name]]

    def close(self, where) -> list[str]:
        """Finish flat/ with the first position rule that every row follows; returns every rule they follow."""
        self.writer.close(first_fitting([self.fitting()], where))
        return self.fitting()


def first_fitting(fits: list[list[str]], where) -> str:
    """The first rule of POSITIONS in every list of `fits` (the rules each part of a split follows)."""
    fitting = [name for name in POSITIONS if all(name in f for f in fits)]
    if not fitting:
        raise RuntimeError(f"{where}: position_ids follow neither rule of {POSITIONS}; prepare it again")
    return fitting[0]


def join_flat(parts: list[str | Path], out: str | Path, positions: str) -> None:
    """One flat/ folder `out` from flat/ parts holding consecutive rows, in order.

    Byte-identical to converting all their rows at once: token arrays are copied
    end to end behind one header, the per-row arrays concatenated, offsets rebuilt.
    """
    writer = FlatWriter(out)
    for part in map(Path, parts):
        for name in _TOKEN_ARRAYS:
            with (part / f"{name}.npy").open("rb") as src:
                src.seek(_NPY_HEADER_BYTES)
                shutil.copyfileobj(src, writer.files[name], 16 * 2**20)
        writer.num_tokens.append(np.load(part / "num_tokens.npy").astype(np.int64))
        writer.num_supervised.append(np.load(part / "num_supervised_tokens.npy").astype(np.int64))
        writer.seq_lens.append(np.load(part / "seq_lens.npy").astype(np.int64))
        writer.num_samples.append(np.diff(np.load(part / "seq_offsets.npy")))
    writer.close(positions)


def _batch_positions(num_tokens: np.ndarray, seq_lens: np.ndarray, positions: str) -> np.ndarray:
    """row_positions of a batch of rows, end to end, without a loop over rows."""
    segments = seq_lens if positions == "isolated" else num_tokens
    segments = np.asarray(segments, dtype=np.int64)
    starts = np.cumsum(segments) - segments
    return (np.arange(int(segments.sum()), dtype=np.int64) - np.repeat(starts, segments)).astype(np.int32)
