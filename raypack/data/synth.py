"""Synthetic SFT conversations: task families, and token lengths that follow the paper's datasets.

`synth.task` says what the conversations say; `synth_block` / `synth_rows` make any task's rows (the read stage
of `raypack prepare`, raypack.data.local, `raypack bench pipeline` and `raypack synth` all go through them):

    words   (default) the paper's length profile (below); words drawn independently from one topic's list, so a
            model can learn their frequencies and nothing more:
            {"id": "opensource-1.2m-0-0", "topic": "music", "target_tokens": 412,
             "messages": [{"role": "user", "content": "Piano the drum of chord ..."}, ...]}
    chain   the same lengths, turn split, topics and sentence breaks as words for the same seed, but each next
            word is, with probability CHAIN_FOLLOW, the previous word's fixed successor in its topic
            (`successors`: per topic a cycle through its topic words and one through the common words, from
            the seed), else a draw as in words; learnable text with the words task's unigram distribution:
            {"id": "chain-opensource-1.2m-0-0", "topic": "music", "task": "chain", "target_tokens": 412, ...}
    facts   entities, each answered by a fixed pair of attribute words (raypack.data.facts); the held-out
            phrasings are `facts_heldout`:
            {"id": "facts-0-17", "topic": "river", "task": "facts",
             "messages": [{"role": "user", "content": "model bank what river?"},
                          {"role": "assistant", "content": "blue stone"}]}

Lengths (words, chain): the paper's four datasets cannot be downloaded here, and none of the small real files
has their length distribution, so raypack synthesises conversations whose token-length distribution matches each
dataset's implied mean (PAPER.md), with a lognormal long tail past 4096 tokens and a share of multi-turn
conversations. Text is made of English words drawn from one topic per conversation (the topic is kept in the
row, so later experiments can group related samples), in sentences. Lengths are targets in tokens of the offline
tiny tokenizer; `TOKENS_PER_WORD` converts them to words and a test checks the realised means stay close.

Generation is done in blocks of `BLOCK_SIZE` samples, each with its own RNG seeded
by (seed, block index), so any block can be made on its own, in any worker, and the
output is the same however the work is split.

    raypack synth jobs/compare.yaml synth.preset=tulu-326k synth.num_samples=1000 synth.seed=0 synth.out=tulu.jsonl
    raypack synth jobs/compare.yaml synth.task=facts synth.out=facts.jsonl   # + facts.heldout.jsonl
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from raypack.config import SynthConfig
from raypack.data import facts

TASKS = ("words", "chain", "facts")  # declared in raypack.config as SYNTH_TASKS; a test keeps the two equal
BLOCK_SIZE = 1000
# Chance that a chain word is its predecessor's successor (else an independent draw, as in words).
CHAIN_FOLLOW = 0.8
_CHAIN_MAP_TAG = 0xC4A1  # [seed, tag, 2]: the successor map's RNG, apart from the blocks' [seed, block]
# Tiny-tokenizer tokens per synthetic word (space + word, punctuation included);
# measured by tests/test_synth.py::test_realised_mean_length_matches_preset.
TOKENS_PER_WORD = 1.52
# Tokens the built-in template spends per message (header, role, blank line, eot).
TEMPLATE_TOKENS_PER_MESSAGE = 5


@dataclass(frozen=True)
class Preset:
    """Length distribution of one of the paper's datasets."""

    name: str
    num_samples: int  # size of the real dataset
    mean_tokens: float  # implied mean length in tokens (PAPER.md)
    sigma: float  # lognormal shape: larger means a longer tail
    multi_turn_share: float  # share of conversations with more than one exchange


PRESETS = {
    p.name: p
    for p in (
        Preset("wildchat-gpt4-69k", 69_000, 1500.0, 0.95, 0.35),
        Preset("tulu-326k", 326_000, 860.0, 1.0, 0.25),
        Preset("wildchat-652k", 652_000, 1200.0, 1.0, 0.3),
        Preset("opensource-1.2m", 1_200_000, 670.0, 1.0, 0.2),
    )
}
MIN_TOKENS = 24
MAX_TOKENS = 32_768

