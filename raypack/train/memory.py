"""Will it fit? The per-GPU memory of a training job, estimated before it runs (`raypack plan`).

Pure: no ray, deepspeed or lm_eval. Bytes per data-parallel rank (one GPU) for one
arm at its largest micro-batch; N parameters, W = train.num_workers ranks, e bytes
per element of the training precision (bf16 2, fp32 4).

Model states (DeepSpeed around torch AdamW, raypack.train.engine):
    bf16   parameters 2N, gradients 2N, optimizer 12N (fp32 master weights, Adam m and v)
    fp32   parameters 4N, gradients 4N, optimizer 8N (Adam m and v), + 4N at ZeRO-1/2
           (DeepSpeed clones the fp32 partition it updates)
    ZeRO-1 divides the optimizer by W, ZeRO-2 also the gradients, ZeRO-3 also the
    parameters, and adds a gathered working set: 16-bit copies of TWO decoder layers
    plus the embedding / output head matrix (an assumption: it stands for DeepSpeed's
    live gathered parameters, at most 1e9 elements by default, and the full gradients
    of the layer being reduce-scattered).
    train.offload_optimizer moves the optimizer partition to CPU memory, with the
    gradient partition as fp32 (ZeRO-2/3 then keep no gradient partition on the GPU);
    train.offload_params moves the parameter partition as well (ZeRO-3).

Activations of a Llama decoder (transformers' LlamaDecoderLayer), what autograd keeps
for backward, per layer, for n = rows x row_len tokens (H hidden, I intermediate,
h heads, k key/value heads, d head dim):
    norms       2 x n H (4 + 2e)   each RMSNorm keeps its fp32 input, the normalised and the scaled output
    attention   n H e (query) + 2 n k d e (key, value) + n H e (output; o_proj's input is the same
                storage) + 4 n h (fp32 log-sum-exp)
                sdpa given a mask (padded rows, packed positions): key and value repeated to h
                heads (2 n H e instead) and the mask as floats, rows x row_len^2 x e
                eager: key and value repeated, the probabilities rows x h x row_len^2 x (4 + e)
                (fp32 softmax and its 16-bit copy; 4 in fp32), no log-sum-exp
                flash_attention_2, raypack_varlen, flex_attention: no mask and no row_len^2 term
    MLP         4 n I e            gate, SiLU(gate), up and their product
    With train.gradient_checkpointing a layer keeps only its input, n H e, and one
    layer at a time is recomputed in the backward pass (counted once more in full).
    Head, train.loss_impl=full: the final norm, n H (4 + 2e), and the fp32 log-softmax of
    the loss, 4 n V, kept for backward; at the start of the backward pass the loop still
    holds the logits (n V e) and the log-softmax's gradient and its input's gradient exist
    (8 n V): raypack.train.loss.token_losses upcasts the shifted logits to fp32.
    train.loss_impl=fused (raypack.train.loss.fused_token_losses): the final norm and the
    supervised rows' hidden states the loss keeps, n H e (at most n rows); while a chunk
    is computed, its fp32 logits and their gradient, 8 c V (c = chunk_rows(V) tokens, 128
    at Llama-3's vocabulary), and the hidden states' gradient, 4 n H. No n V term.
    The columns add up: the recomputed layer is counted on top of the loss buffers,
    a little more than the true peak.

Micro-batch shapes (worst case, every row full): padding [micro_batch_size,
max_seq_len] with a mask when it holds more than one row; cross the same with no
mask; isolated arms are [micro_batch_size, max_seq_len] rows whose restarting
position_ids make sdpa and eager build a block mask, except for flash_attention_2,
which gets them flattened into ONE row [1, micro_batch_size x max_seq_len] (varlen,
no mask; raypack.data.collate.flatten_isolated); padfree (padding's rows) is that
flat row on every attention, so sdpa and eager build its (micro_batch_size x
max_seq_len)^2 block mask (raypack.data.collate.arm_collation).

Host memory per node: the arm's rows once (8 bytes a token: input_ids and labels as
int32 in the page cache, one copy the node's workers share, raypack.data.prepared)
plus, for each of its workers (plan.gpus_per_node; on CPU every worker, one node),
the larger of its offloaded states and, at ZeRO 0-2, the whole model while it loads
in the training precision (ZeRO-3 builds it partitioned); on CPU the device figures
are host memory too.

tests/test_memory.py checks the activation formulas against the bytes autograd saves
(CPU, fp32, sdpa and eager, with and without checkpointing: within 1%).

Left out, covered by plan.headroom_fraction: the CUDA context, NCCL and DeepSpeed's
communication buckets (5e8 elements each by default), the optimizer step's transient
fp32 gradient copy (activations are freed by then), allocator fragmentation.

Example: `raypack plan jobs/paper-8b-tulu.yaml` (Meta-Llama-3-8B, 8.03B parameters, 32
GPUs, bf16, ZeRO-3 without offload, micro-batch 2 x 4096, sdpa, gradient checkpointing),
GiB per GPU; the 80 GiB card keeps 72 usable after 10% headroom:

    arm           micro-batch  params  grads  optimizer  gathered  layers   loss  total  layers, ckpt off
    padding       2x4096+mask    0.47   0.47       2.80      2.77    3.69   0.56  10.76             54.03
    random-cross       2x4096    0.47   0.47       2.80      2.77    3.53   0.56  10.60             49.03

With the fused loss (train.loss_impl=fused, the default) the loss column is the final norm,
the hidden states and 128-token chunks of logits: 0.56 GiB. With train.loss_impl=full it
is 8192 x 128,256 logits at 14 bytes each (2 bf16 + 4 saved log-softmax + 8 of
gradients), 13.95 GiB (gathered 1.79, total 23.17 for padding); without checkpointing
padding then needs 73.5 GiB: over the 72.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from raypack.config import UNPACKED_ARMS, Config, ModelConfig, PackConfig, PlanConfig, TrainConfig, arm_spec
from raypack.data.collate import flatten_isolated
from raypack.train.engine import resolve_precision
from raypack.train.loss import LOSS_IMPLS, chunk_rows

GIB = 2**30
ATTENTION_KINDS = ("sdpa", "eager", "flash_attention_2", "flex_attention", "raypack_varlen")
MODES = ("padding", "cross", "isolated", "padfree")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a Llama-style decoder, in transformers' config names."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False

    @property
    def layer_params(self) -> int:
        """One decoder layer: q, k, v, o projections, gate/up/down MLP, two norms."""
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return 2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        heads = 1 if self.tie_word_embeddings else 2
        return self.num_hidden_layers * self.layer_params + heads * self.embedding_params + self.hidden_size

    @property
    def matmul_params(self) -> int:
        """Parameters in matmuls (raypack.train.flops): all but the input embedding, unless tied to the head."""
        return self.num_params - (0 if self.tie_word_embeddings else self.embedding_params)


def _llama3(hidden: int, layers: int, heads: int, intermediate: int) -> ModelShape:
    return ModelShape(vocab_size=128_256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=8, head_dim=128)


# The published config.json values of the paper's models (gated on the hub, so not read from it).
_LLAMA3_8B, _LLAMA3_70B = _llama3(4096, 32, 32, 14_336), _llama3(8192, 80, 64, 28_672)
PUBLISHED_SHAPES = {
    f"meta-llama/{name}{size}{suffix}": shape
    for name in ("Meta-Llama-3-", "Llama-3.1-", "Meta-Llama-3.1-")
    for size, shape in (("8B", _LLAMA3_8B), ("70B", _LLAMA3_70B))
    for suffix in ("", "-Instruct")
}


def shape_from_config(config) -> ModelShape:
    """A ModelShape from a transformers config object (LlamaConfig and alike)."""
    heads = config.num_attention_heads
    return ModelShape(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                      num_attention_heads=heads,
                      num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
                      head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                      tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def model_shape(name_or_path: str, trust_remote_code: bool = False) -> ModelShape:
    """model.name_or_path's shape: 'tiny', a local folder's config.json, a paper model, else the hub's config."""
    from raypack.model import TINY, load_tokenizer, tiny_llama_config

    if name_or_path == TINY:
        return shape_from_config(tiny_llama_config(len(load_tokenizer(TINY))))
    if name_or_path in PUBLISHED_SHAPES and not Path(name_or_path).is_dir():
        return PUBLISHED_SHAPES[name_or_path]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as err:  # offline, gated, missing: all say the same to the user
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"model.name_or_path={name_or_path!r}: cannot read its config ({first}); pass a local "
                         "folder holding its config.json") from err
    return shape_from_config(config)


