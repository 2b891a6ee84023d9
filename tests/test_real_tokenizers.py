"""Real tokenizers as they come: Meta-Llama-3-8B's (no pad token, no chat template) and Qwen3's own template.

    .venv/bin/pytest tests/test_real_tokenizers.py -q

On the real-data fixtures (alpaca, sharegpt, glaive tool calls), with the built-in
template for Llama-3 base and Qwen3's own (not prefix-stable) template: loss masks
decode to exactly the assistant texts, every sample has one BOS at most, the pad
fallback cannot change a loss, and `raypack prepare` reconciles on Ray.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from real_tokenizers import LLAMA3_BOS_ID, write_random_llama
from test_tokenize import assert_invariants

from raypack.config import load_config
from raypack.data.collate import collate
from raypack.data.formats import load_conversations
from raypack.data.pipeline import prepare
from raypack.data.prepared import read_manifest
from raypack.data.tokenize import BUILTIN_CHAT_TEMPLATE, IGNORE_INDEX, tokenize_conversations
from raypack.model import load_tokenizer, with_pad_token
from raypack.train.loss import token_losses

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_FILES = [FIXTURES / name for name in ("alpaca_small.json", "sharegpt_small.json", "glaive_toolcall_small.json")]
MAX_SEQ_LEN = 512
# Each template's end-of-turn text, written out here rather than taken from raypack.
END_OF_TURN = {"llama3": "<|eot_id|>", "qwen": "<|im_end|>\n"}
# Meta-Llama-3-8B-Instruct's chat template, as published: BOS from {{ bos_token }}, contents trimmed.
LLAMA3_INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers(llama3_tokenizer_dir, qwen_tokenizer_dir):
    return {"llama3": load_tokenizer(str(llama3_tokenizer_dir)), "qwen": load_tokenizer(str(qwen_tokenizer_dir))}


@pytest.fixture(scope="module")
def conversations():
    result = load_conversations([str(path) for path in FIXTURE_FILES])
    assert result.rejected == [] and len(result.conversations) == 60
    return result.conversations


def supervised_runs(sample: dict, tokenizer) -> list[str]:
    """Decode each contiguous run of supervised labels, byte for byte (no clean-up of spaces)."""
    labels = sample["labels"]
    supervised = np.concatenate([[False], labels != IGNORE_INDEX, [False]])
    edges = np.flatnonzero(np.diff(supervised.astype(np.int8)))
    return [tokenizer.decode(labels[start:end].tolist(), clean_up_tokenization_spaces=False)
            for start, end in zip(edges[::2], edges[1::2])]


def assistant_texts(conversation: dict, end_of_turn: str, strip: bool = False) -> list[str]:
    return [(m["content"].strip() if strip else m["content"]) + end_of_turn
            for m in conversation["messages"] if m["role"] == "assistant"]


def tokenized(conversations, tokenizer, **kwargs):
    """Every conversation whole (no over-length cut), so each sample holds all its assistant turns."""
    result = tokenize_conversations(conversations, tokenizer, max_seq_len=100_000, **kwargs)
    assert result.outcomes == ["whole"] * len(conversations)
    assert_invariants(result, 100_000)
    return result


# ---------------------------------------------------------------- what is supervised


@pytest.mark.parametrize("name", ["llama3", "qwen"])
def test_loss_masks_decode_to_the_assistant_texts(tokenizers, conversations, name):
    """llama3: the built-in template (it has none); qwen: its own, found verbatim for multi-turn rows."""
    tokenizer = tokenizers[name]
    assert (tokenizer.chat_template is None) == (name == "llama3")
    result = tokenized(conversations, tokenizer)
    for sample in result.samples:
        conversation = conversations[sample["conversation"]]
        assert supervised_runs(sample, tokenizer) == assistant_texts(conversation, END_OF_TURN[name]), sample["source"]
    tool_calls = [s for s in result.samples if "glaive" in s["source"] and '"arguments"' in "".join(
        supervised_runs(s, tokenizer))]
    assert tool_calls  # not vacuous: tool calls are among the supervised texts


def test_llama3_instruct_template_supervises_trimmed_content(tokenizers, conversations):
    tokenizer = load_tokenizer(tokenizers["llama3"].name_or_path)
    tokenizer.chat_template = LLAMA3_INSTRUCT_TEMPLATE
    result = tokenized(conversations, tokenizer)
    for sample in result.samples:
        conversation = conversations[sample["conversation"]]
        assert supervised_runs(sample, tokenizer) == assistant_texts(conversation, "<|eot_id|>", strip=True)


# ---------------------------------------------------------------- BOS


@pytest.mark.parametrize("template", [None, LLAMA3_INSTRUCT_TEMPLATE], ids=["builtin", "instruct"])
def test_llama3_samples_have_exactly_one_bos_at_the_start(tokenizers, conversations, template):
    tokenizer = load_tokenizer(tokenizers["llama3"].name_or_path)
    tokenizer.chat_template = template
    assert tokenizer("hi")["input_ids"][0] == LLAMA3_BOS_ID  # its post-processor adds BOS; raypack must not
    for sample in tokenized(conversations, tokenizer).samples:
        assert sample["input_ids"][0] == LLAMA3_BOS_ID
        assert int((sample["input_ids"] == LLAMA3_BOS_ID).sum()) == 1


def test_qwen_samples_start_as_its_template_does(tokenizers, conversations):
    tokenizer = tokenizers["qwen"]
    assert tokenizer.bos_token is None
    first_ids = {int(s["input_ids"][0]) for s in tokenized(conversations, tokenizer).samples}
    assert first_ids == {tokenizer.convert_tokens_to_ids("<|im_start|>")}


def test_builtin_template_refuses_a_tokenizer_without_its_special_tokens(tokenizers, conversations):
    with pytest.raises(ValueError, match=r"<\|begin_of_text\|>.*template=auto"):
        tokenize_conversations(conversations[:2], tokenizers["qwen"], MAX_SEQ_LEN, template="builtin")


# ---------------------------------------------------------------- pad fallback


def test_pad_token_falls_back_to_eos(tokenizers, llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir)).pad_token is None
    assert tokenizers["llama3"].pad_token == "<|end_of_text|>" and tokenizers["llama3"].pad_token_id == 128001
    assert tokenizers["qwen"].pad_token == "<|endoftext|>"  # its own pad token is kept
    bare = AutoTokenizer.from_pretrained(str(llama3_tokenizer_dir))
    bare.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        with_pad_token(bare, "bare")


@pytest.fixture(scope="module")
def llama3_model(llama3_tokenizer_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folder = write_random_llama(tmp_path_factory.mktemp("llama3-model"), llama3_tokenizer_dir, seed=0)
    assert load_tokenizer(str(folder)).pad_token_id == 128001  # the folder holds the tokenizer too
    model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa", dtype=torch.float32)
    assert model.config.vocab_size == 128256 and model.config.pad_token_id is None
    return model.eval()


def row_losses(model, batch: dict) -> list[torch.Tensor]:
    """Each row's supervised per-token losses."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    losses, mask = token_losses(logits, batch["labels"])
    return [row[row_mask] for row, row_mask in zip(losses, mask)]


