"""k8s/*.yaml: KubeRay's own CRD schemas, and what raypack's jobs ask of the cluster.

    .venv/bin/python -m pytest -q tests/test_k8s.py

Offline: no Kubernetes, no Ray start-up. Two layers:
- the RayCluster and the RayJobs validate against the `ray.io/v1` OpenAPI schemas of
  KubeRay v1.7.0's CRDs (tests/fixtures/kuberay; vendored, no registry ships them) the way
  `kubectl apply` checks them (Strict field validation: an unknown field is an error), plus
  the few rules of KubeRay's own validation.go that the schema leaves out and these files
  touch (names, replica bounds, token auth's Ray version). The CRDs' CEL rules concern
  fields raypack does not set and are not evaluated;
- the fields raypack depends on, one function each that returns the problems it finds: the
  head takes no work; the GPU groups hold what the jobs' ScalingConfig
  (raypack.train.launch.scaling_config) and evaluation task (raypack.eval.backend.eval_launch)
  ask for, within `raypack plan`'s memory estimate; a CPU group for Ray Data; autoscaling from
  zero; token auth from a Secret; no exposed dashboard; the shared volume; entrypoints that
  are real raypack commands on job files that load.
Each check also runs on mutated copies it must reject, so that none passes vacuously.
"""

import functools
import json
import math
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from raypack.cli import build_parser
from raypack.config import PlanConfig, load_config
from raypack.eval.backend import eval_launch
from raypack.study.run import study_dir
from raypack.train.launch import scaling_config
from raypack.train.memory import budget, estimate_job, fits, model_shape
from raypack.tune.sweep import sweep_dir

ROOT = Path(__file__).parent.parent
K8S = ROOT / "k8s"
SCHEMAS = Path(__file__).parent / "fixtures" / "kuberay"
KUBERAY = "1.7.0"  # the CRDs' release; jobs/CLUSTER.md installs this operator
SHARED = "/mnt/raypack"  # the jobs' output_dir, study.out, sweep.out
REPO_IN_IMAGE = "/home/ray/raypack"  # the Dockerfile's WORKDIR, where the entrypoints find jobs/
TOKEN_SECRET, ACCOUNT = "raypack-ray-token", "raypack"
GIB = 2**30
# The instance types the pods select: vCPUs, GiB of memory, GPUs, GiB per GPU (AWS data sheets).
INSTANCES = {"m7i.4xlarge": (16, 64, 0, 0), "m7i.8xlarge": (32, 128, 0, 0), "p5.48xlarge": (192, 2048, 8, 80)}
AUTOSCALER_SIDECAR = (0.5, 0.5)  # CPUs, GiB: the container KubeRay adds to the head (in-tree autoscaling)
# The jobs this cluster runs: the paper's grid and the RayJobs' job files.
SERVED = sorted((ROOT / "jobs").glob("paper-*.yaml")) + [ROOT / "jobs" / "sweep-8b.yaml"]
UNITS = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": GIB, "Ti": 2**40}


def load(name: str) -> list[dict]:
    # Through JSON: YAML anchors would share one dict between groups, and a mutation would hit both.
    return json.loads(json.dumps(list(yaml.safe_load_all((K8S / name).read_text()))))


@pytest.fixture()
def cluster() -> dict:
    (doc,) = load("raycluster.yaml")
    return doc


@functools.cache
def served_configs() -> tuple:
    return tuple(load_config(path) for path in SERVED)


# ---------------------------------------------------------------- KubeRay's schema and rules