def resolve_attention(name: str, use_gpu: bool, precision: str, attention: str | None = "isolated") -> str:
    """model.attn_implementation as the loop resolves it for an arm of `attention` (a manifest's: "isolated",
    "cross" or None; raypack.model.resolve_attn_implementation), judged on THIS machine: auto picks
    flash_attention_2 only where flash_attn imports, so a head node without it plans for raypack_varlen or
    flex_attention (the same memory: no mask) when its torch has varlen_attn or not."""
    from raypack.model import resolve_attn_implementation

    return resolve_attn_implementation(name, "cuda" if use_gpu else "cpu", precision, attention)


@dataclass(frozen=True)
class MicroBatch:
    """The largest micro-batch of an arm as the model sees it."""

    rows: int
    row_len: int
    masked: bool  # the attention is given a mask: padded rows, or packed samples' restarting positions

    @property
    def tokens(self) -> int:
        return self.rows * self.row_len

    def __str__(self) -> str:
        return f"{self.rows}x{self.row_len}" + ("+mask" if self.masked else "")


def micro_batch(mode: str, micro_batch_size: int, max_seq_len: int, attention: str = "flash_attention_2") -> MicroBatch:
    """padding / cross: [micro_batch_size, max_seq_len]; isolated: flattened to [1, both multiplied] for
    attention that needs one row (flash_attention_2), else [micro_batch_size, max_seq_len] rows with the
    block mask their restarting positions make; padfree: always flattened (raypack.data.collate.arm_collation)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if mode in ("isolated", "padfree"):
        if mode == "padfree" or flatten_isolated(attention):
            return MicroBatch(1, micro_batch_size * max_seq_len, masked=True)
        return MicroBatch(micro_batch_size, max_seq_len, masked=True)
    return MicroBatch(micro_batch_size, max_seq_len, masked=mode == "padding" and micro_batch_size > 1)


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch (module docstring); `saved` is what autograd holds after forward."""

    layer: int  # one decoder layer, no checkpointing
    layers: int  # what all layers keep (checkpointing: their inputs, plus one layer recomputed)
    head: int  # final norm + fp32 log-softmax, kept for backward
    loss: int  # logits held by the loop + the log-softmax gradients, at the start of backward
    recomputed: int  # the layer recomputed in backward (0 without checkpointing)

    @property
    def saved(self) -> int:
        return self.layers - self.recomputed + self.head

    @property
    def total(self) -> int:
        return self.layers + self.head + self.loss


