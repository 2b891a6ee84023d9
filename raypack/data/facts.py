"""The `facts` task of synthetic data: entities, each answered by its own fixed pair of attribute words.

A world, fixed by the seed and the tokenizer: num_entities entity words, num_values value words, a few
question words and filler words, four disjoint sets of lowercase words that the tokenizer encodes as one token
each after a space (`single_token_words`; a value also as one token alone, since the answer's first word follows
the template's "\\n\\n" with no space). Each entity has an answer, a pair of value words drawn from num_values x
num_values, and per_entity different phrasings of the question about it. A training row is one phrasing:

    {"id": "facts-0-17", "topic": "river", "task": "facts",
     "messages": [{"role": "user", "content": "model bank what river?"},
                  {"role": "assistant", "content": "blue stone"}]}

so the answer is exactly two supervised tokens plus the end-of-turn token. The rows are the world's
num_entities * per_entity phrasings in an order shuffled by the seed (so no packer meets one entity's rows
together by accident); row n is made from the world alone, so any block of rows can be made in any worker and the
output is the same however the work is split. `heldout_rows` gives heldout_per_entity more phrasings of every
entity, none equal to a training phrasing of that entity, with the same answers: what a model that learnt the
facts (and not the phrasings) answers right.

    rows = facts_rows(seed=0, num_entities=500, per_entity=4, num_values=32, tokenizer_name="tiny", first=0, num=10)
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

NUM_QUESTION_WORDS = 8
NUM_FILLERS = 64
# Third words of the RNG seeds [seed, tag, 3]: streams apart from synth's per-block ones ([seed, block]).
_WORLD_TAG, _HELDOUT_TAG = 0xFAC75, 0xFAC76
_WORD = re.compile(r" [a-z]{3,}")


@functools.lru_cache(maxsize=8)
def single_token_words(tokenizer_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(words, bare): the sorted lowercase alphabetic words w (3 letters or more) that the tokenizer encodes as
    one token after a space (" " + w), and the subset of them that it also encodes as one token alone.

    Found from the vocabulary itself, so any tokenizer serves: each entry is turned back into text, and the ones
    that read " w" are checked by encoding."""
    from raypack.model import load_tokenizer  # here: words, chain and sample_lengths need no transformers

    tokenizer = load_tokenizer(tokenizer_name)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    texts = (tokenizer.convert_tokens_to_string([t]) for t in tokens if t is not None)
    candidates = sorted({text[1:] for text in texts if _WORD.fullmatch(text)})
    if not candidates:
        return (), ()
    spaced = tokenizer([" " + w for w in candidates], add_special_tokens=False)["input_ids"]
    alone = tokenizer(candidates, add_special_tokens=False)["input_ids"]
    words = tuple(w for w, ids in zip(candidates, spaced) if len(ids) == 1)
    bare = tuple(w for w, ids, bare_ids in zip(candidates, spaced, alone) if len(ids) == 1 and len(bare_ids) == 1)
    return words, bare


@dataclass(frozen=True)
class World:
    """Everything a facts row is made of, fixed by the seed, the counts and the tokenizer."""

    entities: tuple[str, ...]
    answers: tuple[str, ...]  # entity i's answer, "<value1> <value2>"
    phrasings: tuple[tuple[str, ...], ...]  # entity i's per_entity training user contents, all different
    questions: tuple[str, ...]
    fillers: tuple[str, ...]
    order: np.ndarray  # row n is phrasing order[n] % per_entity of entity order[n] // per_entity


def _choose_words(rng: np.random.Generator, tokenizer_name: str, num_entities: int, num_values: int):
    words, bare = single_token_words(tokenizer_name)
    if num_values > len(bare):
        raise ValueError(f"synth.num_values={num_values}, but data.tokenizer {tokenizer_name!r} has only {len(bare)} "
                         "lowercase words that are one token both alone and after a space (an answer's first word "
                         "follows the chat template's newline with no space); lower synth.num_values")
    values = sorted(rng.choice(np.array(bare, dtype=object), size=num_values, replace=False).tolist())
    rest = sorted(set(words) - set(values))
    needed = num_entities + NUM_QUESTION_WORDS + NUM_FILLERS
    if needed > len(rest):
        raise ValueError(f"synth.num_entities={num_entities} needs {needed} single-token words besides the "
                         f"{num_values} values ({NUM_QUESTION_WORDS} question and {NUM_FILLERS} filler words too), "
                         f"but data.tokenizer {tokenizer_name!r} has {len(words)} lowercase words of one token after "
                         f"a space ({len(rest)} once the values are taken); lower synth.num_entities to at most "
                         f"{len(rest) - NUM_QUESTION_WORDS - NUM_FILLERS} or use a tokenizer with a larger vocabulary")
    picked = [rest[i] for i in rng.permutation(len(rest))[:needed]]
    return values, picked[:num_entities], picked[num_entities:-NUM_FILLERS], picked[-NUM_FILLERS:]


