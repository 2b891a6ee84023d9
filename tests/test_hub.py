"""hf:ORG/NAME[/CONFIG][@REVISION] sources: a dataset repository's split resolved to its data files by the hub's
conventions, each file read by a Ray Data read task (not on the driver), the revision in the tokenized cache's hash.

Offline: data.hf_root points hf: at a local folder laid out like hub dataset repositories; the remote path is
checked against a stand-in for huggingface_hub's API.

    .venv/bin/pytest tests/test_hub.py -q
"""

import doctest
import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypack.config import load_config
from raypack.data import formats, hub
from raypack.data.pipeline import KEY_ROW_BITS, prepared_folders, read_sources, resolve_inputs

FIXTURES = Path(__file__).parent / "fixtures"
CARD = """---
license: mit
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---
# A dataset in two Parquet shards
"""


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory):
    """org/sharegpt: a card with configs and Parquet shards; org/alpaca: no card, train.jsonl + test.json."""
    root = tmp_path_factory.mktemp("hub")
    sharegpt = json.loads((FIXTURES / "sharegpt_small.json").read_text())
    repo = root / "org" / "sharegpt"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text(CARD)
    for i, rows in enumerate((sharegpt[:12], sharegpt[12:])):
        pq.write_table(pa.Table.from_pylist(rows), repo / "data" / f"train-0000{i}-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(sharegpt[:3]), repo / "data" / "test-00000-of-00001.parquet")
    (repo / ".gitattributes").write_text("*.parquet filter=lfs\n")
    alpaca = json.loads((FIXTURES / "alpaca_small.json").read_text())
    repo = root / "org" / "alpaca"
    repo.mkdir(parents=True)
    (repo / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca[:-2]))
    (repo / "test.json").write_text(json.dumps(alpaca[-2:]))
    return root


def config(tmp_path, *overrides):
    return load_config("jobs/compare.yaml", [f"prepare.output_dir={tmp_path / 'prepared'}", "data.max_seq_len=512",
                                             "pack.arms=[padding]", *overrides])


def without_source(conversations: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "source"} for c in conversations]


def test_hf_sources_are_read_by_ray_tasks_as_their_files_read_locally(ray_local, hub_root, tmp_path, monkeypatch):
    """Two hf: datasets (Parquet shards chosen by the card's configs; JSONL by file name) and a local file between
    them give, in order, exactly the records and conversations of reading those files locally (formats); the test
    shards, the card and .gitattributes are not read. The driver cannot fetch or read a file (its hub.fetch and
    formats reader raise, `datasets` cannot be imported), so the rows came from the read tasks in Ray workers."""
    local = FIXTURES / "glaive_toolcall_small.json"
    cfg = config(tmp_path, f"data.hf_root={hub_root}",
                 f"data.sources=[hf:org/sharegpt, {local}, hf:org/alpaca@v1]")
    files = [hub_root / "org/sharegpt/data/train-00000-of-00002.parquet",
             hub_root / "org/sharegpt/data/train-00001-of-00002.parquet", local, hub_root / "org/alpaca/train.jsonl"]
    expected = [((i << KEY_ROW_BITS) | n, value) for i, f in enumerate(files) for n, value in formats.iter_raw_rows(f)]
    reference = formats.load_conversations(files)
    inputs = resolve_inputs(cfg.data, cfg.synth)
    assert [p.rpartition("/")[2] for p in inputs.paths] == [f.name for f in files]  # one read task per file

    def no_driver_read(*args, **kwargs):
        raise AssertionError("the driver read a data file")

    monkeypatch.setattr(hub, "fetch", no_driver_read)
    monkeypatch.setattr(formats, "iter_raw_rows", no_driver_read)
    monkeypatch.setitem(sys.modules, "datasets", None)
    rows = sorted(read_sources(cfg, inputs).take_all(), key=lambda r: r["key"])
    monkeypatch.undo()

    assert [(r["key"], json.loads(r["raw"])) for r in rows] == expected
    assert len(rows) == 20 + len(json.loads(local.read_text())) + 18  # the train splits only
    assert rows[0]["source"].startswith("hf://datasets/org/sharegpt@local/data/train-00000-of-00002.parquet:")
    assert rows[-1]["source"].startswith("hf://datasets/org/alpaca@v1/train.jsonl:")
    read = [formats.normalise_row(json.loads(r["raw"]), r["fmt"], r["source"]) for r in rows]
    assert without_source(read) == without_source(reference.conversations)
    # Negative control: the patched reader does stop a read on the driver.
    monkeypatch.setattr(formats, "iter_raw_rows", no_driver_read)
    with pytest.raises(AssertionError, match="the driver read"):
        formats.load_conversations(files[:1])


def test_the_revision_is_in_the_tokenized_cache_hash(hub_root, tmp_path):
    """@v1 twice: one cache; @v2, or the mirror's file changing: another (no Ray needed: folders from the config)."""
    folders = [prepared_folders(config(tmp_path, f"data.hf_root={hub_root}", f"data.sources=[hf:org/alpaca{rev}]"))
               ["val"].parent for rev in ("@v1", "@v1", "@v2", "")]
    assert folders[0] == folders[1]
    assert len({folders[0], folders[2], folders[3]}) == 3
    copy = tmp_path / "mirror"
    shutil.copytree(hub_root, copy)
    cfg = config(tmp_path, f"data.hf_root={copy}", "data.sources=[hf:org/alpaca]")
    before = prepared_folders(cfg)["val"]
    assert prepared_folders(cfg)["val"] == before
    with (copy / "org/alpaca/train.jsonl").open("a") as f:
        f.write(json.dumps({"instruction": "one more", "output": "row"}) + "\n")
    assert prepared_folders(cfg)["val"] != before


