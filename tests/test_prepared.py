"""The prepared-rows contract (raypack.data.prepared): flat memory-mapped rows equal the Parquet rows, and
manifest.json is read back as the Manifest that was written (or refused, naming the folder and the key).

    .venv/bin/pytest tests/test_prepared.py -q

The store is checked against two independent references: the packer's own rows
(raypack.data.pack.pack_rows, no Ray) and the Parquet shards `raypack prepare`
writes (one small prepare on the local Ray cluster, three arms).
"""

import json
import multiprocessing
import os
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypack.config import load_config
from raypack.data.pack import pack_rows, plan_pack
from raypack.data.prepared import (FLAT_DIR, MANIFEST_VERSION, ROW_KEYS, FlatWriter, Manifest, RowStore,
                                   publish_flat, read_manifest, row_positions, shard_files, write_flat,
                                   write_manifest, write_rows)
from raypack.data.tokenize import IGNORE_INDEX

ARMS = ["padding", "bfd-isolated", "random-cross"]


def origin_samples(num: int, seed: int = 0, longest: int = 60) -> list[dict]:
    """Samples whose tokens reveal their origin: sample i is made of token 100 + i."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(num):
        n = int(rng.integers(2, longest))
        labels = np.full(n, 100 + i, dtype=np.int32)
        labels[: int(rng.integers(1, n))] = IGNORE_INDEX
        samples.append({"input_ids": np.full(n, 100 + i, dtype=np.int32), "labels": labels})
    return samples


def assert_rows_equal(got: dict, expected: dict, where) -> None:
    for key in expected:
        assert np.array_equal(np.asarray(got[key]), np.asarray(expected[key])), (where, key)


@pytest.mark.parametrize("strategy,attention", [("padding", "isolated"), ("bfd", "isolated"), ("random", "cross"),
                                                ("bfd", "cross")])
def test_store_rows_equal_the_packers_rows(tmp_path, strategy, attention):
    samples = origin_samples(40)
    lengths = np.array([len(s["input_ids"]) for s in samples])
    rows = pack_rows(plan_pack(lengths, 64, strategy, window=16), samples, attention)
    store = RowStore(write_rows(tmp_path, rows, attention))
    assert store.num_rows == len(rows)
    assert store.num_tokens.tolist() == [len(r["input_ids"]) for r in rows]
    for i, row in enumerate(rows):
        (got,) = store.take([i])
        assert set(got) == set(ROW_KEYS) and got["row_index"] == i
        assert_rows_equal(got, row, i)
        assert got["num_supervised_tokens"] == np.count_nonzero(row["labels"] != IGNORE_INDEX)
    order = np.random.default_rng(1).permutation(len(rows))[:5]
    assert [r["row_index"] for r in store.take(order)] == order.tolist()


def test_positions_restart_per_sample_or_run_over_the_row():
    assert row_positions([3, 2], "isolated").tolist() == [0, 1, 2, 0, 1]
    assert row_positions([3, 2], "cross").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        row_positions([3], "padding")


def test_an_empty_split_opens_with_no_rows_and_a_wrong_folder_is_refused(tmp_path):
    store = RowStore(write_rows(tmp_path, [], "isolated"))
    assert store.num_rows == 0 and len(store.num_tokens) == 0 and store.take([]) == []
    with pytest.raises(IndexError):
        store.take([0])
    (tmp_path / "empty").mkdir()  # what prepare's packing task converts for a split with no rows
    assert RowStore.open(tmp_path / "empty").num_rows == 0
    with pytest.raises(FileNotFoundError, match="not a folder of prepared rows"):
        RowStore.open(tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------- against `raypack prepare`


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    from raypack.data.pipeline import prepare

    tmp = tmp_path_factory.mktemp("prepared")
    cfg = load_config("jobs/compare.yaml", [
        f"prepare.output_dir={tmp / 'prepared'}", "synth.num_samples=150", "data.max_seq_len=256",
        f"pack.arms={json.dumps(ARMS)}", "pack.window=40", "prepare.rows_per_shard=9",
        "prepare.num_tokenizer_actors=1"])
    return prepare(cfg)


def parquet_rows(folder) -> list[dict]:
    return pq.read_table(shard_files(folder), columns=list(ROW_KEYS)).to_pylist()


@pytest.mark.parametrize("split", ["val", *ARMS])
def test_prepare_writes_flat_rows_equal_to_its_parquet_rows(prepared, split):
    folder = prepared[split]
    assert (os.path.isdir(os.path.join(folder, FLAT_DIR)))  # written by the packing task, not at train time
    expected = parquet_rows(folder)
    store = RowStore.open(folder)
    assert store.num_rows == len(expected) == read_manifest(folder).num_rows
    assert len(shard_files(folder)) > 1 or split == "val"
    assert store.positions == ("cross" if split == "random-cross" else "isolated")
    got = store.take(np.arange(store.num_rows))
    for i, (g, e) in enumerate(zip(got, expected)):
        assert set(g) == set(e)
        assert_rows_equal(g, e, (split, i))
        assert isinstance(g["num_tokens"], int) and g["num_tokens"] == e["num_tokens"]
    assert store.num_tokens.tolist() == [e["num_tokens"] for e in expected]
    if split == "random-cross":  # a cross row of several samples: positions that isolated would restart
        assert any(len(e["seq_lens"]) > 1 for e in expected)


# A bfd-cross+related arm's manifest.json as raypack prepare wrote it before manifests had a version.
UNVERSIONED = {
    "num_input_rows": 200, "num_rejected_rows": 0, "rejected_reasons": {"bad_json": 0, "no_assistant": 0},
    "num_truncated": 3, "num_split": 0, "num_dropped_too_long": 0, "num_dropped_no_supervised": 0,
    "num_samples": 180, "num_rows": 41, "num_tokens": 38911, "num_supervised_tokens": 20133,
    "num_capacity_tokens": 41984, "padding_fraction": 0.0452, "efficiency": 0.9268, "lower_bound_rows": 39,
    "max_seq_len": 1024, "strategy": "bfd", "attention": "cross", "pack_window": 0,
    "config_hash": "0123456789ab", "seconds": 0.81, "num_conversations": 200, "num_split_samples": 0,
    "num_batch_tokens": 40755, "rows_over_lower_bound": 1.0513, "micro_batch_size": 2,
    "tokenize_seconds": 4.2, "split": "train", "num_val_conversations": 20, "grouping": "related",
    "only_single_turn": False, "num_clusters": 10, "group_backend": "tfidf", "within_pack_cosine": 0.31,
    "across_pack_cosine": 0.02, "num_similarity_pairs": 1480, "num_shared_rows": 38, "num_mixed_cluster_rows": 2,
}


def write_json(folder, values: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(values))
    return folder


def test_manifest_round_trip_keeps_every_key(tmp_path):
    manifest = Manifest.from_dict({**UNVERSIONED, "version": MANIFEST_VERSION})
    path = write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest and manifest.version == MANIFEST_VERSION
    assert json.loads(path.read_text()) == {**UNVERSIONED, "version": MANIFEST_VERSION}  # the same JSON keys
    assert manifest.num_rows == 41 and manifest.attention == "cross" and manifest.within_pack_cosine == 0.31
    assert manifest.extra == {}


def test_optional_fields_left_out_are_none_and_stay_out(tmp_path):
    """A padding val split: attention null (always written), no composition keys (never written)."""
    values = {key: v for key, v in UNVERSIONED.items() if key not in Manifest.__dataclass_fields__
              or Manifest.__dataclass_fields__[key].default is not None}
    values.update(version=MANIFEST_VERSION, strategy="padding", attention=None, split="val")
    write_json(tmp_path, values)
    manifest = read_manifest(tmp_path)
    assert manifest.attention is None and manifest.grouping is None and manifest.num_clusters is None
    assert manifest.to_dict() == values and "attention" in manifest.to_dict()


def test_a_manifest_without_version_is_read_as_version_0(tmp_path):
    manifest = read_manifest(write_json(tmp_path / "old", UNVERSIONED))
    assert manifest.version == 0
    assert manifest == Manifest.from_dict({**UNVERSIONED, "version": 0})
    assert {**manifest.to_dict(), "version": MANIFEST_VERSION} == read_manifest(
        write_json(tmp_path / "new", {**UNVERSIONED, "version": MANIFEST_VERSION})).to_dict()


def test_an_older_manifest_missing_keys_is_refused_with_the_way_out(tmp_path):
    older = {key: v for key, v in UNVERSIONED.items() if key not in ("split", "num_val_conversations")}
    folder = write_json(tmp_path / "older", older)
    with pytest.raises(ValueError, match=r"older.*manifest.json.*missing keys \['num_val_conversations', 'split'\]"
                                         r".*prepare.reuse=false"):
        read_manifest(folder)


@pytest.mark.parametrize("bad,match", [
    ({"num_rows": None}, r"missing keys \['num_rows'\]"),
    ({"num_rows": "41"}, r"key 'num_rows' is '41' \(str\), not int"),
    ({"num_rows": 41.0}, r"key 'num_rows' is 41.0 \(float\), not int"),
    ({"num_rows": True}, r"key 'num_rows' is True \(bool\), not int"),
    ({"attention": 3}, r"key 'attention' is 3 \(int\), not str \| None"),
    ({"rejected_reasons": {"bad_json": "0"}}, r"key 'rejected_reasons'"),
    ({"within_pack_cosine": "high"}, r"key 'within_pack_cosine'"),
    ({"version": 2}, r"key 'version' is 2; this code reads manifest versions \(0, 1\)"),
    ({"version": "1"}, r"key 'version' is '1'"),
])
def test_a_bad_manifest_is_refused_naming_the_folder_and_key(tmp_path, bad, match):
    values = {**UNVERSIONED, "version": MANIFEST_VERSION, **bad}
    values = {key: v for key, v in values.items() if not (key == "num_rows" and v is None)}
    folder = write_json(tmp_path / "arm-0123", values)
    with pytest.raises(ValueError, match=match) as info:
        read_manifest(folder)
    assert str(folder / "manifest.json") in str(info.value)
    write_json(folder, {**UNVERSIONED, "version": MANIFEST_VERSION})  # negative control: the same folder, valid
    assert read_manifest(folder).num_rows == 41


def test_every_problem_is_named_at_once_and_broken_json_names_the_file(tmp_path):
    values = {key: v for key, v in UNVERSIONED.items() if key != "strategy"}
    with pytest.raises(ValueError, match=r"missing keys \['strategy'\]; key 'num_rows' is '41'"):
        read_manifest(write_json(tmp_path / "a", {**values, "num_rows": "41"}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text('{"num_rows": 4')
    with pytest.raises(ValueError, match=r"b/manifest.json: .*prepare.reuse=false"):
        read_manifest(tmp_path / "b")
    with pytest.raises(ValueError, match=r"a JSON object, not list"):
        read_manifest(write_json(tmp_path / "c", [UNVERSIONED]))


def test_unknown_keys_are_kept_in_extra_and_written_back(tmp_path):
    write_json(tmp_path, {**UNVERSIONED, "version": MANIFEST_VERSION, "num_future_things": 7})
    manifest = read_manifest(tmp_path)
    assert manifest.extra == {"num_future_things": 7}
    assert manifest.to_dict()["num_future_things"] == 7 and read_manifest(write_manifest(tmp_path, manifest).parent) \
        == manifest


def test_the_writer_is_held_to_the_same_types():
    """pipeline.py builds Manifest directly: a numpy count or a key Manifest lacks fails at write time."""
    values = {**UNVERSIONED, "version": MANIFEST_VERSION}
    with pytest.raises(ValueError, match=r"'num_rows' is .*41\)? \(int64\), not int"):
        Manifest(**{**values, "num_rows": np.int64(41)})
    with pytest.raises(TypeError, match="num_new_composition_stat"):
        Manifest(**values, num_new_composition_stat=1)
    assert isinstance(Manifest(**{**values, "seconds": 1}).seconds, float)  # an int where a float goes: stored as one


@pytest.mark.parametrize("split", ["val", *ARMS])
def test_prepare_writes_a_versioned_manifest_that_reads_back_unchanged(prepared, split):
    raw = json.loads((Path(prepared[split]) / "manifest.json").read_text())
    manifest = read_manifest(prepared[split])
    assert raw["version"] == MANIFEST_VERSION and manifest.to_dict() == raw and manifest.extra == {}
    assert manifest.split == ("val" if split == "val" else "train")
    assert manifest.attention == (None if split in ("val", "padding") else split.split("-")[1])


def test_conversion_of_an_old_folder_is_byte_identical_and_idempotent(prepared, tmp_path):
    """A folder prepared before flat/ existed converts on first open to exactly what prepare writes."""
    source = prepared["bfd-isolated"]
    old = tmp_path / "old"
    shutil.copytree(source, old, ignore=shutil.ignore_patterns(FLAT_DIR))
    assert not (old / FLAT_DIR).exists()
    flat = write_flat(old)
    names = sorted(os.listdir(flat))
    assert names == sorted(os.listdir(os.path.join(source, FLAT_DIR)))
    for name in names:
        assert (flat / name).read_bytes() == open(os.path.join(source, FLAT_DIR, name), "rb").read(), name
    stamp = {name: (flat / name).stat().st_mtime_ns for name in names}
    assert write_flat(old) == flat and RowStore.open(old).num_rows == RowStore.open(source).num_rows
    assert {name: (flat / name).stat().st_mtime_ns for name in names} == stamp  # not rewritten
    assert sorted(p.name for p in old.iterdir() if p.name.startswith(FLAT_DIR)) == [FLAT_DIR]


def _convert(folder: str, start, out) -> None:
    start.wait()
    out.put(str(write_flat(folder)))


def test_concurrent_readers_convert_once_and_both_use_the_result(prepared, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(prepared["random-cross"], old, ignore=shutil.ignore_patterns(FLAT_DIR))
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_convert, args=(str(old), start, out)) for _ in range(3)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert set(results) == {str(old / FLAT_DIR)}
    assert sorted(p.name for p in old.iterdir() if p.name.startswith(FLAT_DIR)) == [FLAT_DIR]
    rows = RowStore.open(old).take(np.arange(5))
    for g, e in zip(rows, parquet_rows(old)[:5]):
        assert_rows_equal(g, e, "race")


def test_a_writer_that_loses_the_race_or_fails_leaves_nothing_behind(tmp_path):
    final = write_rows(tmp_path, [{"input_ids": [1, 2], "labels": [IGNORE_INDEX, 2], "seq_lens": [2]}], "isolated")
    stamp = (final / "input_ids.npy").stat().st_mtime_ns
    lost = publish_flat(final, lambda out: (out / "input_ids.npy").write_bytes(b"loser"))  # rename finds flat/
    assert lost == final and (final / "input_ids.npy").stat().st_mtime_ns == stamp

    def broken(out):
        (out / "half.npy").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError):
        publish_flat(tmp_path / "other" / FLAT_DIR, broken)
    assert not (tmp_path / "other" / FLAT_DIR).exists() and list((tmp_path / "other").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [FLAT_DIR, "other"]


def write_shard(folder, rows: list[dict], positions: list) -> None:
    folder.mkdir(exist_ok=True)
    column = lambda arrays: pa.array([np.asarray(a, dtype=np.int32) for a in arrays], pa.list_(pa.int32()))
    pq.write_table(pa.table({
        "row_index": pa.array(np.arange(len(rows), dtype=np.int64)),
        "input_ids": column(r["input_ids"] for r in rows), "labels": column(r["labels"] for r in rows),
        "position_ids": column(positions), "seq_lens": column(r["seq_lens"] for r in rows),
        "num_tokens": pa.array([len(r["input_ids"]) for r in rows], pa.int32()),
        "num_supervised_tokens": pa.array([int(np.count_nonzero(np.asarray(r["labels"]) != IGNORE_INDEX))
                                           for r in rows], pa.int32()),
    }), folder / "part-00000.parquet")


def test_conversion_refuses_positions_that_follow_neither_rule(tmp_path):
    row = {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, 6, IGNORE_INDEX, 8], "seq_lens": [2, 2]}
    write_shard(tmp_path / "ok", [row], [[0, 1, 0, 1]])
    assert RowStore.open(tmp_path / "ok").positions == "isolated"
    write_shard(tmp_path / "bad", [row], [[0, 1, 2, 0]])
    with pytest.raises(RuntimeError, match="position_ids"):
        RowStore.open(tmp_path / "bad")
    assert not any(p.name.startswith(FLAT_DIR) for p in (tmp_path / "bad").iterdir())


# ---------------------------------------------------------------- cost of a fetch


def test_a_fetch_allocates_only_the_rows_it_takes(tmp_path):
    """2 rows of a 200k-row store (12.8M tokens, 51 MB per token array) allocate kilobytes, not a column."""
    writer = FlatWriter(tmp_path / FLAT_DIR)
    num_rows, row_len, batch = 200_000, 64, 20_000
    for lo in range(0, num_rows, batch):
        tokens = np.arange(lo * row_len, (lo + batch) * row_len, dtype=np.int32)
        writer.append(tokens, tokens, np.full(batch, row_len), np.full(2 * batch, row_len // 2), np.full(batch, 2))
    writer.close("isolated")
    store = RowStore(tmp_path / FLAT_DIR)
    store.take([0, 1])  # first-call costs (imports, caches) out of the measurement

    def peak_bytes(fn) -> int:
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak

    rows = []
    small = peak_bytes(lambda: rows.extend(store.take([num_rows - 1, 123_456])))
    assert rows[0]["input_ids"][0] == (num_rows - 1) * row_len and rows[1]["position_ids"].tolist()[31:34] == [31, 0, 1]
    assert small < 32_000, small
    whole = peak_bytes(lambda: np.array(store.input_ids))  # control: the measurement sees a column copy
    assert whole >= num_rows * row_len * 4
