"""DeepSpeed for raypack: the config it is given and the engine it builds.

The only module that imports deepspeed, and only inside `initialize`, so building
and testing a config stays cheap. The optimizer is a plain `torch.optim.AdamW`
built here (no DeepSpeed "optimizer" or "scheduler" block: DeepSpeed's own Adam
would JIT-build a fused op on CPU) and the learning rate comes from
`raypack.train.plan.lr_at`, counted in the arm's own optimizer steps (the run
plan's schedule_steps); the loop sets it on
`optimizer.param_groups` before each `engine.step()`.

`deepspeed_config(train, world_size=2, device="cpu")` with the defaults
(micro_batch_size 2, global_batch_size 128, ZeRO 2, precision auto):

    {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 32,
     "train_batch_size": 128, "gradient_clipping": 1.0,
     "zero_optimization": {"stage": 2}, "bf16": {"enabled": False},
     "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}

On "cuda" with precision auto or bf16, "bf16" is {"enabled": True} and
"data_types" is {"grad_accum_dtype": "fp32"}: the micro-batches' gradients are
summed in fp32 (bf16 keeps 8 bits of mantissa, so summing 32 micro-batches in it
loses the small ones). DeepSpeed does that from ZeRO-1 up (ZeRO-1: its
BF16_Optimizer; ZeRO-2/3: an fp32 accumulation buffer); at ZeRO-0 it cannot, so
bf16 with train.zero_stage=0 is refused. Offloading
adds "offload_optimizer"/"offload_param": {"device": "cpu", "pin_memory": <cuda>}
under "zero_optimization", and "zero_force_ds_cpu_optimizer": False so that
ZeRO-Offload accepts torch's AdamW. `train.deepspeed_json` is then deep-merged
over the result; it may not change the batch sizes (set them in the train
section) nor add optimizer/scheduler blocks.

The loop's contract with the engine, per micro-batch (tests/test_engine.py):

    loss = micro_batch_loss(engine(**inputs).logits, batch, ...).loss
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()

- `scale_wrt_gas=False`: the loss is already normalised over the whole step
  (raypack.train.loss); the default would divide by gradient_accumulation_steps
  once more (the test shows the gradient halve with G = 2).
- `engine.step()` after EVERY micro-batch, not once per optimizer step:
  DeepSpeed counts micro-batches in step() and only reduces gradients and
  updates at every G-th call; calling it once per step leaves the engine off the
  accumulation boundary. Set the LR (`lr_at`) on `optimizer.param_groups`
  before the boundary call; `engine.global_steps` counts optimizer steps.
- ZeRO-3: `partitioned_construction` registers the config with transformers
  (HfDeepSpeedConfig) before the model is built, so from_pretrained/from_config
  build it inside deepspeed.zero.Init, and `load_into_partitions` fills each
  rank's partitions from a local safetensors folder reading only its own slices.
- ZeRO 1/2 gradients are readable with `deepspeed.utils.safe_get_full_grad`
  only after the boundary micro-batch's backward, before its step().

DeepSpeed on CPU (checked with deepspeed 0.19.8, torch 2.13 CPU, 2 cores):
- `initialize(..., device="cpu")` sets DS_ACCELERATOR=cpu unless already set
  (without it DeepSpeed falls back to cpu, with a warning, only when it finds no
  GPU) and checks the accelerator matches the device.
- torch.distributed must be up with gloo. Under Ray Train it already is (and
  LOCAL_RANK, which DeepSpeed insists on, is set); `initialize` hands the group
  to DeepSpeed. In a bare process set MASTER_ADDR=127.0.0.1,
  MASTER_PORT=<free port>, RANK=0, WORLD_SIZE=1, LOCAL_RANK=0; `initialize`
  then calls `deepspeed.init_distributed(dist_backend="gloo")`.
- ZeRO stages 0-3 (3 with parameter and optimizer offload) initialise and step
  on CPU with torch's AdamW; stage 0 hands back the AdamW itself.
- The first `init_distributed` on a machine JIT-builds DeepSpeed's
  `deepspeed_shm_comm` op (about 40 s here), cached in this environment's own
  folder, ~/.cache/torch_extensions/raypack-<key> (TORCH_EXTENSIONS_DIR when set),
  under a build lock that is never waited on without a bound
  (raypack.train.extensions); later starts take ~2 s.
"""

import copy
import json
import math
import os
from pathlib import Path

import torch

from raypack.config import OptimConfig, TrainConfig
from raypack.train.plan import gradient_accumulation_steps