def _layer_bytes(shape: ModelShape, batch: MicroBatch, e: int, attention: str) -> int:
    """What one decoder layer keeps for backward (module docstring)."""
    n, h = batch.tokens, shape.hidden_size
    norms = 2 * n * h * (4 + 2 * e) + 2 * n * 4  # + the fp32 rsqrt factors
    mlp = 4 * n * shape.intermediate_size * e
    kv = 2 * n * shape.num_key_value_heads * shape.head_dim * e
    square = batch.rows * batch.row_len ** 2
    if attention == "eager":
        probabilities = square * shape.num_attention_heads * (4 + (e if e < 4 else 0))
        return norms + mlp + 4 * n * h * e + probabilities
    lse = 4 * n * shape.num_attention_heads
    if attention == "sdpa" and batch.masked:
        return norms + mlp + 4 * n * h * e + lse + square * e
    return norms + mlp + 2 * n * h * e + kv + lse


def activation_bytes(shape: ModelShape, batch: MicroBatch, elem_bytes: int, attention: str,
                     checkpointing: bool, loss_impl: str = "full") -> Activations:
    """Activation bytes of one micro-batch of `batch`'s shape through the whole model (module docstring), with
    the loss of train.loss_impl (`full` or `fused`)."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention {attention!r} is not one of {', '.join(ATTENTION_KINDS)}")
    n, e = batch.tokens, elem_bytes
    layer = _layer_bytes(shape, batch, e, attention)
    if checkpointing:
        layers, recomputed = shape.num_hidden_layers * n * shape.hidden_size * e + layer, layer
    else:
        layers, recomputed = shape.num_hidden_layers * layer, 0
    norm = n * shape.hidden_size * (4 + 2 * e) + n * 4
    if loss_impl == "fused":
        chunk = min(chunk_rows(shape.vocab_size), n) * shape.vocab_size
        return Activations(layer=layer, layers=layers, head=norm + n * shape.hidden_size * e,
                           loss=chunk * 8 + n * shape.hidden_size * 4, recomputed=recomputed)
    if loss_impl != "full":
        raise ValueError(f"loss_impl {loss_impl!r} is not one of {', '.join(LOSS_IMPLS)}")
    logits = n * shape.vocab_size
    return Activations(layer=layer, layers=layers, head=norm + logits * 4, loss=logits * (e + 8),
                       recomputed=recomputed)


@dataclass(frozen=True)
class StateBytes:
    """Model states of one rank: on its GPU (params, grads, optimizer, gathered) and offloaded to CPU memory."""

    params: int
    grads: int
    optimizer: int
    gathered: int
    offloaded: int

    @property
    def gpu(self) -> int:
        return self.params + self.grads + self.optimizer + self.gathered


def state_bytes(num_params: int, precision: str, zero_stage: int, world_size: int, offload_optimizer: bool = False,
                offload_params: bool = False, gathered_params: int = 0) -> StateBytes:
    """Parameters, gradients and AdamW states per rank under ZeRO `zero_stage` (module docstring).

    >>> state_bytes(10**9, "bf16", 3, 8)
    StateBytes(params=250000000, grads=250000000, optimizer=1500000000, gathered=0, offloaded=0)
    """
    if precision not in ("bf16", "fp32") or zero_stage not in (0, 1, 2, 3) or world_size < 1:
        raise ValueError(f"need precision bf16/fp32, zero_stage 0-3 and world_size >= 1, got {precision}, "
                         f"{zero_stage}, {world_size}")
    e = 2 if precision == "bf16" else 4
    optimizer_per_param = 12 if precision == "bf16" else 8 + (4 if zero_stage in (1, 2) else 0)
    part = math.ceil(num_params / world_size)
    params = e * (part if zero_stage == 3 else num_params)
    grads = e * (part if zero_stage >= 2 else num_params)
    optimizer = optimizer_per_param * (part if zero_stage >= 1 else num_params)
    offloaded = 0
    if offload_optimizer:
        offloaded += optimizer + 4 * part
        optimizer, grads = 0, (0 if zero_stage >= 2 else grads)
    if offload_params:
        offloaded, params = offloaded + params, 0
    gathered = e * gathered_params if zero_stage == 3 else 0
    return StateBytes(params, grads, optimizer, gathered, offloaded)


def gathered_params(shape: ModelShape, loss_impl: str = "full") -> int:
    """ZeRO-3's working set in parameters: two decoder layers plus the embedding / head matrix (an assumption);
    with the fused loss one more head matrix: torch's F.linear_cross_entropy keeps a detached view of the
    gathered weight from the forward to the backward, where DeepSpeed gathers it again."""
    return 2 * shape.layer_params + shape.embedding_params * (2 if loss_impl == "fused" else 1)


@dataclass(frozen=True)
class ArmMemory:
    """The estimate for one arm: per-rank model states and activations, host memory per worker, rows per node."""

    batch: MicroBatch
    states: StateBytes
    activations: Activations  # as configured (train.gradient_checkpointing)
    other: Activations  # with the opposite checkpointing setting, for comparison
    load: int  # host bytes per worker while the model loads (ZeRO 0-2: the whole model in the training dtype)
    rows: int  # host bytes per node holding the arm's prepared rows in the page cache (0: not prepared)

    @property
    def device_total(self) -> int:
        return self.states.gpu + self.activations.total

    def host_per_worker(self, use_gpu: bool) -> int:
        """The larger of the model while it loads and what training keeps in host memory (the offloaded
        states; on CPU also everything counted per device); the rows are counted per node."""
        training = self.states.offloaded + (0 if use_gpu else self.device_total)
        return max(self.load, training)


def estimate_arm(shape: ModelShape, mode: str, train: TrainConfig, max_seq_len: int, precision: str,
                 attention: str, num_tokens: int = 0) -> ArmMemory:
    """The estimate for one arm of `mode` (padding / padfree / cross / isolated); num_tokens: its rows' real tokens,
    if known."""
    batch = micro_batch(mode, train.micro_batch_size, max_seq_len, attention)
    e = 2 if precision == "bf16" else 4
    states = state_bytes(shape.num_params, precision, train.zero_stage, train.num_workers, train.offload_optimizer,
                         train.offload_params, gathered_params(shape, train.loss_impl))
    ckpt = train.gradient_checkpointing
    return ArmMemory(batch=batch, states=states,
                     activations=activation_bytes(shape, batch, e, attention, ckpt, train.loss_impl),
                     other=activation_bytes(shape, batch, e, attention, not ckpt, train.loss_impl),
                     load=shape.num_params * e if train.zero_stage < 3 else 0,
                     rows=8 * num_tokens)  # input_ids and labels as int32 (raypack.data.prepared)


def arm_mode(arm: str, pack: PackConfig) -> str:
    """padding, padfree, cross or isolated: how the arm's micro-batches reach the model (raypack.data.collate)."""
    spec = arm_spec(arm, pack)
    return spec.strategy if spec.strategy in UNPACKED_ARMS else spec.attention