def _phrase(rng: np.random.Generator, words: tuple[tuple[str, ...], tuple[str, ...]], entity: str) -> str:
    """'<2 or 3 fillers> <question word> <entity>?', words being (question words, fillers)."""
    questions, fillers = words
    picked = [fillers[int(i)] for i in rng.integers(len(fillers), size=int(rng.integers(2, 4)))]
    return f"{' '.join(picked)} {questions[int(rng.integers(len(questions)))]} {entity}?"


def _new_phrasings(rng: np.random.Generator, words: tuple, entity: str, count: int, taken: set[str]) -> list[str]:
    """`count` phrasings about `entity`, all different and none in `taken`."""
    out: list[str] = []
    while len(out) < count:
        text = _phrase(rng, words, entity)
        if text not in taken:
            taken.add(text)
            out.append(text)
    return out


def _check_phrasings(per_entity: int, heldout_per_entity: int) -> None:
    capacity = NUM_QUESTION_WORDS * (NUM_FILLERS**2 + NUM_FILLERS**3)
    if per_entity + heldout_per_entity > capacity // 2:  # leaves rejection sampling quick
        raise ValueError(f"synth.per_entity + synth.heldout_per_entity = {per_entity + heldout_per_entity}: at most "
                         f"{capacity // 2} different phrasings per entity can be made; lower them")


@functools.lru_cache(maxsize=8)
def world(seed: int, num_entities: int, per_entity: int, num_values: int, tokenizer_name: str) -> World:
    """The facts world of these settings (cached: every block of one worker reuses it)."""
    _check_phrasings(per_entity, 0)
    rng = np.random.default_rng([seed, _WORLD_TAG, 3])
    values, entities, questions, fillers = _choose_words(rng, tokenizer_name, num_entities, num_values)
    pairs = rng.integers(num_values, size=(num_entities, 2))
    answers = tuple(f"{values[a]} {values[b]}" for a, b in pairs.tolist())
    words = (tuple(questions), tuple(fillers))
    phrasings = tuple(tuple(_new_phrasings(rng, words, e, per_entity, set())) for e in entities)
    order = rng.permutation(num_entities * per_entity)
    return World(tuple(entities), answers, phrasings, tuple(questions), tuple(fillers), order)


def _row(row_id: str, entity: str, user: str, answer: str) -> dict:
    return {"id": row_id, "topic": entity, "task": "facts",
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def facts_rows(seed: int, num_entities: int, per_entity: int, num_values: int, tokenizer_name: str,
               first: int, num: int) -> list[dict]:
    """Training rows first .. first + num - 1 (of num_entities * per_entity)."""
    w = world(seed, num_entities, per_entity, num_values, tokenizer_name)
    rows = []
    for n in range(first, min(first + num, len(w.order))):
        entity, phrasing = divmod(int(w.order[n]), per_entity)
        rows.append(_row(f"facts-{seed}-{n}", w.entities[entity], w.phrasings[entity][phrasing], w.answers[entity]))
    return rows


def heldout_rows(seed: int, num_entities: int, per_entity: int, num_values: int, heldout_per_entity: int,
                 tokenizer_name: str) -> list[dict]:
    """heldout_per_entity new phrasings of every entity's question, entity by entity, with its answer; none equals
    a training phrasing of that entity. Its own RNG stream, so the training rows do not depend on
    heldout_per_entity."""
    _check_phrasings(per_entity, heldout_per_entity)
    w = world(seed, num_entities, per_entity, num_values, tokenizer_name)
    rng = np.random.default_rng([seed, _HELDOUT_TAG, 3])
    rows = []
    for entity, trained, answer in zip(w.entities, w.phrasings, w.answers):
        for user in _new_phrasings(rng, (w.questions, w.fillers), entity, heldout_per_entity, set(trained)):
            rows.append(_row(f"facts-{seed}-heldout-{len(rows)}", entity, user, answer))
    return rows