def pads_first(batch: dict, row: int, length: int) -> dict:
    """`batch` with row `row`'s pads moved in front of its `length` real tokens, and no attention mask."""
    moved = {key: value.clone() for key, value in batch.items()}
    for key in ("input_ids", "labels"):
        moved[key][row] = torch.roll(batch[key][row], shifts=batch[key].shape[1] - length)
    moved["attention_mask"] = torch.ones_like(batch["attention_mask"])
    return moved


def test_pad_id_cannot_change_a_loss(tokenizers, conversations, llama3_model):
    tokenizer = tokenizers["llama3"]
    samples = sorted(tokenized(conversations, tokenizer).samples, key=lambda s: len(s["input_ids"]))[:2]
    rows = [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples]
    assert len(rows[0]["input_ids"]) < len(rows[1]["input_ids"])
    eos, other = tokenizer.pad_token_id, 12345
    by_pad = {pad: collate(rows, "padding", pad) for pad in (eos, other)}
    assert (by_pad[eos]["input_ids"] == eos).any() and (by_pad[other]["input_ids"] == other).any()
    for got, want in zip(row_losses(llama3_model, by_pad[other]), row_losses(llama3_model, by_pad[eos])):
        assert got.numel() > 0 and torch.equal(got, want)
    # Pads after every real token need no mask (the packed modes): still equal.
    unmasked = [row_losses(llama3_model, {**b, "attention_mask": torch.ones_like(b["attention_mask"])})
                for b in by_pad.values()]
    assert all(torch.equal(a, b) for a, b in zip(*unmasked))
    # Negative control (an all-ones mask cannot be one: right pads come after every real token, see above):
    # pads the shorter row's tokens can attend to, in front and unmasked, do change its loss.
    length = len(rows[0]["input_ids"])
    control = [row_losses(llama3_model, pads_first(b, 0, length)) for b in by_pad.values()]
    assert not torch.allclose(control[0][0], control[1][0])
    assert torch.equal(control[0][1], control[1][1])  # the longer row has no pads