def arm_attentions(cfg: Config, precision: str) -> dict[str, str]:
    """{arm: the attention implementation its workers will use} (auto is resolved per arm, here)."""
    return {arm: resolve_attention(cfg.model.attn_implementation, cfg.train.use_gpu, precision,
                                   arm_spec(arm, cfg.pack).attention) for arm in cfg.pack.arms}


def job_precision(cfg: Config) -> str:
    """The precision the job's workers train in (train.precision resolved for their device)."""
    return resolve_precision(cfg.train.precision, "cuda" if cfg.train.use_gpu else "cpu")


def precision_and_attention(cfg: Config) -> tuple[str, str]:
    """The training precision and the attention implementation(s) the job's workers will use (resolved here):
    one name, or "<name> for <arms>; ..." when auto picks differently per arm."""
    precision = job_precision(cfg)
    by_name: dict[str, list[str]] = {}
    for arm, attention in arm_attentions(cfg, precision).items():
        by_name.setdefault(attention, []).append(arm)
    if len(by_name) == 1:
        return precision, next(iter(by_name))
    return precision, "; ".join(f"{name} for {', '.join(arms)}" for name, arms in by_name.items())


def estimate_job(cfg: Config, shape: ModelShape, num_tokens: dict[str, int] | None = None) -> dict[str, ArmMemory]:
    """Every arm of cfg.pack.arms: {arm: ArmMemory}; num_tokens gives prepared arms' real tokens (host rows)."""
    precision = job_precision(cfg)
    attentions = arm_attentions(cfg, precision)
    return {arm: estimate_arm(shape, arm_mode(arm, cfg.pack), cfg.train, cfg.data.max_seq_len, precision,
                              attentions[arm], (num_tokens or {}).get(arm, 0))
            for arm in cfg.pack.arms}


