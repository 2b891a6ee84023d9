"""Synthetic conversations: deterministic, realistic lengths per preset; the tasks words, chain and facts.

    .venv/bin/pytest tests/test_synth.py -q
"""

import hashlib
import json
import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest

from raypack.config import ConfigError, SynthConfig, load_config
from raypack.data import facts, synth
from raypack.data.formats import normalise_row
from raypack.data.tokenize import IGNORE_INDEX, tokenize_conversations
from raypack.model import load_tokenizer

FACTS = SynthConfig(task="facts", num_entities=300, per_entity=4, num_values=16, heldout_per_entity=2)


@pytest.mark.parametrize("cfg", [SynthConfig(task="words", preset="tulu-326k", num_samples=1100, seed=3),
                                 SynthConfig(task="chain", num_samples=1100), FACTS], ids=lambda c: c.task)
def test_every_task_is_deterministic_by_seed_and_independent_of_blocking(cfg):
    facts.world.cache_clear()
    a = list(synth.synth_rows(cfg))
    assert len(a) == synth.num_rows(cfg) == (1200 if cfg.task == "facts" else 1100)
    facts.world.cache_clear()  # the second block made alone, as a fresh worker makes it, from nothing cached
    assert synth.synth_block(cfg, 1) == a[1000:]
    assert list(synth.synth_rows(cfg)) == a
    assert synth.synth_block(replace(cfg, seed=cfg.seed + 1), 1) != a[1000:]
    assert len({r["id"] for r in a}) == len(a)


def test_words_is_what_it_always_was():
    """Task words is byte for byte what raypack wrote before tasks existed (the digest of the old code's rows), so
    prepared caches and the tests built on them hold; its cache identity keeps the old fields."""
    cfg = SynthConfig(preset="tulu-326k", num_samples=50, seed=2)
    text = json.dumps(list(synth.synth_rows(cfg)))
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert digest == "c06ae204ef2ae4af3581c98fb7ad547e66cef81eecb4ff13a41f41d7784ff62f"
    assert json.dumps(list(synth.synth_rows(replace(cfg, task="chain")))) != text  # negative control
    assert synth.identity(cfg) == {"preset": "tulu-326k", "num_samples": 50, "seed": 2}
    assert synth.identity(replace(cfg, task="chain")) != synth.identity(cfg)
    # facts' rows do not depend on the preset, num_samples or the held-out count; they do on the entities.
    assert synth.identity(replace(FACTS, preset="tulu-326k", num_samples=7, heldout_per_entity=9)) == \
        synth.identity(FACTS) != synth.identity(replace(FACTS, num_entities=301))


def test_sample_lengths_are_the_synth_targets():
    rows = list(synth.synth_conversations("wildchat-652k", 1200, seed=1))
    lengths = synth.sample_lengths("wildchat-652k", 1200, seed=1)
    assert [r["target_tokens"] for r in rows] == lengths.tolist()


@pytest.mark.parametrize("name", list(synth.PRESETS))
def test_length_distribution_matches_paper_means(name):
    p = synth.PRESETS[name]
    lengths = synth.sample_lengths(name, 100_000, seed=0)
    assert abs(lengths.mean() / p.mean_tokens - 1) < 0.03
    assert (lengths > 4096).mean() > 0.003  # a long tail past the paper's max length


@pytest.mark.parametrize("task", ["words", "chain"])
def test_realised_mean_length_matches_preset(task):
    """Tokenized with the tiny tokenizer and the built-in template, lengths track the targets."""
    rows = list(synth.synth_rows(SynthConfig(task=task, preset="opensource-1.2m", num_samples=600, seed=0)))
    convs = [normalise_row(r, "messages", f"synth:{i}") for i, r in enumerate(rows)]
    tok = tokenize_conversations(convs, load_tokenizer("tiny"), max_seq_len=1 << 20)
    real = np.array([len(s["input_ids"]) for s in tok.samples])
    target = np.array([r["target_tokens"] for r in rows])
    ratio = real.sum() / target.sum()
    assert 0.9 < ratio < 1.1, f"realised/target tokens = {ratio:.3f}; recalibrate TOKENS_PER_WORD"
    assert np.corrcoef(real, target)[0, 1] > 0.98