def strict(schema):
    """kubectl's Strict field validation: an object schema with properties takes no others, unless marked
    x-kubernetes-preserve-unknown-fields (the API server would prune them silently; kubectl refuses)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    # OpenAPI v3.0 schema objects use Draft 4-7 keywords; x-kubernetes-* markers are ignored by jsonschema.
    schema = json.loads((SCHEMAS / f"ray.io_{kind.lower()}s.v1.json").read_text())
    return jsonschema.Draft7Validator(strict(schema))


def schema_errors(doc: dict) -> list[str]:
    if doc.get("apiVersion") != "ray.io/v1" or doc.get("kind") not in ("RayCluster", "RayJob"):
        return [f"not a ray.io/v1 RayCluster or RayJob: {doc.get('apiVersion')} {doc.get('kind')}"]
    errors = crd_validator(doc["kind"]).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def version(text: str) -> tuple:
    return tuple(int(part) for part in text.split("."))


def kuberay_rules(doc: dict) -> list[str]:
    """The rules of KubeRay's validation.go (v1.7.0) beyond the schema that these files touch."""
    problems = []
    name, limit = doc["metadata"]["name"], 53 if doc["kind"] == "RayCluster" else 47
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > limit:
        problems.append(f"metadata.name {name!r}: a DNS-1035 label of at most {limit} characters")
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        if spec.get("ttlSecondsAfterFinished", 0) < 0 or spec.get("backoffLimit", 0) < 0:
            problems.append("ttlSecondsAfterFinished and backoffLimit must be >= 0")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            return problems + ["one of rayClusterSpec or clusterSelector must be set"]
        spec = spec.get("rayClusterSpec") or {}
    for group in [spec.get("headGroupSpec", {}), *spec.get("workerGroupSpecs", [])]:
        params = group.get("rayStartParams") or {}
        if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params):
            problems.append(f"{group.get('groupName', 'head')}: resources in both rayStartParams and resources")
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31)
        if not low <= group.get("replicas", low) <= high:
            problems.append(f"{group['groupName']}: minReplicas <= replicas <= maxReplicas")
    if (spec.get("authOptions") or {}).get("mode") == "token" and version(spec.get("rayVersion", "0")) < (2, 52):
        problems.append("authOptions.mode token needs rayVersion >= 2.52.0")
    return problems


# ---------------------------------------------------------------- what raypack depends on


def quantity(value) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * (UNITS[unit] if unit else 1)


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay runs Ray in the first container


def templates(spec: dict) -> dict:
    return {"head": spec["headGroupSpec"]["template"]} | {g["groupName"]: g["template"] for g in
                                                            spec.get("workerGroupSpecs", [])}


def groups(spec: dict) -> dict:
    return {g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}


def ray_resources(group: dict) -> dict:
    """What Ray sees on one pod of a group: rayStartParams' num-cpus / num-gpus, else (as KubeRay fills them
    in) the Ray container's limits, else its requests."""
    res = ray_container(group["template"]).get("resources", {})
    limits = res.get("requests", {}) | res.get("limits", {})
    params = group.get("rayStartParams") or {}
    return {"CPU": float(params.get("num-cpus", quantity(limits.get("cpu", 0)))),
            "GPU": float(params.get("num-gpus", quantity(limits.get("nvidia.com/gpu", 0)))),
            "memory_gib": quantity(limits.get("memory", 0)) / GIB}


