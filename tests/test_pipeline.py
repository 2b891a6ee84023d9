"""`raypack prepare` on a local Ray cluster: counts reconcile, bad rows are kept aside, output is deterministic
whatever the workers, batches and the order Ray's writers would put rows in; the padfree arm is padding's rows,
and the loop takes padding's steps from them.

    .venv/bin/pytest tests/test_pipeline.py -q
"""

import json
import shutil
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raypack.config import load_config
from raypack.data.formats import FormatError
from raypack.data.local import load_or_synth, prepare_local
from raypack.data.pipeline import KEY_ROW_BITS, prepare
from raypack.data.pipeline.cache import cache_files, read_cache_index
from raypack.data.pipeline.group import load_groups
from raypack.data.pipeline.ordered import write_in_order
from raypack.data.prepared import read_manifest, shard_files
from raypack.data.tokenize import IGNORE_INDEX, tokenize_conversations
from raypack.model import load_tokenizer
from test_parallel_pack import split_files

FIXTURES = Path(__file__).parent / "fixtures"
ARMS = "[padding, padfree, random-cross, greedy-cross, bfd-isolated, bfd-cross]"
TIMINGS = ("seconds", "tokenize_seconds")


def config(tmp_path, *overrides):
    return load_config("jobs/compare.yaml", [f"prepare.output_dir={tmp_path / 'prepared'}",
                                                "data.max_seq_len=512", f"pack.arms={ARMS}", *overrides])


@pytest.fixture(scope="module")
def real_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    for name in ("alpaca_small.json", "sharegpt_small.json", "glaive_toolcall_small.json", "bad_rows.jsonl"):
        shutil.copy(FIXTURES / name, folder / name)
    return folder


REAL = ("data.val_count=6", "pack.window=16")  # prepared_real's settings, beside the real files


