"""cluster.yaml passes Ray's own cluster-config validation and keeps the cluster's promises; jobs/paper-*.yaml fit it
(counts, and memory per GPU and per node by `raypack plan`'s estimate, raypack.train.memory).

    .venv/bin/python -m pytest -q tests/test_cluster.py

Offline: Ray's `prepare_config` fills the AWS defaults from the installed ray's
defaults.yaml and `validate_config` checks the result against its ray-schema.json,
exactly as `ray up` does before it contacts AWS. Mutated copies of the same config
must fail that validation, so the positive test cannot pass vacuously.
"""

import copy
import itertools
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raypack.config import PlanConfig, load_config
from raypack.train.memory import budget, estimate_job, fits, model_shape

ROOT = Path(__file__).parent.parent
CLUSTER = ROOT / "cluster.yaml"
PAPER_JOBS = sorted((ROOT / "jobs").glob("paper-*.yaml"))
EFS = "/mnt/raypack"
# One node of each GPU instance type (AWS data sheets): GPUs, GiB per GPU, GiB of host memory.
INSTANCE_MEMORY = {"p5.48xlarge": (8, 80, 2048), "p4de.24xlarge": (8, 80, 1152)}


@pytest.fixture()
def config():
    return yaml.safe_load(CLUSTER.read_text())


def validate(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def gpu_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


def node_plan(node_type: dict) -> PlanConfig:
    """What `raypack plan` must fit: one node of this type, default headroom."""
    gpus, gpu_gib, host_gib = INSTANCE_MEMORY[node_type["node_config"]["InstanceType"]]
    assert node_type["resources"]["GPU"] == gpus
    return PlanConfig(gpu_memory_gib=gpu_gib, gpus_per_node=gpus, cpu_memory_gib=host_gib)


def arms_that_fit(cfg, plan: PlanConfig) -> dict[str, bool]:
    limits = budget(plan, cfg.train)
    arms = estimate_job(cfg, model_shape(cfg.model.name_or_path))
    return {arm: fits(estimate, limits, cfg.train.use_gpu) for arm, estimate in arms.items()}


def ray_start_lines(commands: list[str]) -> list[str]:
    return [c for c in commands if "ray start" in c]


def test_cluster_yaml_passes_rays_schema_validation(config):
    prepared = validate(config)
    assert prepared["head_node_type"] == "head"


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c.update(unknown_top_level_key=1), jsonschema.ValidationError),
    (lambda c: c.update(max_workers="twelve"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu-8b"]["resources"].update(GPU=0.5), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["cpu"].update(min_wokers=0), jsonschema.ValidationError),
    (lambda c: c["docker"].update(image=["rayproject/ray"]), jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="gpu-9b"), ValueError),
], ids=["unknown-key", "max-workers-type", "fractional-gpu", "misspelt-node-key", "image-type", "missing-head-type"])
def test_rays_validation_rejects_broken_copies(config, mutate, error):
    mutate(config)
    with pytest.raises(error):
        validate(config)