def instance(template: dict) -> tuple:
    return INSTANCES[template["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]]


def gpu_group(cfg) -> str:
    return "gpu-70b" if "70B" in cfg.model.name_or_path else "gpu-8b"


def head_problems(spec: dict, cfgs) -> list[str]:
    head = spec["headGroupSpec"]
    params, problems = head.get("rayStartParams") or {}, []
    if params.get("num-cpus") != "0" or params.get("num-gpus") != "0":
        problems.append("head: rayStartParams must say num-cpus \"0\" and num-gpus \"0\" (no task or actor there)")
    for c in head["template"]["spec"]["containers"]:
        res = c.get("resources", {})
        if "nvidia.com/gpu" in res.get("limits", {}) | res.get("requests", {}):
            problems.append(f"head: container {c['name']} asks for GPUs")
    if instance(head["template"])[2]:
        problems.append("head: runs on a GPU instance")
    return problems


def job_problems(spec: dict, cfgs) -> list[str]:
    """Each job on its GPU group: its Ray Train workers (ScalingConfig), its evaluation task on ONE pod, a sweep
    trial's driver, and `raypack plan`'s memory estimate with the pod's GPUs and memory as the node."""
    problems = []
    for cfg in cfgs:
        name = gpu_group(cfg)
        if name not in groups(spec):
            problems.append(f"{cfg.name}: no worker group {name}")
            continue
        group, pod = groups(spec)[name], ray_resources(groups(spec)[name])
        scaling = scaling_config(cfg.train)
        per_worker = {key: total / scaling.num_workers for key, total in scaling.total_resources.items() if total}
        per_pod = min(int(pod[key] // need) for key, need in per_worker.items())
        if per_pod == 0:
            problems.append(f"{cfg.name}: a {name} pod ({pod}) holds no worker ({per_worker})")
            continue
        pods = math.ceil(scaling.num_workers / per_pod)
        if group.get("maxReplicas", 0) < pods or scaling.num_workers % per_pod:
            problems.append(f"{cfg.name}: {scaling.num_workers} workers of {per_worker} need {pods} full {name} "
                            f"pods of {per_pod}, maxReplicas is {group.get('maxReplicas')}")
        ev = eval_launch(cfg.eval, "model", cfg.data.max_seq_len, on_ray=True)
        if ev.num_gpus > pod["GPU"] or ev.num_cpus > pod["CPU"]:
            problems.append(f"{cfg.name}: the evaluation task ({ev.num_gpus} GPUs, {ev.num_cpus} CPUs, one pod) "
                            f"does not fit a {name} pod ({pod})")
        if cfg.sweep.trial_cpus > pod["CPU"] or cfg.sweep.trial_gpus > pod["GPU"]:
            problems.append(f"{cfg.name}: a sweep trial's driver does not fit a {name} pod")
        gpu_gib = instance(group["template"])[3]
        if pod["GPU"] and gpu_gib:
            plan = PlanConfig(gpu_memory_gib=gpu_gib, gpus_per_node=int(pod["GPU"]), cpu_memory_gib=pod["memory_gib"])
            arms = estimate_job(cfg, model_shape(cfg.model.name_or_path))
            over = [arm for arm, est in arms.items() if not fits(est, budget(plan, cfg.train), cfg.train.use_gpu)]
            if over:
                problems.append(f"{cfg.name}: {over} do not fit the memory of a {name} pod ({pod})")
    return problems


def ray_data_problems(spec: dict, cfgs) -> list[str]:
    """A CPU-only group holds `raypack prepare`'s tokenizer actors and a packing task at once."""
    cpu = [g for g in groups(spec).values() if ray_resources(g)["GPU"] == 0]
    if not cpu:
        return ["no CPU-only worker group for Ray Data (prepare.*)"]
    capacity = sum(ray_resources(g)["CPU"] * g.get("maxReplicas", 0) for g in cpu)
    largest = max(ray_resources(g)["CPU"] for g in cpu)
    problems = []
    for cfg in cfgs:
        p = cfg.prepare
        need = p.num_tokenizer_actors * p.actor_num_cpus + p.pack_num_cpus
        if need > capacity or max(p.actor_num_cpus, p.pack_num_cpus) > largest:
            problems.append(f"{cfg.name}: prepare needs {need} CPUs, the CPU groups hold {capacity}")
    return problems


def autoscaling_problems(spec: dict, cfgs) -> list[str]:
    """Pods start when a job asks Ray for them and none is billed while idle; a GPU group's maximum is what its
    largest job needs (32 GPUs: 4 pods of 8)."""
    problems = [] if spec.get("enableInTreeAutoscaling") is True else ["enableInTreeAutoscaling is not true"]
    for name, group in groups(spec).items():
        if group.get("minReplicas") != 0 or group.get("replicas", 0) != 0:
            problems.append(f"{name}: minReplicas and replicas must be 0 (scale from zero)")
    for name in {gpu_group(cfg) for cfg in cfgs} & set(groups(spec)):
        gpus = ray_resources(groups(spec)[name])["GPU"]
        needed = max(math.ceil(cfg.train.num_workers / gpus) for cfg in cfgs if gpu_group(cfg) == name) if gpus else 0
        if groups(spec)[name].get("maxReplicas") != needed:
            problems.append(f"{name}: maxReplicas {groups(spec)[name].get('maxReplicas')}, its jobs need {needed}")
    return problems


def auth_problems(spec: dict, cfgs) -> list[str]:
    """Ray token auth with the token from the Secret the docs create (KubeRay then sets RAY_AUTH_MODE=token and
    RAY_AUTH_TOKEN from it in every Ray container); no container turns it off or carries a token itself."""
    problems = []
    if spec.get("authOptions") != {"mode": "token", "secretName": TOKEN_SECRET}:
        problems.append(f"authOptions must be mode token with secretName {TOKEN_SECRET}: {spec.get('authOptions')}")
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"rayVersion {spec.get('rayVersion')} is not the pinned Ray {ray.__version__}")
    for name, template in templates(spec).items():
        for env in (e for c in template["spec"]["containers"] for e in c.get("env", [])):
            if ((env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token")
                    or (env["name"] == "RAY_AUTH_TOKEN" and "value" in env)):
                problems.append(f"{name}: {env['name']} set in the manifest")
    return problems


def exposure_problems(spec: dict, cfgs) -> list[str]:
    """The dashboard and job API stay inside the cluster: reached through kubectl port-forward only."""
    head, problems = spec["headGroupSpec"], []
    if head.get("serviceType", "ClusterIP") != "ClusterIP" or head.get("enableIngress"):
        problems.append(f"head: serviceType {head.get('serviceType')}, enableIngress {head.get('enableIngress')}")
    for name, template in templates(spec).items():
        ports = [p for c in template["spec"]["containers"] for p in c.get("ports", [])]
        if template["spec"].get("hostNetwork") or any("hostPort" in p for p in ports):
            problems.append(f"{name}: a port on the node's network")
    return problems


def storage_problems(spec: dict, cfgs) -> list[str]:
    """Every pod mounts the shared claim where the jobs keep their files, and runs as the S3 service account."""
    problems = []
    for name, template in templates(spec).items():
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in template["spec"].get("volumes", [])
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: claims.get(m["name"]) for m in ray_container(template).get("volumeMounts", [])}
        if mounts.get(SHARED) != "raypack-shared":
            problems.append(f"{name}: the claim raypack-shared is not mounted at {SHARED}")
        if template["spec"].get("serviceAccountName") != ACCOUNT:
            problems.append(f"{name}: not the {ACCOUNT} service account (S3)")
    for cfg in cfgs:
        paths = [cfg.output_dir, cfg.prepared_root(), study_dir(cfg), sweep_dir(cfg)]
        problems += [f"{cfg.name}: {p} is not on the shared volume" for p in map(str, paths)
                     if not p.startswith(SHARED + "/")]
    return problems


def pod_fit_problems(spec: dict, cfgs) -> list[str]:
    """Each pod fits its instance type, short of what kubelet and the DaemonSets keep (a vCPU, a tenth of the
    memory); a GPU pod takes its node's every GPU; requests equal limits (Guaranteed: evicted last)."""
    problems = []
    for name, template in templates(spec).items():
        vcpus, gib, gpus, _ = instance(template)
        res = ray_container(template)["resources"]
        extra = AUTOSCALER_SIDECAR if name == "head" else (0, 0)
        cpu, memory = quantity(res["requests"]["cpu"]) + extra[0], quantity(res["requests"]["memory"]) / GIB + extra[1]
        if cpu > vcpus - 1 or memory > 0.9 * gib:
            problems.append(f"{name}: {cpu} CPUs, {memory} GiB do not fit {vcpus} vCPUs, {gib} GiB")
        if quantity(res["requests"].get("nvidia.com/gpu", 0)) != gpus or res["requests"] != res["limits"]:
            problems.append(f"{name}: GPUs {res['requests'].get('nvidia.com/gpu')} of the node's {gpus}, or "
                            "requests differ from limits")
    return problems


CHECKS = {f.__name__.removesuffix("_problems"): f for f in (
    head_problems, job_problems, ray_data_problems, autoscaling_problems, auth_problems, exposure_problems,
    storage_problems, pod_fit_problems)}


def rayjob_problems(rayjob: dict, cluster_spec: dict) -> list[str]:
    """A RayJob runs one raypack study or sweep on its own copy of k8s/raycluster.yaml's cluster, deleted after."""
    spec, problems = rayjob["spec"], []
    if spec.get("rayClusterSpec") != cluster_spec or "clusterSelector" in spec:
        problems.append("rayClusterSpec differs from k8s/raycluster.yaml's spec")
    if spec.get("shutdownAfterJobFinishes") is not True or not spec.get("ttlSecondsAfterFinished", 0) > 0:
        problems.append("shutdownAfterJobFinishes must be true, with a ttlSecondsAfterFinished")
    try:
        args, cfg = entrypoint(spec["entrypoint"])
    except (ValueError, SystemExit) as err:
        return problems + [f"entrypoint {spec['entrypoint']!r}: {err!r}"]
    if args.entry.name not in ("study", "sweep"):
        problems.append(f"entrypoint runs raypack {args.entry.name}, not study or sweep")
    if args.entry.name == "study" and not cfg.train.storage_path.startswith("s3://"):
        problems.append(f"checkpoints go to {cfg.train.storage_path}, not object storage")
    return problems


def entrypoint(command: str) -> tuple:
    """The raypack command line of an entrypoint, parsed by raypack's own CLI, and its config loaded from the
    repo's file at the path the image holds it (any error is raised)."""
    argv = shlex.split(command)
    if argv[0] != "raypack":
        raise ValueError("not a raypack command")
    args = build_parser().parse_args(argv[1:])
    path = Path(args.config)
    if not path.is_relative_to(REPO_IN_IMAGE):
        raise ValueError(f"{path} is not in the image's repo ({REPO_IN_IMAGE})")
    return args, load_config(ROOT / path.relative_to(REPO_IN_IMAGE), args.overrides)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob-study.yaml", "rayjob-sweep.yaml"])
def test_manifests_pass_kuberays_crd_schema_and_rules(name):
    for doc in load(name):
        assert schema_errors(doc) == [] and kuberay_rules(doc) == []


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["spec"].update(workerGroupSpec=d["spec"].pop("workerGroupSpecs")), "workerGroupSpec"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas="four"), "'four' is not of type 'integer'"),
    (lambda d: d["spec"]["authOptions"].update(mode="password"), "'password' is not one of"),
    (lambda d: ray_container(d["spec"]["workerGroupSpecs"][1]["template"])["resources"]["limits"].update(
        {"nvidia.com/gpu": "eight"}), "nvidia.com/gpu"),
    (lambda d: ray_container(d["spec"]["headGroupSpec"]["template"]).update(imagePullPolicyy="Always"),
     "imagePullPolicyy"),
    (lambda d: d["spec"].pop("headGroupSpec"), "'headGroupSpec' is a required property"),
    (lambda d: d.update(apiVersion="ray.io/v1alpha1"), "not a ray.io/v1"),
], ids=["misspelt-field", "replicas-type", "auth-mode", "gpu-quantity", "unknown-container-field", "no-head",
        "old-api"])