TOPICS = {
    "cooking": "recipe flour butter oven bake dough sauce garlic onion simmer boil pan spice salt pepper "
    "chicken rice pasta cheese tomato soup bread sugar cream whisk kitchen dinner flavor roast grill",
    "travel": "flight hotel passport city museum beach train ticket luggage airport journey map tour guide "
    "island mountain village coast border visa booking trip itinerary ferry station hostel river",
    "finance": "budget invest stock bond interest loan bank credit debt savings tax income expense market "
    "portfolio dividend inflation mortgage account payment risk return fund asset capital price",
    "health": "sleep exercise diet protein vitamin doctor symptom heart muscle stress therapy patient clinic "
    "blood pressure fever injury recovery nutrition calorie hydration posture weight habit care",
    "programming": "function variable python code loop array string class method compile debug error test "
    "module import return value server database query index thread memory cache script api",
    "history": "empire king war treaty century revolution ancient dynasty army battle colony trade republic "
    "senate kingdom castle chronicle archive monument reform emperor nation border era",
    "science": "atom energy cell gene protein molecule orbit planet gravity light wave particle experiment "
    "theory evidence species climate carbon oxygen reaction electron physics biology data",
    "music": "melody rhythm guitar piano chord song band album concert singer tempo harmony lyrics note "
    "drum violin jazz orchestra scale beat studio record stage choir composer",
    "law": "contract court judge lawyer clause rights statute appeal evidence witness trial verdict tenant "
    "license patent liability damages policy regulation permit claim agreement party",
    "education": "student teacher lesson course exam grade school homework lecture essay reading math "
    "curriculum classroom project degree university study skill quiz tutor learning class",
}
COMMON = (
    "the a an and or but if then so because when while of to in on at for with from by about into over "
    "after before under between is are was were be been being have has had do does did can could will "
    "would should may might must this that these those it its they them their we our you your he she "
    "his her i my me not no yes very more most less many much some any each every other new good best "
    "great small large long short first last next same different important simple clear easy hard "
    "make use take give find know think see look want need help try work start keep show explain "
    "describe compare choose plan check learn write read build change improve avoid include follow "
    "time way part step example idea question answer problem reason result point detail case list "
    "also just only still even well often usually really quite here there how what why which who"
).split()


