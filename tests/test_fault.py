"""Fault tolerance proven against the truth: interrupted runs end exactly where an uninterrupted one does.

One Ray cluster of real `ray start` processes for the module (a head node; a second
and third node join for the lost-node test), and every run is a `raypack` command
in its own driver process, killed from outside as a crash, a lost node or a spot
notice would. The truth is one uninterrupted `raypack study` of two arms (no
lm-eval, no probe): every interrupted run must give, for its arm,
    the same row ids at every step on every rank (rows-rank<r>.jsonl),
    the same per-step losses within 1e-6 (fp32 on CPU),
    the same final weights within 1e-6 (the exported model).
The model has attention dropout (0.1), so the losses match only when every rank's
random streams resume where they stopped (raypack.train.resume: each checkpoint holds
them). Interruptions: (a) a training worker SIGKILLed at a random step between two
checkpoints and, later in the same run, (d) SIGTERM to the driver: a checkpoint at
the next step boundary, exit 143, and the same command resumes; (b) the node
holding a worker lost mid-run, the run finishing once a node returns; (c) the
study's driver SIGKILLed mid-arm and the same command run again. Plus the safer defaults: a relaunch with another
batch size is refused naming the key, and train.resume=false starts afresh. And, without Ray, a checkpoint
restored from a stand-in object store: each node reads only its ranks' files and one copy of the shared ones
(raypack.train.restore), the whole-checkpoint download as the negative control.

    .venv/bin/pytest tests/test_fault.py -q
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from ray_nodes import RayNodes, free_port
from safetensors.numpy import load_file

ARMS = ["padding", "bfd-isolated"]
ARM = "bfd-isolated"
CHECKPOINT_EVERY = 4


def base_overrides(root: Path) -> list[str]:
    """The study's settings; a `raypack train` of one arm repeats what the study sets for it (a validation
    point every 2 steps, export) so that its run is the study's run of that arm. The model is a saved folder
    with attention dropout 0.1 (save_dropout_model): a resume matches only if each rank's random streams do."""
    return [f"prepare.output_dir={root / 'prepared'}", "synth.num_samples=200", "data.max_seq_len=256",
            f"model.name_or_path={root / 'model'}",
            f"pack.arms={json.dumps(ARMS)}", "train.num_workers=2", "train.micro_batch_size=2",
            "train.global_batch_size=8", "train.epochs=1", "optim.lr=0.001", "optim.warmup_ratio=0.0",
            "prepare.num_tokenizer_actors=1", f"train.checkpoint_every_steps={CHECKPOINT_EVERY}",
            "eval.preset=none", "probe.num_samples=0", "train.worker_cpus=1", "train.max_failures=2"]


def train_overrides(root: Path, name: str) -> list[str]:
    return [*base_overrides(root), f"name={name}", f"train.arm={ARM}", "train.eval_every_steps=2",
            f"train.storage_path={root / 'runs'}"]


@pytest.fixture(scope="module")
def cluster():
    """The head node, with room for both training workers (1 CPU each)."""
    nodes = RayNodes(Path(f"/tmp/rpf-{uuid.uuid4().hex[:8]}"))  # short: Ray's socket paths must stay < 108 chars
    # Ray 2.60's placement-group cleaner finds the state API by auto-detection, which on a machine running several
    # Ray instances (the test session's own) can reach another one and remove a live run's placement group
    # (ray-project/ray#65447); pointed at a closed port, a failed query means "keep watching".
    nodes.env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{free_port()}"
    try:
        nodes.start("head", num_cpus=2, resources='{"head": 2}')
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(nodes.tmp, ignore_errors=True)