def test_the_schema_rejects_broken_copies(cluster, mutate, expected):
    mutate(cluster)
    assert any(expected in error for error in schema_errors(cluster)), schema_errors(cluster)


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["metadata"].update(name="RayPack"), "DNS-1035"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas=5), "minReplicas <= replicas <= maxReplicas"),
    (lambda d: d["spec"].update(rayVersion="2.51.0"), "rayVersion >= 2.52.0"),
], ids=["name", "replica-bounds", "old-ray-with-token"])
def test_kuberays_rules_reject_broken_copies(cluster, mutate, expected):
    mutate(cluster)
    assert any(expected in p for p in kuberay_rules(cluster)), kuberay_rules(cluster)


@pytest.mark.parametrize("check", CHECKS)
def test_the_cluster_keeps_raypacks_promises(cluster, check):
    assert CHECKS[check](cluster["spec"], served_configs()) == []


def _group(doc: dict, name: str) -> dict:
    return groups(doc["spec"])[name]


def _set_resources(doc: dict, name: str, **values) -> None:
    res = ray_container(_group(doc, name)["template"])["resources"]
    for key in ("requests", "limits"):
        res[key] = res[key] | values


def _head_env(doc: dict, **env) -> None:
    ray_container(doc["spec"]["headGroupSpec"]["template"])["env"] += [{"name": k, "value": v} for k, v in env.items()]