# ---------------------------------------------------------------- raypack prepare on Ray


@pytest.fixture(scope="module", params=["llama3", "qwen"])
def prepared(request, ray_local, tmp_path_factory):
    tokenizer_dir = request.getfixturevalue(f"{request.param}_tokenizer_dir")
    out = tmp_path_factory.mktemp(f"prep-{request.param}")
    sources = ", ".join(str(path) for path in FIXTURE_FILES)
    cfg = load_config("jobs/compare.yaml", [
        f"prepare.output_dir={out}", f"data.tokenizer={tokenizer_dir}", f"model.name_or_path={tokenizer_dir}",
        f"data.sources=[{sources}]",
        f"data.max_seq_len={MAX_SEQ_LEN}", "pack.arms=[padding, bfd-isolated]", "data.val_fraction=0.0",
        "pack.window=16",
    ])
    return request.param, cfg, prepare(cfg)


def test_prepare_reconciles(prepared, tokenizers, conversations):
    name, cfg, folders = prepared
    manifests = {arm: read_manifest(folder) for arm, folder in folders.items()}
    assert manifests.pop("val").num_samples == 0 and set(manifests) == {"padding", "bfd-isolated"}
    # What the core gives in process, with the same tokenizer and over-length policy.
    reference = tokenize_conversations(conversations, tokenizers[name], MAX_SEQ_LEN, overlength=cfg.data.overlength)
    for manifest in manifests.values():
        assert manifest.num_input_rows == 60 and manifest.num_rejected_rows == 0  # as with the tiny tokenizer
        assert manifest.num_conversations == 60
        for key in ("num_samples", "num_tokens", "num_supervised_tokens", "num_truncated",
                    "num_dropped_no_supervised", "num_dropped_too_long"):
            assert getattr(manifest, key) == reference.counts[key], (name, key)
    assert manifests["padding"].num_supervised_tokens == manifests["bfd-isolated"].num_supervised_tokens > 0
    assert manifests["bfd-isolated"].num_rows < manifests["padding"].num_rows == reference.counts["num_samples"]


# ---------------------------------------------------------------- train, export, eval --val