def preset(name: str) -> Preset:
    """Look a preset up by name; the error lists the valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown synth preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _block_rng(seed: int, block: int) -> np.random.Generator:
    return np.random.default_rng([seed, block])


def _block_lengths(p: Preset, rng: np.random.Generator, n: int) -> np.ndarray:
    mu = math.log(p.mean_tokens) - p.sigma**2 / 2  # so that E[length] == mean_tokens
    raw = rng.lognormal(mu, p.sigma, size=n)
    return np.clip(np.rint(raw), MIN_TOKENS, MAX_TOKENS).astype(np.int64)


def _blocks(num_samples: int) -> Iterator[tuple[int, int]]:
    for block in range(math.ceil(num_samples / BLOCK_SIZE)):
        yield block, min(BLOCK_SIZE, num_samples - block * BLOCK_SIZE)


def sample_lengths(preset_name: str, num_samples: int, seed: int = 0) -> np.ndarray:
    """Target token lengths of the first `num_samples` synthetic conversations.

    These are exactly the targets `synth_conversations` writes text for, drawn with
    the same per-block RNG, so benchmarks on lengths alone see the same dataset.
    """
    p = preset(preset_name)
    out = [_block_lengths(p, _block_rng(seed, b), n) for b, n in _blocks(num_samples)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


class _Vocab:
    """Word arrays per topic: topic words are frequent, common words fill the rest."""

    def __init__(self) -> None:
        self.topics = list(TOPICS)
        common = np.array(COMMON, dtype=object)
        self.words = {t: np.concatenate([np.array(TOPICS[t].split(), dtype=object), common]) for t in TOPICS}
        n_topic = {t: len(TOPICS[t].split()) for t in TOPICS}
        self.probs = {}
        for t, words in self.words.items():
            weight = np.ones(len(words))
            weight[: n_topic[t]] = 4.0  # a third of the words come from the topic
            self.probs[t] = weight / weight.sum()

    def text(self, rng: np.random.Generator, topic: str, num_words: int, chain: _Chain | None = None) -> str:
        words = rng.choice(self.words[topic], size=num_words, p=self.probs[topic])
        if chain is not None:  # after the same draws as words: the rest of the block's draws stay the same
            words = chain.follow(topic, words)
        # Sentences of 6-20 words: capitalised, ended by '.', '?' or '!'.
        out, i = [], 0
        while i < num_words:
            n = int(rng.integers(6, 21))
            sentence = list(words[i : i + n])
            sentence[0] = sentence[0].capitalize()
            out.append(" ".join(sentence) + ("." if rng.random() < 0.85 else "?"))
            i += n
        return " ".join(out)


_VOCAB: _Vocab | None = None


def _vocab() -> _Vocab:
    global _VOCAB
    if _VOCAB is None:
        _VOCAB = _Vocab()
    return _VOCAB


@functools.lru_cache(maxsize=4)
def successors(seed: int) -> dict[str, dict[str, str]]:
    """Per topic, each word's fixed successor in chain text: its topic words in one cycle and the common words in
    another, each cycle in an order drawn from the seed. A successor stays in its word's class, and the classes'
    words are equally likely in words text, so chain text keeps the words task's unigram distribution (and its
    TOKENS_PER_WORD)."""
    rng = np.random.default_rng([seed, _CHAIN_MAP_TAG, 2])
    out = {}
    for topic, words in TOPICS.items():
        out[topic] = {}
        for cls in (words.split(), COMMON):
            cycle = [cls[i] for i in rng.permutation(len(cls))]
            out[topic].update(zip(cycle, cycle[1:] + cycle[:1]))
    return out


class _Chain:
    """Turns a block's independent word draws into chain text, with the block's own follow/draw coin flips."""

    def __init__(self, seed: int, block: int) -> None:
        self.successors = successors(seed)
        self.rng = np.random.default_rng([seed, block, 1])

    def follow(self, topic: str, draws: np.ndarray) -> np.ndarray:
        succ, out = self.successors[topic], draws.copy()
        for i, follows in enumerate(self.rng.random(len(draws)) < CHAIN_FOLLOW):
            if i and follows:
                out[i] = succ[out[i - 1]]
        return out


def _split_turns(rng: np.random.Generator, p: Preset, total_tokens: int) -> list[int]:
    """Token budgets of the messages (user, assistant, user, ...) of one conversation."""
    exchanges = 1
    if rng.random() < p.multi_turn_share:
        exchanges = 1 + int(min(rng.geometric(0.45), 7))
    num_messages = 2 * exchanges
    body = max(total_tokens - 1 - TEMPLATE_TOKENS_PER_MESSAGE * num_messages, num_messages)
    # Answers are longer than questions (about 3:1), as in chat SFT data.
    weights = np.tile([1.0, 3.0], exchanges) * rng.dirichlet(np.full(num_messages, 4.0))
    budget = np.maximum(np.floor(body * weights / weights.sum()), 1).astype(int)
    return budget.tolist()


def words_block(preset_name: str, seed: int, block: int, num: int = BLOCK_SIZE, chain: bool = False) -> list[dict]:
    """The conversations of one block of task words (chain: task chain), in `messages` format, with their topic
    and target length."""
    p, vocab = preset(preset_name), _vocab()
    rng = _block_rng(seed, block)
    follow = _Chain(seed, block) if chain else None
    lengths = _block_lengths(p, rng, num)  # first draws: identical to sample_lengths
    rows = []
    for i, total in enumerate(lengths.tolist()):
        topic = vocab.topics[int(rng.integers(len(vocab.topics)))]
        messages = []
        for turn, tokens in enumerate(_split_turns(rng, p, total)):
            num_words = max(1, round(tokens / TOKENS_PER_WORD))
            role = "user" if turn % 2 == 0 else "assistant"
            messages.append({"role": role, "content": vocab.text(rng, topic, num_words, follow)})
        n = block * BLOCK_SIZE + i
        if chain:
            rows.append({"id": f"chain-{p.name}-{seed}-{n}", "topic": topic, "task": "chain",
                         "target_tokens": total, "messages": messages})
        else:
            rows.append({"id": f"{p.name}-{seed}-{n}", "topic": topic, "target_tokens": total, "messages": messages})
    return rows


def synth_conversations(preset_name: str, num_samples: int, seed: int = 0) -> Iterator[dict]:
    """Yield `num_samples` conversations of task words, deterministic by seed."""
    for block, n in _blocks(num_samples):
        yield from words_block(preset_name, seed, block, n)


def num_rows(synth_cfg: SynthConfig) -> int:
    """How many rows the synth settings make: num_samples, or num_entities * per_entity for facts."""
    if synth_cfg.task == "facts":
        return synth_cfg.num_entities * synth_cfg.per_entity
    return synth_cfg.num_samples


def num_blocks(synth_cfg: SynthConfig) -> int:
    return -(-num_rows(synth_cfg) // BLOCK_SIZE)


def synth_block(synth_cfg: SynthConfig, block: int, tokenizer: str = "tiny") -> list[dict]:
    """Rows block * BLOCK_SIZE ... of the synth settings' task; `tokenizer` (data.tokenizer) is what facts
    draws its single-token words from (words and chain are plain text, made for the tiny tokenizer's lengths)."""
    s, first = synth_cfg, block * BLOCK_SIZE
    num = min(BLOCK_SIZE, num_rows(s) - first)
    if s.task == "facts":
        return facts.facts_rows(s.seed, s.num_entities, s.per_entity, s.num_values, tokenizer, first, num)
    if s.task not in TASKS:
        raise ValueError(f"unknown synth.task {s.task!r}; valid tasks: {', '.join(TASKS)}")
    return words_block(s.preset, s.seed, block, num, chain=s.task == "chain")


def synth_rows(synth_cfg: SynthConfig, tokenizer: str = "tiny") -> Iterator[dict]:
    """Every row of the synth settings, block by block (synth_block)."""
    for block in range(num_blocks(synth_cfg)):
        yield from synth_block(synth_cfg, block, tokenizer)


def facts_heldout(synth_cfg: SynthConfig, tokenizer_name: str = "tiny") -> list[dict]:
    """The facts task's held-out rows: heldout_per_entity new phrasings of each trained entity's question (never
    one of its training phrasings), with the same answers (raypack.data.facts.heldout_rows)."""
    s = synth_cfg
    if s.task != "facts":
        raise ValueError(f"held-out rows belong to synth.task=facts, not {s.task!r}")
    return facts.heldout_rows(s.seed, s.num_entities, s.per_entity, s.num_values, s.heldout_per_entity,
                              tokenizer_name)


def identity(synth_cfg: SynthConfig) -> dict:
    """The settings that decide the training rows (what the tokenized cache's hash sees): words keeps the
    fields it always had, so caches prepared before tasks existed stay valid; facts' rows depend on
    data.tokenizer too, which the cache's hash has."""
    s = synth_cfg
    if s.task == "facts":
        return {"task": s.task, "seed": s.seed, "num_entities": s.num_entities, "per_entity": s.per_entity,
                "num_values": s.num_values}
    fields = {"preset": s.preset, "num_samples": s.num_samples, "seed": s.seed}
    return fields if s.task == "words" else {"task": s.task, **fields}


def describe(synth_cfg: SynthConfig) -> str:
    """What the settings make, for `raypack synth`, `raypack compare` and the study report's data line:
    'opensource-1.2m x 2,000', 'chain text, opensource-1.2m x 2,000',
    'facts: 500 entities x 4 conversations, answers from 32 x 32 value pairs'."""
    s = synth_cfg
    if s.task == "facts":
        return (f"facts: {s.num_entities:,} entities x {s.per_entity} conversations, answers from "
                f"{s.num_values} x {s.num_values} value pairs")
    return ("" if s.task == "words" else f"{s.task} text, ") + f"{s.preset} x {s.num_samples:,}"


def name(synth_cfg: SynthConfig) -> str:
    """A short name of the data: 'opensource-1.2m-2000', 'chain-opensource-1.2m-2000', 'facts-500x4-v32'."""
    s = synth_cfg
    if s.task == "facts":
        return f"facts-{s.num_entities}x{s.per_entity}-v{s.num_values}"
    return ("" if s.task == "words" else f"{s.task}-") + f"{s.preset}-{s.num_samples}"


def source_prefix(synth_cfg: SynthConfig) -> str:
    """Row sources are '<prefix>:<row>': 'synth:opensource-1.2m', 'synth:chain-opensource-1.2m', 'synth:facts'."""
    s = synth_cfg
    return f"synth:{'facts' if s.task == 'facts' else ('' if s.task == 'words' else s.task + '-') + s.preset}"


def write_jsonl(rows: Iterator[dict], out: str | Path) -> int:
    """Write rows as JSONL; returns the number written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