# Each: a broken copy, the check that must reject it, and a word of the problem it must report.
BROKEN = {
    "gpu-head": (lambda d: (d["spec"]["headGroupSpec"]["rayStartParams"].pop("num-gpus"), ray_container(
        d["spec"]["headGroupSpec"]["template"])["resources"]["limits"].update({"nvidia.com/gpu": "8"})),
                 "head", "GPU"),
    "head-takes-tasks": (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus"), "head", "num-cpus"),
    "head-on-a-gpu-node": (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["nodeSelector"].update(
        {"node.kubernetes.io/instance-type": "p5.48xlarge"}), "head", "GPU instance"),
    "70b-pods-of-4-gpus": (lambda d: (_set_resources(d, "gpu-70b", **{"nvidia.com/gpu": "4"}),
                                      _group(d, "gpu-70b").update(maxReplicas=8)), "job", "evaluation task"),
    "70b-pods-short-of-memory": (lambda d: _set_resources(d, "gpu-70b", memory="256Gi"), "job", "memory"),
    "too-few-8b-pods": (lambda d: _group(d, "gpu-8b").update(maxReplicas=2), "job", "maxReplicas is 2"),
    "no-70b-group": (lambda d: d["spec"]["workerGroupSpecs"].remove(_group(d, "gpu-70b")), "job", "no worker group"),
    "no-cpu-group": (lambda d: d["spec"]["workerGroupSpecs"].remove(_group(d, "cpu")), "ray_data", "CPU-only"),
    "small-cpu-group": (lambda d: _group(d, "cpu").update(maxReplicas=0), "ray_data", "prepare needs"),
    "no-autoscaler": (lambda d: d["spec"].update(enableInTreeAutoscaling=False), "autoscaling", "enableInTree"),
    "gpus-always-on": (lambda d: _group(d, "gpu-8b").update(minReplicas=1, replicas=1), "autoscaling",
                       "scale from zero"),
    "spare-gpu-pods": (lambda d: _group(d, "gpu-70b").update(maxReplicas=8), "autoscaling", "need 4"),
    "no-auth": (lambda d: d["spec"].pop("authOptions"), "auth", "authOptions"),
    "auth-disabled": (lambda d: d["spec"]["authOptions"].update(mode="disabled"), "auth", "authOptions"),
    "generated-token": (lambda d: d["spec"]["authOptions"].pop("secretName"), "auth", "secretName"),
    "token-in-manifest": (lambda d: _head_env(d, RAY_AUTH_TOKEN="abc"), "auth", "RAY_AUTH_TOKEN"),
    "auth-off-in-a-container": (lambda d: _head_env(d, RAY_AUTH_MODE="disabled"), "auth", "RAY_AUTH_MODE"),
    "other-ray": (lambda d: d["spec"].update(rayVersion="2.52.0"), "auth", "pinned Ray"),
    "load-balancer": (lambda d: d["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"), "exposure",
                      "LoadBalancer"),
    "ingress": (lambda d: d["spec"]["headGroupSpec"].update(enableIngress=True), "exposure", "enableIngress True"),
    "host-port": (lambda d: ray_container(d["spec"]["headGroupSpec"]["template"])["ports"][1].update(
        hostPort=8265), "exposure", "node's network"),
    "volume-elsewhere": (lambda d: ray_container(_group(d, "gpu-70b")["template"])["volumeMounts"][0].update(
        mountPath="/mnt/other"), "storage", "gpu-70b"),
    "no-s3-account": (lambda d: _group(d, "cpu")["template"]["spec"].pop("serviceAccountName"), "storage",
                      "service account"),
    "head-fills-its-node": (lambda d: ray_container(d["spec"]["headGroupSpec"]["template"]).update(
        resources={"requests": {"cpu": "16", "memory": "64Gi"}, "limits": {"cpu": "16", "memory": "64Gi"}}),
                            "pod_fit", "do not fit"),
    "half-a-gpu-node": (lambda d: _set_resources(d, "gpu-8b", **{"nvidia.com/gpu": "4"}), "pod_fit", "GPUs 4"),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_the_checks_reject_broken_copies(cluster, broken):
    mutate, check, expected = BROKEN[broken]
    mutate(cluster)
    problems = CHECKS[check](cluster["spec"], served_configs())
    assert any(expected in p for p in problems), problems


def test_a_job_that_asks_for_more_than_the_cluster_has_is_refused(cluster):
    big = load_config(ROOT / "jobs" / "paper-70b-tulu.yaml", ["train.num_workers=64", "eval.num_gpus=16"])
    problems = job_problems(cluster["spec"], [big])
    assert any("maxReplicas is 4" in p for p in problems) and any("evaluation task" in p for p in problems)
    hungry = load_config(ROOT / "jobs" / "paper-8b-tulu.yaml", ["prepare.num_tokenizer_actors=200"])
    assert ray_data_problems(cluster["spec"], [hungry])
    elsewhere = load_config(ROOT / "jobs" / "paper-8b-tulu.yaml", ["output_dir=/tmp/out"])
    assert storage_problems(cluster["spec"], [elsewhere])


@pytest.mark.parametrize("name, command, config", [
    ("rayjob-study.yaml", "study", "paper-8b-tulu"), ("rayjob-sweep.yaml", "sweep", "sweep-8b-tulu")])
def test_rayjobs_run_raypack_on_the_same_cluster_and_shut_it_down(cluster, name, command, config):
    (rayjob,) = load(name)
    assert rayjob_problems(rayjob, cluster["spec"]) == []
    args, cfg = entrypoint(rayjob["spec"]["entrypoint"])
    assert (args.entry.name, cfg.name) == (command, config)
    assert rayjob["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"


@pytest.mark.parametrize("mutate, expected", [
    (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas=3), "differs"),
    (lambda j: j["spec"].update(clusterSelector={"ray.io/cluster": "raypack"}), "differs"),
    (lambda j: j["spec"].update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes"),
    (lambda j: j["spec"].pop("ttlSecondsAfterFinished"), "ttlSecondsAfterFinished"),
    (lambda j: j["spec"].update(entrypoint="raypack stduy /home/ray/raypack/jobs/paper-8b-tulu.yaml"), "SystemExit"),
    (lambda j: j["spec"].update(entrypoint="python -m raypack.cli study jobs/paper-8b-tulu.yaml"), "not a raypack"),
    (lambda j: j["spec"].update(entrypoint="raypack study /home/ray/raypack/jobs/paper-9b.yaml"), "paper-9b"),
    (lambda j: j["spec"].update(entrypoint="raypack study jobs/paper-8b-tulu.yaml"), "not in the image's repo"),
    (lambda j: j["spec"].update(entrypoint=j["spec"]["entrypoint"] + " train.stoarge_path=x"), "stoarge_path"),
    (lambda j: j["spec"].update(entrypoint=j["spec"]["entrypoint"] + " train.storage_path=/mnt/raypack/ckpt"),
     "not object storage"),
    (lambda j: j["spec"].update(entrypoint="raypack plan /home/ray/raypack/jobs/paper-8b-tulu.yaml"),
     "not study or sweep"),
], ids=["spec-drift", "cluster-selector", "no-shutdown", "no-ttl", "unknown-command", "not-raypack",
        "missing-job-file", "relative-path", "unknown-key", "checkpoints-on-disk", "other-command"])
def test_rayjob_checks_reject_broken_copies(cluster, mutate, expected):
    (rayjob,) = load("rayjob-study.yaml")
    mutate(rayjob)
    problems = rayjob_problems(rayjob, cluster["spec"])
    assert any(expected in p for p in problems), problems


def test_the_image_is_the_pinned_ray_with_raypack_installed_under_the_constraints(cluster):
    lines = [line.split(maxsplit=1) for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    steps = {op: arg for op, arg in lines}
    assert steps["FROM"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert steps["WORKDIR"] == REPO_IN_IMAGE and steps["COPY"] == "--chown=ray:users . ."
    # The install of cluster.yaml's VMs: the same constraints and extras.
    assert steps["RUN"] == "pip install -q --no-cache-dir -c constraints.txt -e '.[paper-eval,embed]'"
    assert "'/home/ray/raypack[paper-eval,embed]'" in " ".join(yaml.safe_load((ROOT / "cluster.yaml").read_text())
                                                               ["setup_commands"])
    assert {".git", ".venv", "prepared", "runs"} <= set((ROOT / ".dockerignore").read_text().split())
    images = {c["image"] for name in ("raycluster.yaml", "rayjob-study.yaml", "rayjob-sweep.yaml")
              for doc in load(name) for t in templates(doc["spec"].get("rayClusterSpec", doc["spec"])).values()
              for c in t["spec"]["containers"]}
    assert images == {"REPLACE-ME-REGISTRY/raypack:REPLACE-ME-TAG"}


def test_shared_volume_and_service_account_are_defined_once():
    docs = {doc["kind"]: doc for doc in load("storage.yaml")}
    assert set(docs) == {"StorageClass", "PersistentVolumeClaim", "ServiceAccount"}
    claim = docs["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "raypack-shared" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == docs["StorageClass"]["metadata"]["name"]
    assert docs["StorageClass"]["reclaimPolicy"] == "Retain"  # deleting the claim keeps the results
    assert docs["StorageClass"]["parameters"]["uid"] == "1000"  # the image's user `ray` owns the files
    assert docs["ServiceAccount"]["metadata"]["name"] == ACCOUNT


def test_no_manifest_exposes_a_port_or_carries_a_secret():
    for path in K8S.glob("*.yaml"):
        for doc in load(path.name):
            assert doc["kind"] not in ("Ingress", "Gateway", "HTTPRoute", "Route", "Secret"), path.name
            if doc["kind"] == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", path.name


def test_the_docs_install_the_operator_of_the_schemas_and_create_the_token_secret():
    doc = (ROOT / "jobs" / "CLUSTER.md").read_text()
    assert f"helm install kuberay-operator kuberay/kuberay-operator --version {KUBERAY}" in doc
    assert f"kubectl create secret generic {TOKEN_SECRET} --from-file=auth_token=" in doc
    assert f"tag `v{KUBERAY}`" in (SCHEMAS / "README.md").read_text()