def test_head_is_cpu_only_and_takes_no_tasks(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    assert not re.match(r"(p|g|trn|inf)\d", head["node_config"]["InstanceType"]), "the head is a CPU instance"


def test_worker_types_autoscale_from_zero_with_the_papers_gpus(config):
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    assert all(t["min_workers"] == 0 for t in workers.values())
    gpus = gpu_types(config)
    assert set(gpus) == {"gpu-8b", "gpu-70b"}
    for t in gpus.values():
        assert t["resources"]["GPU"] * t["max_workers"] == 32  # the paper's 4 nodes x 8 GPUs
        assert "--gpus all" in t["docker"]["worker_run_options"]
    cpu_only = [t for n, t in workers.items() if n not in gpus]
    assert cpu_only and all("docker" not in t for t in cpu_only)
    assert config["max_workers"] >= sum(t["max_workers"] for t in workers.values())


def test_image_is_the_pinned_rays_gpu_image(config):
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert f"ray=={ray.__version__}" in (ROOT / "constraints.txt").read_text().split()


def test_token_auth_on_every_node(config):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = config[key]
        starts = ray_start_lines(commands)
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key
        # `ray start` with token auth does not create a token: it must be in place before it.
        install = next(i for i, c in enumerate(commands) if "~/.ray/auth_token" in c)
        assert install < commands.index(starts[0])
    assert config["file_mounts"]["~/ray_auth_token"] == "~/.ray/auth_token"


def test_no_port_but_ssh_is_reachable_from_outside(config):
    # Ray's auto-created security group opens SSH to 0.0.0.0/0: every node type names its own group instead.
    assert "security_group" not in config["provider"]
    assert all(t["node_config"].get("SecurityGroupIds") for t in config["available_node_types"].values())
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    # The documented group: SSH (22) from one address, and everything only from the group itself.
    doc = (ROOT / "jobs" / "CLUSTER.md").read_text()
    rules = [shlex.split(line) for line in doc.splitlines() if "authorize-security-group-ingress" in line]
    assert len(rules) == 2
    for args in rules:
        opts = dict(itertools.pairwise(args))
        if "--source-group" in opts:
            assert opts["--source-group"] == opts["--group-id"] and opts["--protocol"] == "-1"
        else:
            assert opts["--protocol"] == "tcp" and opts["--port"] == "22"
            assert opts["--cidr"].endswith("/32")


def test_every_node_installs_raypack_under_the_constraints(config):
    assert config["file_mounts"]["/home/ray/raypack"] == "."
    install = [c for c in config["setup_commands"] if "pip install" in c]
    assert install == ["pip install -q --no-cache-dir -c /home/ray/raypack/constraints.txt "
                       "-e '/home/ray/raypack[paper-eval,embed]'"]
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()


def test_shared_storage_is_mounted_at_one_path_on_every_node(config):
    init = " ".join(config["initialization_commands"])
    assert "mount -t nfs4" in init and f":/ {EFS}" in init and "mountpoint -q" in init
    assert f"-v {EFS}:{EFS}" in config["docker"]["run_options"]
    # Per-node-type initialization_commands would replace the global ones and skip the mount.
    assert not any("initialization_commands" in t for t in config["available_node_types"].values())


def test_the_paper_grid_is_complete():
    names = {p.stem for p in PAPER_JOBS}
    assert names == {f"paper-{m}-{d}" for m in ("8b", "70b")
                     for d in ("wildchatgpt4", "tulu", "wildchat", "opensource1m")}


@pytest.mark.parametrize("path", PAPER_JOBS, ids=[p.name for p in PAPER_JOBS])
def test_paper_jobs_fit_the_cluster(path, config):
    cfg = load_config(path)
    gpus = gpu_types(config)["gpu-70b" if "-70b-" in path.name else "gpu-8b"]
    assert cfg.train.use_gpu and cfg.train.num_workers == gpus["resources"]["GPU"] * gpus["max_workers"]
    assert cfg.eval.num_gpus <= gpus["resources"]["GPU"]
    for shared in (cfg.output_dir, str(cfg.prepared_root()), cfg.study.out):
        assert shared.startswith(EFS + "/"), shared  # every node reads and writes the same files
    assert cfg.train.storage_path.startswith("s3://")  # checkpoints in the bucket the instance profiles allow
    assert cfg.study.out.endswith("/" + cfg.name)
    assert cfg.data.sources[0].startswith("hf:Super-shuhe/") and cfg.data.val_fraction == 0.1
    assert cfg.model.name_or_path == cfg.data.tokenizer
    assert cfg.data.max_seq_len == 4096 and cfg.pack.window == 1000 and cfg.train.zero_stage == 3
    assert (cfg.train.epochs, cfg.train.global_batch_size) == ((3, 64) if "-70b-" in path.name else (4, 128))
    assert cfg.train.offload_params == cfg.train.offload_optimizer == ("-70b-" in path.name)
    # Memory, not only counts: every arm fits one GPU and one node's host memory as configured.
    assert cfg.train.gradient_checkpointing
    assert all(arms_that_fit(cfg, node_plan(gpus)).values()), arms_that_fit(cfg, node_plan(gpus))
    # Evaluation: chat models prompted as trained; the bf16 weights, over the GPUs the one evaluation task splits
    # them on (all on one node), leave a fifth of each GPU for activations and the KV cache. 70B on one GPU would
    # not (the check can fail).
    assert cfg.eval.apply_chat_template and cfg.eval.fewshot_as_multiturn
    split = cfg.eval.num_gpus if cfg.eval.model_parallel or cfg.eval.backend == "vllm" else 1
    gpu_bytes = node_plan(gpus).gpu_memory_gib * 2**30
    assert 2 * model_shape(cfg.model.name_or_path).num_params / split < 0.8 * gpu_bytes
    assert 2 * model_shape("meta-llama/Meta-Llama-3-70B").num_params > gpu_bytes


@pytest.mark.parametrize("overrides", [
    ["train.zero_stage=2", "train.offload_params=false"],  # every GPU holds all 141 GB of bf16 parameters
    ["train.offload_optimizer=false", "train.offload_params=false", "train.gradient_checkpointing=false"],
], ids=["zero-2", "no-offload-no-checkpointing"])
def test_the_70b_job_does_not_fit_without_its_memory_settings(overrides, config):
    cfg = load_config(ROOT / "jobs" / "paper-70b-tulu.yaml", overrides)
    assert not any(arms_that_fit(cfg, node_plan(gpu_types(config)["gpu-70b"])).values())
