"""Train the tiny offline tokenizer committed in raypack/assets/tiny_tokenizer.

    .venv/bin/python scripts/build_tiny_tokenizer.py [--data-dir /work/shared/data] [--out raypack/assets/tiny_tokenizer]

A byte-level BPE with a ~4096-token vocabulary, trained on the text of the real
SFT demo files (alpaca instructions/inputs/outputs, sharegpt and glaive turn
values, glaive tool schemas). It lets tests and CPU runs tokenize real-looking
chat text with no hub access. The data folder is needed only here; the package
and the tests read the committed files.

The pre-tokenizer is Llama-3's split regex, so runs of newlines stay separate
from the words after them (`<|end_header_id|>\\n\\nHello` gives `\\n\\n` and
`Hello`, never `\\n\\nHello`) and contractions, numbers (at most 3 digits) and
punctuation split the way Llama-3 splits them. The chat special tokens are
atomic added tokens, so they never merge with text or split into bytes.

Training is deterministic: files are read in sorted order and rows in file
order, and reruns give the same tokenizer.json byte for byte (checked with
RAYON_NUM_THREADS=1, 2 and 4 on tokenizers 0.23).
"""

import argparse
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 4096
BOS, EOS_TEXT, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS_TEXT, HEADER_START, HEADER_END, EOT, PAD]

# Llama-3's pre-tokenizer pattern (tiktoken cl100k style).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# Role of each text field, emitted beside the text so that the role names in the
# chat headers (`<|start_header_id|>assistant<|end_header_id|>`) are learned as
# single tokens, as in Llama-3, at the frequency the template will use them.
FIELD_ROLES = {"instruction": "user", "input": "user", "output": "assistant", "system": "system", "tools": "system"}
TURN_ROLES = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool", "system": "system"}


def iter_texts(data_dir: Path):
    """Yield every text field of the demo SFT files and its role name, in a fixed order."""
    for path in sorted(data_dir.glob("*.json")):
        for row in json.loads(path.read_text(encoding="utf-8")):
            for key, role in FIELD_ROLES.items():
                if isinstance(row.get(key), str) and row[key]:
                    yield role
                    yield row[key]
            for turn in row.get("conversations", []):
                if turn.get("value"):
                    yield TURN_ROLES.get(turn.get("from"), "user")
                    yield turn["value"]


def build_backend() -> Tokenizer:
    """An untrained byte-level BPE with Llama-3's split regex."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets on the exact characters of each token,
    # which the label masking in raypack.data.tokenize relies on.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def train(data_dir: Path) -> Tokenizer:
    """Train the BPE on the demo files; special tokens get the first ids."""
    tokenizer = build_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_texts(data_dir), trainer=trainer)
    return tokenizer


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap as a transformers tokenizer; deliberately no chat_template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        extra_special_tokens=[EOS_TEXT, HEADER_START, HEADER_END],
        padding_side="right",
        model_max_length=1_000_000,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "raypack/assets/tiny_tokenizer")
    args = parser.parse_args()
    if not any(args.data_dir.glob("*.json")):
        raise ValueError(f"no *.json SFT files in {args.data_dir}; pass --data-dir pointing at the demo data")
    hf_tokenizer = wrap(train(args.data_dir))
    args.out.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(str(args.out))
    print(f"saved {len(hf_tokenizer)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