DRIVERS: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def no_driver_left():
    """A test that fails while a driver runs kills it, so that it cannot disturb the next test."""
    yield
    while DRIVERS:
        proc = DRIVERS.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def raypack(cluster: RayNodes, args: list[str], log: Path, wait: bool = True):
    """`raypack ARGS` as its own driver process on the cluster; its output goes to `log`."""
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    out = log.open("a")
    proc = subprocess.Popen([sys.executable, "-m", "raypack.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    DRIVERS.append(proc)
    if wait:
        rc = proc.wait(timeout=900)
        assert rc == 0, log.read_text()[-4000:]
    return proc


DROPOUT = 0.1


def save_dropout_model(folder: Path) -> None:
    """The tiny Llama with attention dropout, saved as a Hugging Face folder (weights and tokenizer)."""
    from raypack.model import TINY, build_tiny_model, load_tokenizer

    build_tiny_model(seed=0, attention_dropout=DROPOUT).save_pretrained(folder, safe_serialization=True)
    load_tokenizer(TINY).save_pretrained(folder)


@pytest.fixture(scope="module")
def truth(cluster, tmp_path_factory, finished_studies):
    """The uninterrupted study: both arms trained one after the other, exported, never disturbed."""
    root = tmp_path_factory.mktemp("truth")
    save_dropout_model(root / "model")
    raypack(cluster, ["study", "jobs/compare.yaml", *base_overrides(root), "name=fault",
                      f"study.out={root / 'study'}"], root / "study.log")
    finished_studies["fault"] = root / "study"  # test_study's grid test combines it with its own
    return root


def run_dir_of_study(study: Path, arm: str) -> Path:
    return study / "train" / f"fault-seed0-{arm}" / "raypack"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def assert_same_run(run: Path, reference: Path) -> None:
    """Rows of every step on every rank, per-step losses and final weights equal the reference's."""
    for rank in range(2):
        rows, ref_rows = read_jsonl(run / f"rows-rank{rank}.jsonl"), read_jsonl(reference / f"rows-rank{rank}.jsonl")
        assert rows == ref_rows, f"rank {rank} trained other rows"
    losses = [m["loss"] for m in read_jsonl(run / "metrics.jsonl")]
    ref_losses = [m["loss"] for m in read_jsonl(reference / "metrics.jsonl")]
    assert len(losses) == len(ref_losses)
    assert np.max(np.abs(np.array(losses) - np.array(ref_losses))) <= 1e-6
    weights, ref_weights = load_file(run / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    assert weights.keys() == ref_weights.keys()
    for key in weights:
        assert np.max(np.abs(weights[key].astype(np.float64) - ref_weights[key])) <= 1e-6, key


def wait_for_step(metrics: Path, step: int, proc, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while True:
        if metrics.exists() and any(m["step"] >= step for m in read_jsonl(metrics)):
            return
        assert proc.poll() is None, f"the run ended before step {step}"
        assert time.time() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)


def test_reference_is_sensitive(truth):
    """Negative control: the two arms of the truth differ in rows, losses and weights, so assert_same_run can fail."""
    study = truth / "study"
    with pytest.raises(AssertionError):
        assert_same_run(run_dir_of_study(study, "padding"), run_dir_of_study(study, ARM))


def registered_checkpoint_step(run: Path) -> int:
    """The step of the latest checkpoint Ray Train has registered (what a restart restores), 0 if none.

    A reported checkpoint counts only once the controller has polled every rank's report,
    which can lag the save by a few steps; before that a restart would begin at step 0.
    """
    try:
        snapshot = json.loads((run.parent / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    latest = snapshot.get("latest_checkpoint_result")
    return latest["metrics"]["step"] if latest else 0


def kill_between_checkpoints(run: Path, proc, kill) -> tuple[int, int]:
    """Call kill() at a random step after a checkpoint has been registered; returns (that checkpoint's step,
    the last step logged before the kill)."""
    step = random.Random(os.getpid()).randint(CHECKPOINT_EVERY + 1, 2 * CHECKPOINT_EVERY - 1)
    wait_for_step(run / "metrics.jsonl", step, proc)
    deadline = time.time() + 120
    while registered_checkpoint_step(run) == 0:
        assert proc.poll() is None and time.time() < deadline, "no checkpoint registered before the run ended"
        time.sleep(0.05)
    registered = registered_checkpoint_step(run)
    last = read_jsonl(run / "metrics.jsonl")[-1]["step"]
    kill()
    assert last < 16, "the run had ended before the kill"
    return registered, last


def test_a_killed_worker_then_sigterm_then_the_same_command(cluster, truth, tmp_path):
    """One run, two interruptions. (a) SIGKILL to rank 1's process at a random step between two checkpoints:
    Ray restarts the workers from the last registered checkpoint. (d) Later, SIGTERM to the driver (a spot
    notice, `ray job stop`): the workers checkpoint at the next step boundary, the driver exits 143, and the
    same command again resumes from exactly there. The run ends as the truth did."""
    args = ["train", "jobs/compare.yaml", *train_overrides(truth, "interrupted")]
    run = truth / "runs" / f"interrupted-{ARM}" / "raypack"
    proc = raypack(cluster, args, tmp_path / "train.log", wait=False)

    def kill():
        os.kill(json.loads((run / "init-rank1.json").read_text())["pid"], signal.SIGKILL)

    registered, last = kill_between_checkpoints(run, proc, kill)
    deadline = time.time() + 900
    while not any(e["event"] == "resume" for e in read_jsonl(run / "events.jsonl")):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "train.log").read_text()[-4000:]
        time.sleep(0.05)
    (resumed,) = [e["step"] for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]
    assert registered <= resumed <= last, (registered, resumed, last)

    wait_for_step(run / "metrics.jsonl", last + 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 143, (tmp_path / "train.log").read_text()[-4000:]
    events = read_jsonl(run / "events.jsonl")
    (stopped,) = [e["step"] for e in events if e["event"] == "preempted"]
    assert last + 2 <= stopped < 16 and "done" not in [e["event"] for e in events]
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == list(range(1, stopped + 1))
    assert registered_checkpoint_step(run) == stopped  # the stop's own checkpoint, uploaded and registered
    assert "run the same command again" in (tmp_path / "train.log").read_text()

    raypack(cluster, args, tmp_path / "train.log")
    events = read_jsonl(run / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "resume"] == [resumed, stopped]
    assert all(e["rng_restored"] for e in events if e["event"] == "resume")
    assert_same_run(run, run_dir_of_study(truth / "study", ARM))


def test_a_killed_study_driver_and_the_same_command_again(cluster, truth, tmp_path):
    """(c) `raypack study` SIGKILLed while training its second arm; the same command again does not retrain
    the finished arm and resumes the half-trained one from its checkpoint."""
    study = tmp_path / "study"
    args = ["study", "jobs/compare.yaml", *base_overrides(truth), "name=fault", f"study.out={study}"]
    proc = raypack(cluster, args, tmp_path / "study.log", wait=False)
    run = run_dir_of_study(study, ARM)
    kill_between_checkpoints(run, proc, lambda: os.kill(proc.pid, signal.SIGKILL))
    proc.wait()
    finished = study / "runs" / "padding" / "seed0" / "result.json"
    before = finished.stat().st_mtime_ns
    time.sleep(3)  # let Ray clean up the dead driver's actors

    raypack(cluster, args, tmp_path / "again.log")
    assert finished.stat().st_mtime_ns == before
    assert "[padding seed 0] done before" in (tmp_path / "again.log").read_text()
    assert len([e for e in read_jsonl(run / "events.jsonl") if e["event"] == "resume"]) == 1
    for arm in ARMS:
        assert_same_run(run_dir_of_study(study, arm), run_dir_of_study(truth / "study", arm))


def test_a_lost_node(cluster, truth, tmp_path):
    """(b) One worker runs on a second node, which is lost mid-run (its whole process group SIGKILLed); the run
    goes on once a node returns, restarting from its last checkpoint, and ends as the truth did."""
    # The head keeps one CPU for training: a second driver holds the other with an actor pinned to it.
    hold = ("import ray, time; ray.init(); "
            "a = ray.remote(num_cpus=1, resources={'head': 1})(type('Hold', (), {'ok': lambda self: 1})).remote(); "
            "ray.get(a.ok.remote()); print('held', flush=True); time.sleep(3600)")
    blocker = subprocess.Popen(
        [sys.executable, "-c", hold],
        env={**cluster.env, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE, text=True)
    try:
        assert blocker.stdout.readline().strip() == "held"
        cluster.start("second", num_cpus=1)
        args = ["train", "jobs/compare.yaml", *train_overrides(truth, "lost-node")]
        run = truth / "runs" / f"lost-node-{ARM}" / "raypack"
        proc = raypack(cluster, args, tmp_path / "train.log", wait=False)
        wait_for_step(run / "metrics.jsonl", 1, proc)
        nodes = {json.loads((run / f"init-rank{r}.json").read_text())["node_id"] for r in range(2)}
        assert len(nodes) == 2, "both workers landed on one node"
        kill_between_checkpoints(run, proc, lambda: cluster.lose("second"))
        cluster.start("third", num_cpus=1)
        assert proc.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-4000:]
    finally:
        blocker.kill()
    events = read_jsonl(run / "events.jsonl")
    assert len([e for e in events if e["event"] == "resume"]) == 1, events
    assert_same_run(run, run_dir_of_study(truth / "study", ARM))


def test_a_relaunch_that_would_change_the_step_rows_is_refused(truth, tmp_path):
    """A checkpoint's position.json names what fixes a step's rows: another batch size or seed is refused
    naming each key; train.resume=false moves the old run aside instead (nothing is deleted)."""
    from raypack.config import ConfigError, load_config
    from raypack.data.pipeline import prepared_folders
    from raypack.train.launch import _check_resume, latest_checkpoint

    storage = tmp_path / "train"
    shutil.copytree(truth / "study" / "train" / f"fault-seed0-{ARM}", storage / f"fault-seed0-{ARM}")
    overrides = [*base_overrides(truth), "name=fault-seed0", f"train.storage_path={storage}"]
    cfg = load_config("jobs/compare.yaml", overrides)
    folder = prepared_folders(cfg)[ARM]
    assert latest_checkpoint(cfg, ARM) is not None
    _check_resume(cfg, ARM, folder)  # the same settings: accepted
    changed = load_config("jobs/compare.yaml", [*overrides, "train.global_batch_size=16", "train.seed=3"])
    with pytest.raises(ConfigError) as err:
        _check_resume(changed, ARM, folder)
    assert "train.global_batch_size: 8 in the checkpoint, 16 now" in str(err.value)
    assert "train.seed: 0 in the checkpoint, 3 now" in str(err.value)
    assert "train.micro_batch_size" not in str(err.value)
    _check_resume(load_config("jobs/compare.yaml", [*overrides, "train.global_batch_size=16",
                                                    "train.resume=false"]), ARM, folder)
    assert latest_checkpoint(changed, ARM) is None
    (aside,) = storage.glob(f"fault-seed0-{ARM}.replaced-*")
    assert (aside / "checkpoint_manager_snapshot.json").exists()


# A ZeRO-3 checkpoint of 4 ranks on 2 nodes as DeepSpeed names its files (raypack.train.restore's docstring), with a
# per-rank file at the top as the loop may add; the shared files include ZeRO 0-2's module states.
NODES = {0: [0, 1], 1: [2, 3]}
RANK_FILES = ["ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt", "ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt",
              "rng-rank{r}.json"]
SHARED_FILES = ["latest", "position.json", "config.json", "zero_to_fp32.py", "ds/mp_rank_00_model_states.pt"]


@pytest.mark.parametrize("name, ranks", [
    ("ds/zero_pp_rank_12_mp_rank_00_optim_states.pt", {12}), ("ds/bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt", {3}),
    ("ds/zero_pp_rank_0_mp_rank_00_model_states.pt", {0}), ("rng-rank3.json", {3}), ("rng/rank_3.pt", {3}),
    ("ds/offloaded_tensors/rank003/0.tensor.swp", {3}),
    ("ds/mp_rank_00_model_states.pt", set()),  # the model-parallel rank: every rank reads it
    ("ds/expp_rank_1_mp_rank_00_optim_states.pt", set()),  # an expert-parallel rank
    ("frank1.txt", set()), ("latest", set()), ("position.json", set()),
])
def test_a_checkpoint_file_belongs_to_the_ranks_its_name_carries(name, ranks):
    from raypack.train.restore import file_ranks

    assert file_ranks(name) == ranks


def test_a_checkpoint_in_object_storage_is_fetched_per_node_only_its_ranks_files(tmp_path):
    """raypack.train.restore.restored for 2 nodes x 2 ranks (threads, as the function sees only its ranks and a
    barrier; a node's second rank asks well after the first; the nodes one after the other, each having its own
    disk) from a stand-in object store that counts the bytes read. Each node reads exactly its ranks' files (ZeRO-3
    optimizer and model shards, a per-rank file at the top) plus one copy of the shared ones; every rank finds them
    in its node's folder byte for byte, no other rank's file is there, and the folder is removed after.
    Negative control: the whole-checkpoint download (Ray's to_directory, what `restored` did before) is told
    apart by the same count: every rank's shards on each node. every_rank (DeepSpeed's elastic checkpoint, every
    rank reading every shard) fetches the whole checkpoint once per node."""
    import threading

    import fsspec.implementations.local
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from raypack.train.restore import restored

    root = tmp_path / "ckpt"
    names = [f.format(r=r) for ranks in NODES.values() for r in ranks for f in RANK_FILES] + SHARED_FILES
    content = {}
    for i, name in enumerate(names):
        size = 50_000 + 1000 * i if name.endswith("optim_states.pt") else 100 + i
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content.setdefault(name, os.urandom(size)))
    total = sum(len(c) for c in content.values())
    read = []

    class CountingFS(fsspec.implementations.local.LocalFileSystem):
        """Object storage stand-in: a non-local pyarrow filesystem that counts the bytes read from its files."""

        def _open(self, path, mode="rb", **kwargs):
            f = super()._open(path, mode, **kwargs)
            if "r" in mode:
                plain_read = f.read
                f.read = lambda *args: read.append(len(data := plain_read(*args))) or data
            return f

    checkpoint = Checkpoint(str(root), filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(CountingFS())))

    def node(ranks: list[int], every_rank: bool = False) -> tuple[int, dict]:
        """The bytes this node read and what each of its ranks found in its folder."""
        read.clear()
        barrier, seen = threading.Barrier(len(ranks)), {}

        def rank(local_rank: int, world_rank: int) -> None:
            time.sleep(local_rank * 0.3)
            with restored(checkpoint, world_rank, local_rank, barrier.wait, every_rank) as folder:
                files = [p for p in Path(folder).rglob("*") if p.is_file()]
                seen[world_rank] = (folder, {p.relative_to(folder).as_posix(): p.read_bytes() for p in files})

        threads = [threading.Thread(target=rank, args=(i, r)) for i, r in enumerate(ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(Path(folder).exists() for folder, _ in seen.values())
        return sum(read), seen

    expected = {}
    for n, ranks in NODES.items():
        own = [f.format(r=r) for r in ranks for f in RANK_FILES] + SHARED_FILES
        expected[n] = sum(len(content[name]) for name in own)
        num_bytes, seen = node(ranks)
        assert num_bytes == expected[n]
        for r in ranks:
            assert seen[r][1] == {name: content[name] for name in own}, sorted(seen[r][1])

    num_bytes, seen = node(NODES[1], every_rank=True)
    assert num_bytes == total and seen[2][1] == seen[3][1] == content
    # The negative control: the whole checkpoint on one node, as Ray's to_directory fetches it, is told apart.
    read.clear()
    checkpoint.to_directory(str(tmp_path / "whole"))
    assert sum(read) == total and total not in expected.values()


def test_a_resume_without_the_random_state_would_differ(truth):
    """Negative control of the resumes above: with dropout, a step's loss depends on the random streams. The
    dropout model's loss on one of the truth's batches, computed as rank 0 resumes it from the truth's last
    checkpoint (its rng-rank0.pt restored), is reproduced exactly from that state; from the state a resume
    without it would have (the rank's fresh seed) it differs by far more than assert_same_run's 1e-6."""
    import torch
    from transformers import AutoModelForCausalLM

    from raypack.data.collate import collate
    from raypack.data.prepared import RowStore
    from raypack.model import TINY_PAD_ID
    from raypack.train.loss import micro_batch_loss, step_denominator
    from raypack.train.resume import load_rng_state, seed_rank

    model = AutoModelForCausalLM.from_pretrained(truth / "model").train()
    assert model.config.attention_dropout == DROPOUT
    (prepared,) = [p for p in (truth / "prepared").glob("tok-*/bfd-isolated-*") if (p / "manifest.json").exists()]
    batch = collate(RowStore.open(prepared).take([0, 1]), "cross", TINY_PAD_ID)
    run = truth / "study" / "train" / f"fault-seed0-{ARM}"
    checkpoint = max(p for p in run.glob("checkpoint_*") if p.is_dir())

    def loss() -> float:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return float(micro_batch_loss(logits, batch, "token", step_denominator([batch], "token"), 1).loss)

    restored = []
    for _ in range(2):
        assert load_rng_state(checkpoint, 0)
        restored.append(loss())
    seed_rank(0, 0)
    fresh = loss()
    assert restored[0] == restored[1]
    assert abs(fresh - restored[0]) > 1e-4, (fresh, restored)