DEVICES = ("cpu", "cuda")
_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def resolve_precision(precision: str, device: str) -> str:
    """'bf16' or 'fp32': auto is bf16 on cuda and fp32 on cpu; bf16 on cpu is refused."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"train.precision {precision!r} is not one of auto, bf16, fp32")
    if precision == "bf16" and device == "cpu":
        raise ValueError("train.precision=bf16 needs a GPU; use auto or fp32 on CPU")
    return precision


def deepspeed_config(train: TrainConfig, world_size: int, device: str) -> dict:
    """The DeepSpeed config dict for this section (module docstring), user JSON merged over it."""
    if train.offload_params and train.zero_stage != 3:
        raise ValueError(f"train.offload_params needs train.zero_stage=3, got {train.zero_stage}")
    if train.offload_optimizer and train.zero_stage == 0:
        raise ValueError("train.offload_optimizer needs train.zero_stage >= 1")
    precision = resolve_precision(train.precision, device)
    if precision == "bf16" and train.zero_stage == 0:
        raise ValueError("train.zero_stage=0 with bf16 would accumulate gradients in bf16 across micro-batches "
                         "(DeepSpeed accumulates in fp32 only under ZeRO); use train.zero_stage>=1, or "
                         "train.precision=fp32")
    offload = {"device": "cpu", "pin_memory": device == "cuda"}
    zero: dict = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = dict(offload)
    if train.offload_params:
        zero["offload_param"] = dict(offload)
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(train.global_batch_size, train.micro_batch_size,
                                                                   world_size),
        "train_batch_size": train.global_batch_size,
        "gradient_clipping": train.gradient_clipping,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # raypack logs its own metrics
        "wall_clock_breakdown": False,
    }
    if train.offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False
    if precision == "bf16":  # bf16 weights and activations, gradients summed over micro-batches in fp32
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if train.deepspeed_json:
        merged = _merge(config, _read_json(train.deepspeed_json))
        _check_merged(merged, config, device)
        config = merged
    return config


def _read_json(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"train.deepspeed_json: cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"train.deepspeed_json: {path} must hold a JSON object")
    return data


def _merge(base: dict, override: dict) -> dict:
    """Deep merge: nested dicts merge key by key, everything else in `override` wins."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_merged(config: dict, built: dict, device: str) -> None:
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ValueError(f"train.deepspeed_json: remove the {key!r} block; raypack builds torch AdamW and "
                             "its LR schedule from the optim section")
    changed = {k: config.get(k) for k in _BATCH_KEYS if config.get(k) != built[k]}
    if changed:
        raise ValueError(f"train.deepspeed_json sets {changed}, which disagrees with the train section "
                         f"({ {k: built[k] for k in changed} }); leave batch sizes out of the JSON and set "
                         "train.micro_batch_size / train.global_batch_size")
    zero = config.get("zero_optimization", {})
    if "offload_param" in zero and zero.get("stage") != 3:
        raise ValueError("train.deepspeed_json: offload_param needs zero_optimization.stage 3")
    if device == "cpu" and config.get("bf16", {}).get("enabled"):
        raise ValueError("train.deepspeed_json: bf16 is enabled but training runs on CPU")


def decay_split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(names of the trainable parameters weight decay applies to, names of those it does not).

    Decay goes to matrices (embeddings, projections), not to 1-D tensors (norm
    weights, biases). A parameter's dimensions are read from its real shape: under
    ZeRO-3 every parameter is a 1-element placeholder (`p.dim()` is 1 for all of
    them) whose shape DeepSpeed keeps in `ds_shape`.
    """
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else plain).append(name)
    return decay, plain


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW; weight decay on matrices only, not on 1-D tensors (decay_split), at every ZeRO stage."""
    params = dict(model.named_parameters())
    decay, plain = decay_split(model)
    groups = [{"params": [params[n] for n in decay], "weight_decay": optim.weight_decay},
              {"params": [params[n] for n in plain], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)


def _import_deepspeed(device: str):
    """Import deepspeed with the accelerator matching `device` (see the module docstring), its JIT-built ops in
    this environment's own folder under a bounded build lock (raypack.train.extensions)."""
    from raypack.train import extensions

    os.environ.setdefault("DS_ACCELERATOR", device)
    extensions.prepare()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if not name.startswith(device):
        raise ValueError(f"DeepSpeed's accelerator is {name!r} but training runs on {device!r}; "
                         f"unset or fix DS_ACCELERATOR (now {os.environ.get('DS_ACCELERATOR')!r})")
    return deepspeed


def _init_distributed(deepspeed, device: str, world_size: int) -> None:
    """DeepSpeed's communication on the process group Ray Train set up (or a new one in a bare process)."""
    if "LOCAL_RANK" not in os.environ:
        raise ValueError("DeepSpeed needs the LOCAL_RANK environment variable (Ray Train and torchrun set it; "
                         "in a bare process set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK)")
    if torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    else:
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
    if torch.distributed.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but torch.distributed has {torch.distributed.get_world_size()} "
                         "ranks; the loss scaling needs the real data-parallel size")