@dataclass(frozen=True)
class Budget:
    """What one GPU and one node offer after plan.headroom_fraction, and how many workers share a node."""

    device: int  # bytes per GPU (0 when training on CPU)
    host: int  # bytes per node
    workers_per_node: int


def budget(plan: PlanConfig, train: TrainConfig) -> Budget:
    """GPU runs: plan.gpus_per_node workers per node; CPU runs: every worker on one node (a local run)."""
    for key in ("gpu_memory_gib", "cpu_memory_gib", "gpus_per_node"):
        if getattr(plan, key) <= 0:
            raise ValueError(f"plan.{key}: must be > 0, got {getattr(plan, key)}")
    if not 0 <= plan.headroom_fraction < 1:
        raise ValueError(f"plan.headroom_fraction: must be in [0, 1), got {plan.headroom_fraction}")
    keep = 1 - plan.headroom_fraction
    workers = min(train.num_workers, plan.gpus_per_node) if train.use_gpu else train.num_workers
    return Budget(device=int(plan.gpu_memory_gib * GIB * keep) if train.use_gpu else 0,
                  host=int(plan.cpu_memory_gib * GIB * keep), workers_per_node=workers)


def host_per_node(arm: ArmMemory, use_gpu: bool, workers_per_node: int) -> int:
    """A node's host memory: the rows once, shared, and what each of its workers holds (ArmMemory.host_per_worker)."""
    return arm.rows + workers_per_node * arm.host_per_worker(use_gpu)


def over_budget(arm: ArmMemory, limits: Budget, use_gpu: bool) -> dict[str, tuple[int, int]]:
    """What does not fit: {"GPU": (bytes needed, usable)} and/or {"host": (per node, usable)}; {} if it fits."""
    over = {}
    if use_gpu and arm.device_total > limits.device:
        over["GPU"] = (arm.device_total, limits.device)
    host = host_per_node(arm, use_gpu, limits.workers_per_node)
    if host > limits.host:
        over["host"] = (host, limits.host)
    return over


def fits(arm: ArmMemory, limits: Budget, use_gpu: bool) -> bool:
    """Does the arm fit one GPU (GPU runs) and one node's host memory?"""
    return not over_budget(arm, limits, use_gpu)


def hints(train: TrainConfig) -> list[str]:
    """Settings that lower per-GPU memory, most effective first, among those not already set."""
    out = []
    if not train.gradient_checkpointing:
        out.append("train.gradient_checkpointing=true")
    if train.zero_stage < 3:
        out.append("train.zero_stage=3")
    if not train.offload_optimizer and train.zero_stage >= 1:
        out.append("train.offload_optimizer=true")
    if train.zero_stage == 3 and not train.offload_params:
        out.append("train.offload_params=true")
    if train.micro_batch_size > 1:
        out.append(f"train.micro_batch_size={train.micro_batch_size // 2} (global_batch_size unchanged)")
    return out