@pytest.fixture(scope="module")
def prepared_real(ray_local, real_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep")
    cfg = config(out, f"data.sources=[{real_files}]", *REAL)
    return cfg, prepare(cfg)


def shard_rows(folder):
    files = sorted(Path(folder).glob("*.parquet"))
    return pq.read_table([str(f) for f in files]).to_pylist() if files else []


def test_counts_reconcile_across_arms(prepared_real):
    cfg, folders = prepared_real
    manifests = {name: read_manifest(f) for name, f in folders.items()}
    val = manifests.pop("val")
    first = manifests["padding"]
    # Every input row is a conversation or a rejection; every conversation is kept or dropped.
    assert first.num_input_rows == 20 + 20 + 20 + 11 - 1  # the bad-rows file has a blank line
    assert first.num_input_rows == first.num_rejected_rows + first.num_conversations
    assert sum(first.rejected_reasons.values()) == first.num_rejected_rows == 8
    assert val.num_val_conversations == 6 and val.num_samples == 6
    kept = first.num_conversations - first.num_dropped_too_long - first.num_dropped_no_supervised
    assert first.num_samples + val.num_samples == kept  # no split pieces with overlength=truncate
    for name, m in manifests.items():
        assert m.num_samples == first.num_samples and m.num_tokens == first.num_tokens
        rows = shard_rows(folders[name])
        assert len(rows) == m.num_rows
        assert sum(int(np.sum(np.array(r["labels"]) != IGNORE_INDEX)) for r in rows) == m.num_supervised_tokens
        assert all(r["num_tokens"] <= cfg.data.max_seq_len for r in rows)
    # The core's rule: only random packing loses targets, one per cut that lands on a supervised token.
    for name in ("padding", "greedy-cross", "bfd-isolated", "bfd-cross"):
        assert manifests[name].num_supervised_tokens == first.num_supervised_tokens
    assert manifests["random-cross"].num_supervised_tokens <= first.num_supervised_tokens
    assert manifests["padding"].num_rows == first.num_samples
    assert manifests["bfd-isolated"].strategy == "bfd" and manifests["bfd-isolated"].attention == "isolated"
    assert manifests["bfd-isolated"].pack_window == 16


def test_padfree_is_paddings_rows_under_a_manifest_of_its_own(prepared_real):
    """padfree holds padding's rows (same samples, order, shards and bytes); its manifest says padfree, isolated,
    with a hash of its own, and counts no pad computed (padding's micro-batches do: the negative control)."""
    _, folders = prepared_real
    pad, free = (read_manifest(folders[arm]) for arm in ("padding", "padfree"))
    assert (pad.strategy, pad.attention, free.strategy, free.attention) == ("padding", None, "padfree", "isolated")
    assert free.config_hash != pad.config_hash and Path(folders["padfree"]).name.startswith("padfree-")
    for key in ("num_samples", "num_rows", "num_tokens", "num_supervised_tokens", "num_capacity_tokens",
                "pack_window", "micro_batch_size", "grouping", "only_single_turn"):
        assert getattr(free, key) == getattr(pad, key), key
    assert free.padding_fraction == 0 < pad.padding_fraction and free.num_batch_tokens == free.num_tokens
    assert shard_rows(folders["padfree"]) == shard_rows(folders["padding"]) != []
    flat = {arm: {p.name: p.read_bytes() for p in sorted((Path(folders[arm]) / "flat").iterdir())}
            for arm in ("padding", "padfree")}
    assert flat["padfree"] == flat["padding"]


def test_padfree_takes_paddings_steps_through_the_loop(prepared_real):
    """The loop's own step functions on both prepared arms (Worker.step_batches, optimizer_step; no Ray): the
    same run plan and the same rows in every step of every rank, padfree's micro-batches one row of exactly their
    tokens, and at step 0 the same loss and gradients as padding; the same flat rows with positions running on
    (cross) change the loss (negative control)."""
    from dataclasses import replace

    import torch

    from raypack.data.collate import arm_collation
    from raypack.data.prepared import RowStore
    from raypack.model import build_tiny_model, load_tokenizer
    from raypack.train.loop import Worker, optimizer_step
    from raypack.train.loss import step_denominator
    from raypack.train.plan import run_plan

    cfg, folders = prepared_real
    train = replace(cfg.train, num_workers=2, micro_batch_size=2, global_batch_size=8, epochs=2)
    pad_id = load_tokenizer(cfg.data.tokenizer).pad_token_id
    workers = {}
    for arm in ("padding", "padfree"):
        manifest = read_manifest(folders[arm])
        plan = run_plan(train, cfg.optim, manifest, 2)
        mode, flatten = arm_collation(manifest.strategy, manifest.attention, "sdpa")  # as set_up decides
        workers[arm] = [Worker(train=train, rank=r, world_size=2, device="cpu", manifest=manifest, plan=plan,
                               rows=RowStore.open(folders[arm]), mode=mode, flatten=flatten, pad_token_id=pad_id,
                               attn="sdpa", precision="fp32", engine=None, optimizer=None, shape={}, memory={})
                        for r in range(2)]
    plan = workers["padding"][0].plan
    assert workers["padfree"][0].plan == plan and plan.total_steps == 2 * (read_manifest(folders["padding"]).num_rows // 8)
    step0 = {}
    for step in range(plan.stop_step):
        for rank in range(2):
            pad_rows, _, pad_batches = workers["padding"][rank].step_batches(step)
            free_rows, picked, free_batches = workers["padfree"][rank].step_batches(step)
            assert [list(i) for i in free_rows] == [list(i) for i in pad_rows]
            assert len(free_batches) == plan.grad_accum
            for rows, batch in zip(picked, free_batches):
                assert batch["input_ids"].shape == (1, sum(int(r["num_tokens"]) for r in rows))
            assert sum(b["input_ids"].numel() for b in pad_batches) >= sum(b["input_ids"].numel() for b in free_batches)
            if step == 0:
                step0[rank] = {"padding": pad_batches, "padfree": free_batches,
                               "cross": [dict(b, position_ids=torch.arange(b["input_ids"].shape[1])[None])
                                         for b in free_batches]}

    class OneProcessEngine:
        """What optimizer_step asks of DeepSpeed's engine, in one process: the gradients are kept, not applied."""

        def __init__(self, model):
            self.module, self.device = model, torch.device("cpu")

        def __call__(self, **inputs):
            return self.module(**inputs)

        def backward(self, loss, scale_wrt_gas):
            assert scale_wrt_gas is False
            loss.backward()

        def step(self):
            pass

    results = {}  # rank 0's share of step 0 (the step's denominator counts both ranks)
    for arm in ("padding", "padfree", "cross"):
        model = build_tiny_model(seed=0, attn_implementation="sdpa")
        engine, optimizer = OneProcessEngine(model), torch.optim.AdamW(model.parameters())
        denominator = sum(step_denominator(step0[r][arm], "token") for r in range(2))
        loss_sum, num_supervised = optimizer_step(engine, optimizer, step0[0][arm], denominator, 1e-3, "token", 2)
        results[arm] = loss_sum / num_supervised, torch.cat([p.grad.flatten() for p in model.parameters()])
    (pad_loss, pad_grad), (free_loss, free_grad) = results["padding"], results["padfree"]
    assert abs(free_loss - pad_loss) < 1e-5
    assert (free_grad - pad_grad).abs().max() < 1e-5 * pad_grad.abs().max()
    assert abs(results["cross"][0] - pad_loss) > 1e-3


def test_validation_split_is_shared_and_disjoint(prepared_real):
    _, folders = prepared_real
    val_keys = {k for r in shard_rows(folders["val"]) for k in r["sample_keys"]}
    assert len(val_keys) == 6
    for arm in ("padding", "bfd-isolated", "random-cross"):
        train_keys = {k for r in shard_rows(folders[arm]) for k in r["sample_keys"]}
        assert not train_keys & val_keys
    padding_keys = [r["sample_keys"][0] for r in shard_rows(folders["padding"])]
    assert padding_keys == sorted(padding_keys)  # padding keeps input order


def test_rejected_rows_are_written_with_reason_and_row(prepared_real):
    _, folders = prepared_real
    tok_dir = Path(folders["padding"]).parent
    rejected = [json.loads(line) for line in (tok_dir / "rejected" / "rejected.jsonl").read_text().splitlines()]
    by_row = {r["row"]: r["reason"] for r in rejected if r["source"].endswith("bad_rows.jsonl")}
    assert by_row == {3: "unparseable_json", 4: "unknown_role", 5: "empty_content", 6: "no_assistant_turn",
                      7: "last_turn_not_assistant", 8: "non_string_content", 9: "missing_field",
                      10: "missing_field"}


def compare_report(out, real_files, *overrides) -> dict:
    """compare.json of `raypack compare` on prepared_real's config (plus these overrides), written under out."""
    from raypack.cli import main

    assert main(["compare", "jobs/compare.yaml", f"output_dir={out}", "data.max_seq_len=512", f"pack.arms={ARMS}",
                 f"data.sources=[{real_files}]", *REAL, *overrides]) == 0
    return json.loads((out / "compare" / "compare.json").read_text())


def compare_disagreements(report: dict, folders: dict) -> dict:
    """{(arm, key): (compare's value, the manifest's)} for every count of compare's arms a manifest differs on."""
    found = {}
    for arm, stats in report["arms"].items():
        manifest = read_manifest(folders[arm]).to_dict()
        assert set(stats) - {"seconds", "max_row_len"} <= set(manifest), arm  # nothing escapes the comparison
        found.update({(arm, key): (value, manifest[key]) for key, value in stats.items()
                      if key in manifest and key not in TIMINGS and value != manifest[key]})
    return found


def test_compare_holds_out_the_validation_split_prepare_holds_out(prepared_real, real_files, tmp_path):
    """`raypack compare` (in process) holds out the conversations `raypack prepare` holds out, so every count of
    every arm is the arm's manifest's: samples, rows, tokens, supervised tokens, padding, lower bound, held-out
    conversations. Negative control: with nothing held out compare packs more samples in every arm, and the
    comparison says so."""
    _, folders = prepared_real
    report = compare_report(tmp_path / "same", real_files)
    val = read_manifest(folders["val"])
    assert report["validation"] == {"num_val_conversations": 6, "num_val_samples": val.num_samples,
                                    "num_val_tokens": val.num_tokens,
                                    "num_val_supervised_tokens": val.num_supervised_tokens}
    assert set(report["arms"]) == set(folders) - {"val"}
    assert compare_disagreements(report, folders) == {}

    found = compare_disagreements(compare_report(tmp_path / "none", real_files, "data.val_count=0",
                                                  "data.val_fraction=0"), folders)
    for arm in report["arms"]:
        assert (arm, "num_samples") in found and (arm, "num_val_conversations") in found, (arm, found)
        assert found[(arm, "num_samples")][0] == found[(arm, "num_samples")][1] + val.num_samples


def test_compare_keys_conversations_as_the_read_stage_does(real_files):
    """conversation_keys gives each conversation compare loads the read stage's key (file index << 40 | row; the
    reference loads file by file), a file listed twice two sets of keys (negative control: a key per path, as
    one might take it from the conversation's source, repeats them)."""
    from raypack.config import DataConfig, SynthConfig
    from raypack.data import formats
    from raypack.data.local import conversation_keys, expand_sources

    data = DataConfig(sources=[str(real_files), str(real_files / "sharegpt_small.json")])
    paths = expand_sources(data.sources)
    expected = [(index << KEY_ROW_BITS) | int(c["source"].rpartition(":")[2]) for index, path in enumerate(paths)
                for c in formats.load_conversations([path]).conversations]
    conversations = load_or_synth(data, SynthConfig()).conversations
    assert conversation_keys(data, conversations).tolist() == expected
    assert len(set(expected)) == len(expected) == 62 + 20  # the folder's conversations, then sharegpt's again
    per_path = [(paths.index(path) << KEY_ROW_BITS) | int(row)
                for path, _, row in (c["source"].rpartition(":") for c in conversations)]
    assert len(set(per_path)) == 62 < len(per_path)


def test_synth_read_tasks_make_every_task_alone_or_together():
    """The read stage's synth tasks (one per block, in any worker, in any order) give a task's rows as
    raypack.data.synth makes them in sequence, keyed 1..n as compare keys them; the words task's cache identity is
    what it was before tasks existed (prepared caches stay valid)."""
    import pyarrow as pa

    from raypack.config import DataConfig, SynthConfig
    from raypack.data import facts, synth
    from raypack.data.local import conversation_keys
    from raypack.data.pipeline.read import _synth_rows, resolve_inputs

    cfg = SynthConfig(task="facts", num_entities=300, per_entity=4)  # 1200 rows: blocks of 1000 and 200
    together = pa.concat_tables(_synth_rows({"id": [0, 1]}, cfg, "tiny")).to_pylist()
    facts.world.cache_clear()  # a fresh worker
    apart = [*_synth_rows({"id": [1]}, cfg, "tiny"), *_synth_rows({"id": [0]}, cfg, "tiny")]
    apart = sorted(pa.concat_tables(apart).to_pylist(), key=lambda r: r["key"])
    assert apart == together
    assert [json.loads(r["raw"]) for r in together] == list(synth.synth_rows(cfg))
    assert [r["key"] for r in together] == list(range(1, 1201))
    assert {r["source"].rpartition(":")[0] for r in together} == {"synth:facts"}
    local = load_or_synth(DataConfig(), cfg).conversations
    assert [c["messages"] for c in local] == [json.loads(r["raw"])["messages"] for r in together]
    assert conversation_keys(DataConfig(), local).tolist() == [r["key"] for r in together]
    assert resolve_inputs(DataConfig(), SynthConfig()).fingerprint == \
        ["synth", {"preset": "opensource-1.2m", "num_samples": 2000, "seed": 0}]


def test_rows_match_the_in_process_reference(ray_local, tmp_path):
    """With nothing held out and one window, the Ray pipeline's rows equal the pure core's."""
    cfg = config(tmp_path, "synth.num_samples=400", "data.val_fraction=0.0", "pack.window=0",
                 "pack.arms=[bfd-isolated, random-cross]")
    folders = prepare(cfg)
    reference = prepare_local(cfg)
    for arm in reference.arms:
        rows = shard_rows(folders[arm.arm])
        assert len(rows) == len(arm.rows)
        for got, want in zip(rows, arm.rows):
            for column in ("input_ids", "labels", "position_ids", "seq_lens"):
                assert got[column] == want[column].tolist()


def test_one_tokenization_serves_every_overlength_policy(ray_local, tmp_path):
    """Arms with +truncate/+split/+drop share one tokenized cache; each arm's samples and counts are those of
    tokenizing with its policy (the reference: tokenize_conversations applying the policy itself)."""
    arms = ["padding+truncate", "padding+split", "padding+drop", "greedy-cross+drop"]
    cfg = config(tmp_path, "synth.num_samples=300", "data.val_fraction=0.0", "data.max_seq_len=256",
                 f"pack.arms=[{', '.join(arms)}]")
    folders = prepare(cfg)
    assert len({Path(folders[arm]).parent for arm in arms}) == 1  # one tok-<hash>/ folder
    conversations = load_or_synth(cfg.data, cfg.synth).conversations
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    for arm in arms:
        policy = arm.split("+")[1]
        reference = tokenize_conversations(conversations, tokenizer, 256, overlength=policy)
        manifest = read_manifest(folders[arm])
        assert manifest.overlength == policy
        for key in ("num_truncated", "num_split", "num_dropped_too_long", "num_dropped_no_supervised"):
            assert getattr(manifest, key) == reference.counts[key], (arm, key)
        assert manifest.num_samples == reference.counts["num_samples"]
        assert manifest.num_supervised_tokens == reference.counts["num_supervised_tokens"]
        if arm.startswith("padding"):  # one sample per row, in input order
            assert [r["input_ids"] for r in shard_rows(folders[arm])] == \
                [s["input_ids"].tolist() for s in reference.samples]
    # Negative control: the policies do differ on this data.
    rows = {arm: read_manifest(folders[arm]).num_rows for arm in arms[:3]}
    assert rows["padding+drop"] < rows["padding+truncate"] < rows["padding+split"], rows


def groups_of(folders) -> dict:
    """The content groups a prepare wrote (load_groups), with the centroids they were assigned by."""
    (folder,) = Path(folders["bfd-cross+related"]).parent.glob("groups-*")
    return {**load_groups(folder), "centroids": np.load(folder / "clusters.npz")["centroids"], "folder": folder}


@pytest.fixture(scope="module")
def two_runs(ray_local, tmp_path_factory):
    """The same input prepared twice, into two folders: 1 tokenizer actor with batches of 64; then 2 actors with
    batches of 3, blocks of ~100 small chunks (what pyarrow's threaded writer put out of order), the cache written
    in one call and the content groups built on it in a later one with Ray Data's order setting off, as a new
    process that reuses the cache starts. Returns [(config, folders)] per run."""
    import ray.data

    def config_of(root, actors, batch, *arms):
        return config(root, "synth.num_samples=700", "pack.window=100", f"prepare.num_tokenizer_actors={actors}",
                      f"prepare.tokenize_batch_size={batch}", f"pack.arms=[{', '.join(arms)}]")

    runs = []
    for actors, batch in ((1, 64), (2, 3)):
        root = tmp_path_factory.mktemp(f"actors{actors}")
        if batch == 3:
            prepare(config_of(root, actors, batch, "greedy-cross"))
            ray.data.DataContext.get_current().execution_options.preserve_order = False
        cfg = config_of(root, actors, batch, "greedy-cross", "bfd-isolated", "bfd-cross+related")
        runs.append((cfg, prepare(cfg)))
    return runs


def test_output_is_byte_identical_whatever_the_workers_and_batches(two_runs):
    """Every split's shards, flat/ and manifest (timings aside), and the content groups, are the same bytes and
    arrays in both runs (negative control: tests/test_parallel_pack.py's other window changes them)."""
    (_, first), (_, second) = two_runs
    assert first.keys() == second.keys() == {"val", "greedy-cross", "bfd-isolated", "bfd-cross+related"}
    for name in first:
        files = split_files(first[name])
        assert sum(n.endswith(".parquet") for n in files) >= 1, name  # not vacuous: shards were written
        assert split_files(second[name]) == files, f"{name} differs between the runs"
    groups = [groups_of(folders) for _, folders in two_runs]
    for key in ("keys", "pieces", "clusters", "vectors", "centroids"):
        assert np.array_equal(groups[0][key], groups[1][key]), key
    assert read_manifest(first["bfd-cross+related"]).num_clusters > 1


def test_a_cache_out_of_input_order_is_refused(two_runs, tmp_path):
    """A reused tokenized cache whose rows are out of input order stops prepare, naming the cache, the row and the
    way out; its files are taken by their first key, not their names (a pure check on three files named in
    reverse)."""
    cfg, folders = two_runs[0]
    tok = Path(folders["val"]).parent
    copy = tmp_path / "prepared" / tok.name
    (copy / "tokenized").mkdir(parents=True)
    shutil.copy(tok / "tokenized.json", copy)
    table = pq.read_table(cache_files(tok / "tokenized"))
    cuts = [0, len(table) // 3, 2 * len(table) // 3, len(table)]
    thirds = [table.slice(lo, hi - lo) for lo, hi in pairwise(cuts)]
    for name, part in zip(("c", "b", "a"), thirds):  # names sort in reverse key order
        pq.write_table(part, copy / "tokenized" / f"{name}.parquet")
    files = cache_files(copy / "tokenized")
    assert [Path(f).name for f in files] == ["c.parquet", "b.parquet", "a.parquet"]
    assert read_cache_index(files, []).num_rows == len(table)

    pq.write_table(thirds[1].take(np.arange(len(thirds[1]))[::-1]), copy / "tokenized" / "b.parquet")  # negative
    with pytest.raises(RuntimeError, match=r"tokenized cache .* is not in input order: row \d+ .*prepare.reuse=false"):
        prepare(replace(cfg, prepare=replace(cfg.prepare, output_dir=str(tmp_path / "prepared"))))


def test_vectors_are_joined_to_their_clusters_by_key(two_runs, tmp_path):
    """load_groups pairs each vector with its cluster by (key, piece): vector files whose rows and names are
    shuffled give the same groups; a vector file that lacks a sample is refused (negative control)."""
    groups = groups_of(two_runs[0][1])
    copy = tmp_path / "groups"
    shutil.copytree(groups["folder"], copy)
    vectors = pq.read_table(shard_files(copy / "vectors"))
    shutil.rmtree(copy / "vectors")
    (copy / "vectors").mkdir()
    shuffled = vectors.take(np.random.default_rng(0).permutation(len(vectors)))
    half = len(shuffled) // 2
    pq.write_table(shuffled.slice(0, half), copy / "vectors" / "b.parquet")
    pq.write_table(shuffled.slice(half), copy / "vectors" / "a.parquet")
    loaded = load_groups(copy)
    for key in ("keys", "pieces", "clusters", "vectors"):
        assert np.array_equal(loaded[key], groups[key]), key
    pq.write_table(shuffled.slice(half + 1), copy / "vectors" / "a.parquet")
    with pytest.raises(RuntimeError, match="do not hold the same samples"):
        load_groups(copy)


def test_the_ordered_writer_keeps_rows_where_rays_parquet_sink_does_not(tmp_path):
    """A table of 512 chunks, written with 8 pyarrow threads (a worker with OMP_NUM_THREADS=8): write_in_order keeps
    every row in place; Ray 2.60's Parquet sink (what Dataset.write_parquet runs: pyarrow.dataset.write_dataset
    with use_threads=True) puts some out of order (negative control; about 9 writes in 10 on a 2-core machine)."""
    import pyarrow as pa
    from ray.data._internal.datasource.parquet_datasink import ParquetDatasink

    rows = 32
    table = pa.concat_tables([pa.table({"key": pa.array(np.arange(c * rows, (c + 1) * rows), pa.int64()),
                                        "ids": pa.array([[c, c + 1]] * rows, pa.list_(pa.int32()))})
                              for c in range(512)])
    threads = pa.cpu_count()
    pa.set_cpu_count(8)
    try:
        for i in range(5):
            write_in_order(table, str(tmp_path / f"ours-{i}.parquet"))
            keys = pq.read_table(tmp_path / f"ours-{i}.parquet")["key"].to_numpy()
            assert np.array_equal(keys, np.arange(len(table)))
        for i in range(40):
            folder = tmp_path / f"ray-{i}"
            ParquetDatasink(str(folder))._write_parquet_files([table], f"part_{i}", table.schema, str(i), {}, None)
            keys = pq.read_table(folder)["key"].to_numpy()
            assert sorted(keys) == list(range(len(table)))  # every row is there ...
            if not np.array_equal(keys, np.arange(len(table))):
                break  # ... but not in order
        else:
            pytest.fail("Ray's Parquet sink kept the order in 40 writes: has Ray fixed it? (then write_parquet may do)")
    finally:
        pa.set_cpu_count(threads)


def test_prepared_outputs_are_reused(ray_local, tmp_path, capsys):
    cfg = config(tmp_path, "synth.num_samples=200", "pack.arms=[padding]")
    first = prepare(cfg)
    stamp = (Path(first["padding"]) / "manifest.json").stat().st_mtime_ns
    cfg2 = config(tmp_path, "synth.num_samples=200", "pack.arms=[padding, bfd-isolated]")
    second = prepare(cfg2)
    assert "reusing tokenized data" in capsys.readouterr().out
    assert second["padding"] == first["padding"]
    assert (Path(second["padding"]) / "manifest.json").stat().st_mtime_ns == stamp
    assert read_manifest(second["bfd-isolated"]).num_samples == read_manifest(first["padding"]).num_samples


def test_strict_fails_with_file_and_row(ray_local, real_files, tmp_path):
    cfg = config(tmp_path, f"data.sources=[{real_files / 'bad_rows.jsonl'}]", "data.strict=true")
    with pytest.raises(FormatError, match=r"bad_rows.jsonl:3"):
        prepare(cfg)


def test_uri_and_hub_style_sources(ray_local, real_files, tmp_path):
    """A pyarrow URI (file://, as s3:// or gs:// on a cluster) and a Hugging Face dataset (hf:, here a local
    repository under data.hf_root) read the same rows."""
    shutil.copy(FIXTURES / "sharegpt_small.json", tmp_path / "rows.json")
    local = config(tmp_path / "a", f"data.sources=[{tmp_path / 'rows.json'}]", "pack.arms=[padding]")
    uri = config(tmp_path / "b", f"data.sources=['file://{tmp_path / 'rows.json'}']", "pack.arms=[padding]")
    hub_dir = tmp_path / "hub" / "local" / "rows"
    hub_dir.mkdir(parents=True)
    rows = json.loads((tmp_path / "rows.json").read_text())
    (hub_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hub = config(tmp_path / "c", "data.sources=['hf:local/rows']", f"data.hf_root={tmp_path / 'hub'}",
                 "pack.arms=[padding]")
    results = [prepare(cfg) for cfg in (local, uri, hub)]
    manifests = [read_manifest(r["padding"]) for r in results]
    assert {m.num_input_rows for m in manifests} == {20}
    assert len({m.num_supervised_tokens for m in manifests}) == 1
    tokens = [[r["input_ids"] for r in shard_rows(res["padding"])] for res in results]
    assert tokens[0] == tokens[1] == tokens[2]


def test_prepare_command_prints_the_manifest_table(ray_local, tmp_path, capsys):
    from raypack.cli import main

    rc = main(["prepare", "jobs/compare.yaml", f"prepare.output_dir={tmp_path}", "synth.num_samples=120",
               "data.max_seq_len=512", "pack.arms=[padding, bfd-isolated]"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "held out for validation" in out and "bfd-isolated" in out and "val" in out


def test_prepared_folders_are_absolute(ray_local, tmp_path, monkeypatch):
    """A relative prepare.output_dir still gives folders that workers in another directory can open."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(Path(__file__).parent.parent / "jobs" / "compare.yaml"),
                      ["prepare.output_dir=relative-prepared", "synth.num_samples=60", "data.max_seq_len=256",
                       "pack.arms=[padding]"])
    folders = prepare(cfg)
    assert all(Path(f).is_absolute() and (Path(f) / "manifest.json").exists() for f in folders.values())


def new_files_outside(root: Path, output_dir: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not p.is_relative_to(root / output_dir))


def test_commands_write_only_under_output_dir(ray_local, tmp_path, monkeypatch):
    """compare, prepare and plan, run from a folder with a relative output_dir, write nothing beside it.

    Negative control: prepare.output_dir set to a folder of its own (what the old default `prepared` did inside the
    repo) is seen writing outside."""
    from raypack.cli import main

    job = str(Path(__file__).parent.parent / "jobs" / "compare.yaml")
    monkeypatch.chdir(tmp_path)
    small = ["output_dir=o", "synth.num_samples=60", "data.max_seq_len=256", "pack.arms=[padding, bfd-isolated]",
             "train.global_batch_size=4"]
    for command in ("compare", "prepare", "plan"):
        assert main([command, job, *small]) == 0, command
    assert (tmp_path / "o" / "prepared").is_dir()
    assert new_files_outside(tmp_path, "o") == []

    assert main(["prepare", job, *small, "prepare.output_dir=prepared"]) == 0
    assert any(f.startswith("prepared/") for f in new_files_outside(tmp_path, "o"))