@pytest.mark.parametrize("name, arm", [("llama3", "bfd-isolated"), ("qwen", "padding")])
def test_train_exports_and_eval_val_matches_the_loop(name, arm, ray_local, tmp_path, request):
    """What a user runs with a hub checkout of the tokenizer and a model: `raypack train ... train.arm=ARM
    train.max_steps=3` on 2 workers; the exported folder loads with Auto* classes, has a pad token, and
    `raypack eval` of it gives the loop's last validation loss; `raypack probe` runs on it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raypack.cli import main
    from raypack.train.launch import run_dir

    model_dir = write_random_llama(tmp_path / "model", request.getfixturevalue(f"{name}_tokenizer_dir"))
    sources = ", ".join(str(path) for path in FIXTURE_FILES)
    overrides = [f"data.tokenizer={model_dir}", f"model.name_or_path={model_dir}", f"data.sources=[{sources}]",
                 f"pack.arms=[{arm}]", f"train.arm={arm}", "train.max_steps=3", "data.max_seq_len=256",
                 "data.val_count=6", "train.num_workers=2", "train.micro_batch_size=2", "train.global_batch_size=4",
                 f"prepare.output_dir={tmp_path / 'prepared'}", f"train.storage_path={tmp_path / 'runs'}",
                 "prepare.num_tokenizer_actors=1", "name=real"]
    assert main(["train", "jobs/real-files.yaml", *overrides]) == 0
    cfg = load_config("jobs/real-files.yaml", overrides)
    out = run_dir(cfg, arm)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in metrics)

    exported = out / "model"
    tokenizer, model = AutoTokenizer.from_pretrained(exported), AutoModelForCausalLM.from_pretrained(exported)
    assert tokenizer.pad_token_id is not None and model.config.pad_token_id == tokenizer.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    # It carries the chat template training rendered with, and generation stops where its answers were taught to
    # end (tests/test_eval.py checks the prompts; here that the loop's export writes them).
    own = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    assert tokenizer.chat_template == (own or BUILTIN_CHAT_TEMPLATE)
    end = "<|eot_id|>" if name == "llama3" else "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids(end) in np.atleast_1d(model.generation_config.eos_token_id)

    # Both score the model this config's run exported (train.arm) on the config's own validation split.
    result = tmp_path / "eval.json"
    assert main(["eval", "jobs/real-files.yaml", *overrides, "eval.preset=none", f"eval.out={result}"]) == 0
    assert json.loads(result.read_text())["val_loss"] == pytest.approx(metrics[-1]["val_loss"], rel=1e-4)
    # The probe collates with the same pad fallback.
    probe = tmp_path / "probe.json"
    assert main(["probe", "jobs/real-files.yaml", *overrides, "probe.num_samples=4", f"probe.out={probe}"]) == 0
    assert json.loads(probe.read_text())["num_val_samples"] == 6


@pytest.mark.parametrize("name", ["llama3", "qwen"])
def test_one_pass_then_any_overlength_policy_with_the_real_tokenizers(tokenizers, conversations, name):
    """What prepare's tokenized cache does for per-arm over-length policies (tokenize_pieces, then
    raypack.data.overlength), on the real files with a real tokenizer, equals the policy applied while tokenizing
    (tokenize_conversations' own policy code). Negative control: at this length the policies differ."""
    from raypack.data.overlength import POLICY_COUNT_KEYS, cache_columns, kept_rows, policy_counts
    from raypack.data.tokenize import tokenize_pieces

    tokenizer, max_seq_len = tokenizers[name], 96
    pieces = tokenize_pieces(conversations, tokenizer, max_seq_len)
    key, status, piece, num_tokens, num_supervised = cache_columns(pieces)
    chosen = {}
    for policy in ("truncate", "split", "drop"):
        reference = tokenize_conversations(conversations, tokenizer, max_seq_len, overlength=policy)
        kept = kept_rows(status, piece, num_supervised, policy)
        samples = [s for s, k in zip(pieces.samples, kept) if k]
        assert [(s["input_ids"].tolist(), s["labels"].tolist()) for s in samples] == \
            [(s["input_ids"].tolist(), s["labels"].tolist()) for s in reference.samples], policy
        counts = policy_counts(key, status, piece, num_tokens, num_supervised, policy)
        assert counts == {k: reference.counts[k] for k in POLICY_COUNT_KEYS}, policy
        chosen[policy] = len(samples)
    assert chosen["drop"] < chosen["truncate"] < chosen["split"], chosen
