"""The offline tiny tokenizer and tiny Llama; attention and precision choices; gradient checkpointing.

    .venv/bin/pytest tests/test_model.py
"""

import pytest
import torch

from raypack.model import (
    TINY_BOS_ID,
    TINY_EOT_ID,
    TINY_PAD_ID,
    TINY_TOKENIZER_DIR,
    build_tiny_model,
    enable_checkpointing,
    load_tokenizer,
    tiny_llama_config,
)

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
]


def test_tiny_tokenizer_files_are_small_and_have_no_chat_template():
    files = sorted(p.name for p in TINY_TOKENIZER_DIR.iterdir())
    assert "tokenizer.json" in files and "tokenizer_config.json" in files
    assert sum(p.stat().st_size for p in TINY_TOKENIZER_DIR.iterdir()) < 1_000_000
    assert not load_tokenizer().chat_template


def test_tiny_tokenizer_ids_and_special_tokens():
    tokenizer = load_tokenizer("tiny")
    assert len(tokenizer) == 4096
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|pad|>",
    )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        TINY_BOS_ID,
        TINY_EOT_ID,
        TINY_PAD_ID,
    )
    for token in SPECIAL_TOKENS:
        ids = tokenizer(f"ab{token}cd", add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_tokens_to_ids(token) in ids
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]


def test_tiny_tokenizer_round_trips_text():
    tokenizer = load_tokenizer()
    text = "Hello there!\n\nCafé naïve 😀 — x = 12345;\ttabs  and  spaces<|eot_id|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_newlines_do_not_merge_into_the_following_word():
    tokenizer = load_tokenizer()
    tokens = tokenizer.tokenize("<|end_header_id|>\n\nHello")
    assert tokens[0] == "<|end_header_id|>"
    assert tokenizer.convert_tokens_to_string(tokens[1:2]) == "\n\n"


def test_load_tokenizer_from_a_local_path(tmp_path):
    load_tokenizer().save_pretrained(str(tmp_path))
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded("a cat sat")["input_ids"] == load_tokenizer()("a cat sat")["input_ids"]


def test_tiny_config_shape():
    config = tiny_llama_config(4096, num_hidden_layers=3)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (64, 4, 2)
    assert config.intermediate_size == 128 and config.num_hidden_layers == 3
    assert config.max_position_embeddings >= 4096 and not config.tie_word_embeddings


def test_tiny_model_is_deterministic_by_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build_tiny_model(seed=0), build_tiny_model(seed=0), build_tiny_model(seed=1)
    assert torch.rand(1) == expected_next
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert a.config._attn_implementation == "sdpa"
    assert a.dtype == torch.float32 and a.config.vocab_size == 4096


def test_tiny_model_generates():
    tokenizer = load_tokenizer()
    model = build_tiny_model().eval()
    prompt = torch.tensor([tokenizer("Give me a recipe", add_special_tokens=False)["input_ids"]])
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, prompt.shape[1] + 4)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)


def test_auto_attention_never_picks_flash_attention_in_fp32_or_on_cpu(monkeypatch):
    import sys
    import types

    from raypack.model import resolve_attn_implementation

    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))  # as if installed
    assert resolve_attn_implementation("auto", "cuda", "bf16", "isolated") == "flash_attention_2"
    # flash-attn has no fp32 kernels (nor has varlen_attn): flex_attention isolates without a dense mask
    assert resolve_attn_implementation("auto", "cuda", "fp32", "isolated") == "flex_attention"
    assert resolve_attn_implementation("auto", "cpu", "fp32", "isolated") == "sdpa"
    assert resolve_attn_implementation("eager", "cuda", "bf16", "isolated") == "eager"  # an explicit choice is kept


def test_flash_attention_without_gpu_bf16_is_refused():
    from raypack.config import ConfigError, load_config

    for overrides in ([], ["train.use_gpu=true", "train.precision=fp32"]):
        with pytest.raises(ConfigError, match="flash_attention_2 needs"):
            load_config(None, ["model.attn_implementation=flash_attention_2", *overrides])
    cfg = load_config(None, ["model.attn_implementation=flash_attention_2", "train.use_gpu=true"])
    assert cfg.model.attn_implementation == "flash_attention_2"


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """train.gradient_checkpointing recomputes activations in backward: same numbers, less kept memory."""
    torch.manual_seed(0)
    ids = torch.randint(10, 4000, (2, 48))
    grads = []
    for checkpointing in (False, True):
        model = build_tiny_model(seed=0).train()
        if checkpointing:
            enable_checkpointing(model)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