class FakeHub:
    """huggingface_hub's API as a dict of commits: revision -> sha, and each commit's files."""

    def __init__(self, root: Path, commits: dict[str, str]):
        self.root, self.commits, self.asked = root, commits, []

    def dataset_info(self, repo_id, revision=None):
        self.asked.append(revision)
        return type("Info", (), {"sha": self.commits[revision or "main"]})()

    def list_repo_files(self, repo_id, repo_type=None, revision=None):
        assert revision in self.commits.values() and repo_type == "dataset"
        folder = self.root / repo_id
        return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]

    def hf_hub_download(self, repo_id, filename, repo_type=None, revision=None):
        assert revision in self.commits.values(), "a file is downloaded at the pinned commit"
        return str(self.root / repo_id / filename)


def test_a_remote_dataset_is_pinned_to_the_commit_its_revision_resolves_to(hub_root, tmp_path, monkeypatch):
    """Without data.hf_root: the default branch's commit (or @REVISION's) goes into the hash and the read tasks'
    URIs, and a file is fetched at that commit; a new commit on main is a new cache, the same commit the same."""
    import huggingface_hub

    fake = FakeHub(hub_root, {"main": "a" * 40, "v1": "b" * 40})
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: fake)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    cfg = config(tmp_path, "data.sources=[hf:org/sharegpt]")
    inputs = resolve_inputs(cfg.data, cfg.synth)
    assert inputs.paths == [f"hf://datasets/org/sharegpt@{'a' * 40}/data/train-0000{i}-of-00002.parquet"
                            for i in range(2)]
    assert hub.fetch(inputs.paths[1]) == str(hub_root / "org/sharegpt/data/train-00001-of-00002.parquet")
    main = prepared_folders(cfg)["val"]
    assert prepared_folders(cfg)["val"] == main
    assert prepared_folders(config(tmp_path, "data.sources=[hf:org/sharegpt@v1]"))["val"] != main
    assert fake.asked[-1] == "v1"
    fake.commits["main"] = "c" * 40  # the dataset was updated
    assert prepared_folders(cfg)["val"] != main


def test_a_split_without_files_is_one_line_naming_the_split_and_the_files(hub_root, tmp_path):
    cfg = config(tmp_path, f"data.hf_root={hub_root}", "data.sources=[hf:org/alpaca]", "data.hf_split=validation")
    with pytest.raises(ValueError, match=r"split 'validation' \(data.hf_split\); splits found: \['test', 'train'\]; "
                                         r"files: test.json, train.jsonl$") as err:
        resolve_inputs(cfg.data, cfg.synth)
    assert "\n" not in str(err.value)
    cfg = config(tmp_path, f"data.hf_root={hub_root}", "data.sources=[hf:org/alpaca]", "data.hf_split=test")
    assert resolve_inputs(cfg.data, cfg.synth).paths[0].endswith("@local/test.json")  # control: a split that exists


LAYOUTS = {  # repository files, the card's front matter -> the split's files (datasets' conventions)
    "sharded": (["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
                 "data/test-00000-of-00001.parquet", "README.md"], {}, "train",
                ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]),
    "sharded named split": (["data/train_sft-00000-of-00001.parquet", "data/train_gen-00000-of-00001.parquet"], {},
                            "train_sft", ["data/train_sft-00000-of-00001.parquet"]),
    "folder": (["train/a.jsonl", "train/b.jsonl", "dev/c.jsonl"], {}, "validation", ["dev/c.jsonl"]),
    "file name": (["data/my-train.jsonl", "data/test.jsonl", "notes/train.md"], {}, "train",
                  ["data/my-train.jsonl"]),
    "all train": (["conversations.jsonl", ".hidden/x.jsonl", "__pycache__/y.json"], {}, "train",
                  ["conversations.jsonl"]),
    "config data_dir": (["en/train.jsonl", "fr/train.jsonl"],
                        {"configs": [{"config_name": "en", "data_dir": "en"}, {"config_name": "fr", "data_dir": "fr",
                                                                               "default": True}]},
                        "train", ["fr/train.jsonl"]),
    "config pattern": (["raw/part-1.json", "raw/part-0.json", "other.jsonl"],
                       {"configs": [{"config_name": "default", "data_files": "raw/*.json"}]}, "train",
                       ["raw/part-0.json", "raw/part-1.json"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_files_follow_the_hub_conventions(layout):
    files, card, split, expected = LAYOUTS[layout]
    assert hub.split_files(sorted(files), card, split)[0] == expected


def test_sources_and_configs_that_cannot_be_used_say_what_to_change():
    assert hub.parse_source("hf:org/name/fr@refs/pr/1") == ("org/name", "fr", "refs/pr/1")
    for bad in ("hf:/abs/path", "hf:name", "hf:org/name@", "hf:a/b/c/d"):
        with pytest.raises(ValueError, match=r"is not hf:ORG/NAME\[/CONFIG\]\[@REVISION\]"):
            hub.parse_source(bad)
    card = {"configs": [{"config_name": "en", "data_files": "en/*"}, {"config_name": "fr", "data_files": "fr/*"}]}
    with pytest.raises(ValueError, match=r"configs \['en', 'fr'\] and none is the default; name one, e.g. "
                                         r"hf:org/name/en@v1$"):
        hub.split_files(["en/a.jsonl"], card, "train", source="hf:org/name@v1")
    assert hub.split_files(["en/a.jsonl", "fr/b.jsonl"], card, "train", "fr")[0] == ["fr/b.jsonl"]
    assert hub.split_files(["data/train.jsonl", "data/train.csv"], {}, "train") == (["data/train.jsonl"],
                                                                                    ["data/train.csv"])


def test_docstring_examples_hold():
    assert doctest.testmod(hub).failed == 0
