"""Packing a split in parallel (`prepare.pack_workers`) writes the same bytes as one packing task.

Each split is prepared with 1 and with 3 packing tasks, into two output folders
(the second starts from a copy of the first's tokenized cache and content groups,
which pack_workers changes neither of, so tokenization runs once), and every file
is compared: shards, flat/ and manifest.json but its timings.

    .venv/bin/pytest tests/test_parallel_pack.py -q
"""

import json
import shutil
from pathlib import Path

import pytest

from raypack.config import ConfigError, load_config
from raypack.data.pipeline import prepare, prepared_folders
from raypack.data.pipeline.pack import shard_runs
from raypack.data.prepared import FLAT_DIR, write_flat

TIMINGS = ("seconds", "tokenize_seconds")
# window=40: greedy, padding and random pack many windows; the related arm buffers the whole
# split (group_buffer=0), so its one plan is cut into runs of rows. rows_per_shard=5 gives
# every split several shards, so 3 tasks each get some.
WINDOWED = ["pack.window=40", "pack.group_buffer=0",
            "pack.arms=[greedy-cross, padding, random-cross, bfd-cross+related]"]
WHOLE = ["pack.window=0", "pack.arms=[bfd-isolated, greedy-isolated+unrelated+single-turn]"]


def config(root: Path, workers: int, *overrides):
    return load_config("jobs/composition-quick.yaml", [
        f"prepare.output_dir={root}", "synth.num_samples=240", "data.max_seq_len=1024", "pack.num_clusters=4",
        "prepare.rows_per_shard=5", f"prepare.pack_workers={workers}", *overrides])


def split_files(folder) -> dict[str, bytes]:
    """Every file of a prepared split by relative path; manifest.json without its timings."""
    files = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "manifest.json":
                manifest = json.loads(data)
                data = json.dumps({k: v for k, v in manifest.items() if k not in TIMINGS}).encode()
            files[str(path.relative_to(folder))] = data
    return files


def differences(a, b) -> list[str]:
    fa, fb = split_files(a), split_files(b)
    return sorted(set(fa) ^ set(fb)) + [name for name in sorted(set(fa) & set(fb)) if fa[name] != fb[name]]


def seed_cache(src_root: Path, dst_root: Path) -> None:
    """Copy the tokenized cache and the content groups (not the splits) to another output folder."""
    for tok in src_root.glob("tok-*"):
        for item in tok.iterdir():
            if item.name.startswith(("tokenized", "rejected", "groups-")):
                copy = shutil.copytree if item.is_dir() else shutil.copy
                copy(item, dst_root / tok.name / item.name)


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    """{workers: {split name: folder}} for pack_workers 1 and 3, and the root of the 3-worker run."""
    roots = {w: tmp_path_factory.mktemp(f"workers{w}") for w in (1, 3)}
    out = {}
    for workers, root in roots.items():
        if workers == 3:
            seed_cache(roots[1], root)
        out[workers] = {**prepare(config(root, workers, *WINDOWED)), **prepare(config(root, workers, *WHOLE))}
    return out, roots


def test_every_split_is_byte_identical_whatever_the_pack_workers(prepared):
    out, _ = prepared
    assert set(out[1]) == set(out[3]) == {"val", "greedy-cross", "padding", "random-cross", "bfd-cross+related",
                                          "bfd-isolated", "greedy-isolated+unrelated+single-turn"}
    for name in out[1]:
        # pack_workers is not in the config hash: the same folder name whatever its value.
        assert Path(out[1][name]).name == Path(out[3][name]).name
        files = split_files(out[3][name])
        assert sum(n.endswith(".parquet") for n in files) >= 3, name  # not vacuous: 3 tasks had shards
        assert differences(out[1][name], out[3][name]) == [], name


def test_flat_equals_the_conversion_of_the_shards(prepared, tmp_path):
    """flat/ joined from the tasks' parts equals write_flat's conversion of all the shards at once."""
    out, _ = prepared
    for name, folder in out[3].items():
        copy = tmp_path / name
        copy.mkdir()
        for shard in Path(folder).glob("*.parquet"):
            shutil.copy(shard, copy / shard.name)
        write_flat(copy)
        joined, converted = split_files(Path(folder) / FLAT_DIR), split_files(copy / FLAT_DIR)
        assert joined == converted and joined, name


def test_comparison_catches_a_different_packing(prepared):
    """Negative control: one more sample per window changes the bytes, and the comparison says so."""
    out, roots = prepared
    other = prepare(config(roots[3], 3, "pack.window=41", "pack.group_buffer=0", "pack.arms=[greedy-cross]"))
    assert other["greedy-cross"] != out[3]["greedy-cross"]
    diff = differences(out[1]["greedy-cross"], other["greedy-cross"])
    assert "manifest.json" in diff and f"{FLAT_DIR}/row_offsets.npy" in diff
    assert any(n.endswith(".parquet") for n in diff)


def test_pack_workers_is_checked_and_stays_out_of_the_hash(tmp_path):
    with pytest.raises(ConfigError, match="prepare.pack_workers"):
        config(tmp_path, 0)
    assert prepared_folders(config(tmp_path, 1, *WHOLE)) == prepared_folders(config(tmp_path, 8, *WHOLE))


def test_runs_are_contiguous_balanced_and_never_empty():
    assert shard_runs([], 4) == []
    assert shard_runs([10], 4) == [(0, 1)]
    assert shard_runs([5, 5, 5, 5, 5, 5], 3) == [(0, 2), (2, 4), (4, 6)]
    assert shard_runs([100, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert shard_runs([1, 1, 1], 8) == [(0, 1), (1, 2), (2, 3)]


def test_where_synth_writes_stays_out_of_the_hash(tmp_path):
    """synth.out (where `raypack synth` writes its file) does not change what is prepared; synth.seed does."""
    base = prepared_folders(config(tmp_path, 1))
    assert prepared_folders(config(tmp_path, 1, "synth.out=elsewhere.jsonl")) == base
    assert prepared_folders(config(tmp_path, 1, "synth.seed=7"))["val"] != base["val"]