def test_multi_turn_share_and_topics():
    rows = list(synth.synth_conversations("wildchat-gpt4-69k", 2000, seed=0))
    multi = np.mean([len(r["messages"]) > 2 for r in rows])
    assert abs(multi - synth.PRESETS["wildchat-gpt4-69k"].multi_turn_share) < 0.05
    assert {r["topic"] for r in rows} == set(synth.TOPICS)
    for r in rows[:50]:
        roles = [m["role"] for m in r["messages"]]
        assert roles[-1] == "assistant" and roles[::2] == ["user"] * (len(roles) // 2)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="opensource-1.2m"):
        synth.sample_lengths("nope", 10)


# --- chain: the words task's lengths, learnable text ---------------------------------------------------------------

def topic_words(rows: list[dict], topic: str) -> list[str]:
    return [w for r in rows if r["topic"] == topic for m in r["messages"]
            for w in re.findall("[a-z]+", m["content"].lower())]


def entropy(words: list[str]) -> float:
    n = len(words)
    return -sum(c / n * math.log(c / n) for c in Counter(words).values())


def conditional_entropy(words: list[str]) -> float:
    """The plug-in estimate of H(next word | word) in nats, counted in plain Python."""
    pairs, before, n = Counter(pairwise(words)), Counter(words[:-1]), len(words) - 1
    return -sum(c / n * math.log(c / before[a]) for (a, _), c in pairs.items())


def test_chain_has_the_words_lengths_turns_and_topics():
    words = list(synth.synth_rows(SynthConfig(task="words", num_samples=300, seed=4)))
    chain = list(synth.synth_rows(SynthConfig(task="chain", num_samples=300, seed=4)))
    shape = [lambda r: r["topic"], lambda r: r["target_tokens"],
             lambda r: [(m["role"], len(m["content"].split())) for m in r["messages"]]]
    assert all([f(a) for a in words] == [f(b) for b in chain] for f in shape)
    assert all(r["task"] == "chain" for r in chain)
    # Negative control: the texts differ, mostly.
    assert sum(a["messages"][0]["content"] != b["messages"][0]["content"] for a, b in zip(words, chain)) > 290


def test_chain_text_is_learnable_and_words_text_is_not():
    """On ~11k words of one topic, the next word given the word is far more predictable in chain text than in
    words text, whose conditional entropy is its own shuffle's (the estimator's unigram entropy at this sample
    size): words text has no order to learn. The chain keeps words' unigram distribution."""
    texts = {task: topic_words(list(synth.synth_rows(SynthConfig(task=task, num_samples=300))), "cooking")
             for task in ("words", "chain")}
    shuffled = {task: random.Random(0).sample(ws, len(ws)) for task, ws in texts.items()}
    h = {task: conditional_entropy(ws) for task, ws in texts.items()}
    h_shuffled = {task: conditional_entropy(ws) for task, ws in shuffled.items()}
    assert len(texts["chain"]) > 5000
    assert h["words"] > 0.95 * h_shuffled["words"]  # negative control: no structure beyond unigrams
    assert h["chain"] < 0.4 * h_shuffled["chain"] and h["chain"] < 0.4 * h["words"]
    assert abs(entropy(texts["chain"]) - entropy(texts["words"])) < 0.1
    # Each topic's successor map is fixed by the seed.
    assert synth.successors(0) == synth.successors(0) != synth.successors(1)


# --- facts: entities with fixed answers, held-out phrasings ----------------------------------------------------

def answers_by_entity(rows: list[dict]) -> dict[str, set[str]]:
    out = defaultdict(set)
    for r in rows:
        out[r["topic"]].add(r["messages"][1]["content"])
    return out


def test_facts_rows_answer_their_entity_with_its_fixed_pair():
    rows = list(synth.synth_rows(FACTS))
    world = facts.world(FACTS.seed, FACTS.num_entities, FACTS.per_entity, FACTS.num_values, "tiny")
    values = {v for a in world.answers for v in a.split()}
    sets = [set(world.entities), values, set(world.questions), set(world.fillers)]
    assert sum(map(len, sets)) == len(set().union(*sets))  # disjoint
    assert len(values) <= FACTS.num_values
    assert [r["id"] for r in rows] == [f"facts-0-{n}" for n in range(len(rows))]
    by_entity = defaultdict(list)
    for r in rows:
        user, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert r["task"] == "facts" and [m["role"] for m in r["messages"]] == ["user", "assistant"]
        *fill, question, last = user.split()
        assert last == r["topic"] + "?" and question in world.questions and 2 <= len(fill) <= 3
        assert set(fill) <= set(world.fillers) and len(answer.split()) == 2 and set(answer.split()) <= values
        by_entity[r["topic"]].append(user)
    assert set(by_entity) == set(world.entities)
    assert all(len(users) == len(set(users)) == FACTS.per_entity for users in by_entity.values())
    answers = answers_by_entity(rows)
    assert all(len(a) == 1 for a in answers.values())
    assert len({a for (a,) in answers.values()}) > FACTS.num_entities // 2  # answers differ between entities
    # Negative control: one row answered with another entity's pair is caught by the same check.
    wrong = [dict(r, messages=[r["messages"][0], rows[1]["messages"][1]]) if i == 0 else r for i, r in enumerate(rows)]
    assert rows[0]["topic"] != rows[1]["topic"] and not all(len(a) == 1 for a in answers_by_entity(wrong).values())
    # Shuffled: consecutive rows rarely ask about the same entity (sorted by entity, 3 in 4 pairs would).
    assert np.mean([a["topic"] == b["topic"] for a, b in pairwise(rows)]) < 0.05


def heldout_overlaps(heldout: list[dict], rows: list[dict]) -> int:
    trained = defaultdict(set)
    for r in rows:
        trained[r["topic"]].add(r["messages"][0]["content"])
    return sum(h["messages"][0]["content"] in trained[h["topic"]] for h in heldout)


def test_facts_heldout_asks_trained_entities_in_new_words(monkeypatch):
    """Held-out phrasings are never an entity's training phrasing, and only trained entities are asked, with their
    answers. Checked where phrasings are scarce (2 fillers, 1 question word: 12 phrasings per entity, 6 taken),
    so that drawing without the exclusion would collide, which the negative control shows."""
    monkeypatch.setattr(facts, "NUM_FILLERS", 2)
    monkeypatch.setattr(facts, "NUM_QUESTION_WORDS", 1)
    facts.world.cache_clear()
    cfg = replace(FACTS, num_entities=100, per_entity=3, heldout_per_entity=3)
    try:
        rows, heldout = list(synth.synth_rows(cfg)), synth.facts_heldout(cfg, "tiny")
        world = facts.world(cfg.seed, cfg.num_entities, cfg.per_entity, cfg.num_values, "tiny")
        rng = np.random.default_rng(0)
        careless = [dict(h, messages=[{"role": "user", "content": text}, h["messages"][1]])
                    for h, text in zip(heldout, (t for e in world.entities
                                                 for t in facts._new_phrasings(rng, (world.questions, world.fillers),
                                                                               e, cfg.heldout_per_entity, set())))]
    finally:
        facts.world.cache_clear()
    assert len(heldout) == cfg.num_entities * cfg.heldout_per_entity
    assert Counter(h["topic"] for h in heldout) == {e: cfg.heldout_per_entity for e in world.entities}
    trained_answers = answers_by_entity(rows)
    assert all(trained_answers[h["topic"]] == {h["messages"][1]["content"]} for h in heldout)
    users = [(h["topic"], h["messages"][0]["content"]) for h in heldout]
    assert len(set(users)) == len(users) and heldout_overlaps(heldout, rows) == 0
    trained = Counter((r["topic"], r["messages"][0]["content"]) for r in rows)
    assert len(trained) == len(rows)  # the training phrasings of an entity differ too
    assert heldout_overlaps(careless, rows) > 0  # negative control
    assert facts.heldout_rows(0, 100, 3, 16, 3, "tiny") != facts.heldout_rows(1, 100, 3, 16, 3, "tiny")


def supervised_counts(rows: list[dict], tokenizer) -> list[int]:
    convs = [normalise_row(r, "messages", f"facts:{i}") for i, r in enumerate(rows)]
    samples = tokenize_conversations(convs, tokenizer, max_seq_len=256).samples
    assert len(samples) == len(rows)
    return [int((np.asarray(s["labels"]) != IGNORE_INDEX).sum()) for s in samples]


@pytest.mark.parametrize("which", ["tiny", "llama3"])
def test_facts_answer_is_two_supervised_tokens_and_end_of_turn(which, request):
    name = "tiny" if which == "tiny" else str(request.getfixturevalue("llama3_tokenizer_dir"))
    tokenizer = load_tokenizer(name)
    cfg = replace(FACTS, num_entities=150, per_entity=2, num_values=32)
    rows = list(synth.synth_rows(cfg, name)) + synth.facts_heldout(cfg, name)
    assert supervised_counts(rows, tokenizer) == [3] * len(rows)
    world = facts.world(cfg.seed, cfg.num_entities, cfg.per_entity, cfg.num_values, name)
    assert all(len(tokenizer.encode(" " + e, add_special_tokens=False)) == 1 for e in world.entities)
    # Negative control: an answer whose words are not single tokens is counted as more.
    long_answer = dict(rows[0], messages=[rows[0]["messages"][0],
                                          {"role": "assistant", "content": "xylophonequartz zq"}])
    assert supervised_counts([long_answer], tokenizer)[0] > 3


def test_facts_refuses_more_words_than_the_tokenizer_has():
    words, bare = facts.single_token_words("tiny")
    with pytest.raises(ValueError, match=rf"has {len(words)} lowercase words") as err:
        list(synth.synth_rows(replace(FACTS, num_entities=len(words))))
    most = int(re.search(r"at most (\d+)", str(err.value)).group(1))
    assert len(synth.synth_block(replace(FACTS, num_entities=most, per_entity=1), 0)) == min(most, synth.BLOCK_SIZE)
    with pytest.raises(ValueError, match=rf"has only {len(bare)} "):
        list(synth.synth_rows(replace(FACTS, num_values=len(bare) + 1)))
    with pytest.raises(ConfigError, match="synth.num_entities"):
        load_config(None, ["synth.num_entities=0"])