def partitioned_construction(train: TrainConfig, world_size: int, device: str):
    """Under ZeRO-3, register raypack's DeepSpeed config with transformers and return the handle; else None.

    While the returned object is alive, transformers' from_pretrained and from_config
    build the model inside deepspeed.zero.Init: every parameter is partitioned as
    soon as its module is created and checkpoint shards are loaded straight into the
    partitions, so no rank ever holds the whole model (70B: ~140 GB in bf16). Keep
    it referenced until training ends (transformers holds only a weak reference).
    """
    if train.zero_stage != 3:
        return None
    config = deepspeed_config(train, world_size, device)
    deepspeed = _import_deepspeed(device)
    _init_distributed(deepspeed, device, world_size)
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def initialize(model: torch.nn.Module, train: TrainConfig, optim: OptimConfig, world_size: int,
               device: str):
    """(engine, optimizer): DeepSpeed around `model` with raypack's AdamW; set LRs on optimizer.param_groups."""
    config = deepspeed_config(train, world_size, device)
    deepspeed = _import_deepspeed(device)
    _init_distributed(deepspeed, device, world_size)
    optimizer = build_optimizer(model, optim)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine, optimizer


def load_into_partitions(model: torch.nn.Module, folder: str | Path) -> dict:
    """ZeRO-3: fill this rank's partition of every parameter from the safetensors checkpoint in `folder`.

    `model` was built inside deepspeed.zero.Init without loading weights
    (`build_model(..., load_weights=False)` under `partitioned_construction`). Each
    rank reads from every tensor only the rows that hold its own contiguous slice
    of the flattened parameter (DeepSpeed gives rank r elements [r*P, (r+1)*P),
    P = the padded partition size), so no rank ever holds the whole checkpoint:
    transformers' own ZeRO-3 loading has rank 0 read every shard whole. Tensors of
    the checkpoint that are not parameters of the model (tied aliases, buffers)
    are skipped and counted; a parameter the checkpoint lacks is an error.
    Returns {"num_loaded", "num_skipped", "num_elements_read"}.
    """
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors files; ZeRO-3 loading reads safetensors checkpoints "
                         "(save the model with save_pretrained(safe_serialization=True))")
    params = dict(model.named_parameters())
    loaded, skipped, read = set(), 0, 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key not in params:
                    skipped += 1
                    continue
                read += _load_partition(params[key], f.get_slice(key), key)
                loaded.add(key)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{folder}: the checkpoint has no tensor for {len(missing)} parameters of the model "
                         f"(e.g. {missing[:3]}); its tensor names must match model.named_parameters()")
    return {"num_loaded": len(loaded), "num_skipped": skipped, "num_elements_read": read}


def _load_partition(param: torch.nn.Parameter, tensor_slice, key: str) -> int:
    """Copy this rank's slice of one checkpoint tensor into param.ds_tensor; returns the elements read."""
    shape = tuple(tensor_slice.get_shape())
    if shape != tuple(param.ds_shape):
        raise ValueError(f"checkpoint tensor {key} has shape {shape}, the model's parameter {tuple(param.ds_shape)}")
    part = param.ds_tensor
    size = part.ds_numel
    start = size * torch.distributed.get_rank(group=param.ds_process_group)
    end = min(start + size, param.ds_numel)
    if start >= end:
        return 0
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    first, last = start // row, -(-end // row)
    rows = tensor_slice[first:last]
    with torch.no_grad():
        part.narrow(0, 0, end - start).copy_(rows.reshape(-1)[start - first * row: end - first * row])
    return rows.numel()


def local_parameter_elements(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole model): under ZeRO-3 a rank holds its partitions."""
    local = total = 0
    for p in model.parameters():
        total += getattr(p, "ds_numel", p.numel())
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return local, total


def full_state_dict(engine) -> dict:
    """The whole model's state dict, for rank 0 to save; call it on every rank (collective under ZeRO-3).

    ZeRO 0-2 keep full parameters on each rank; ZeRO-3 gathers its partitions to
    rank 0 in the training dtype (other ranks get an empty dict).
    """
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
