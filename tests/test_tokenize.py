"""Rendering, loss masks and over-length accounting of raypack.data.tokenize.

    .venv/bin/pytest tests/test_tokenize.py
"""

import numpy as np
import pytest

from raypack.data.tokenize import (
    COUNT_KEYS,
    IGNORE_INDEX,
    labels_from_spans,
    render_conversation,
    tokenize_conversations,
    tokenize_pieces,
)
from raypack.data.overlength import POLICY_COUNT_KEYS, cache_columns, kept_rows, policy_counts
from raypack.model import load_tokenizer

EOT = "<|eot_id|>"

# A Llama-3-style Jinja template (no trimming, so the text matches the built-in one).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Same, but reads `tools` itself: the tool names go into a header of their own.
TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|start_header_id|>tools<|end_header_id|>\n\n"
    "{% for t in tools %}{{ t['name'] }};{% endfor %}<|eot_id|>{% endif %}"
) + LLAMA3_TEMPLATE.removeprefix("{{ bos_token }}")
# Starts with the number of messages, so no shorter rendering is a prefix of a
# longer one: assistant spans are found verbatim instead.
UNSTABLE_TEMPLATE = "{{ messages | length }}" + LLAMA3_TEMPLATE
# Same, and it upper-cases every message: assistant content appears nowhere verbatim.
SHOUTING_TEMPLATE = UNSTABLE_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | upper }}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def with_template(template: str):
    """A fresh tiny tokenizer carrying `template` (the shared fixture stays template-free)."""
    tokenizer = load_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def conversation(*turns, tools=None, source="test:0") -> dict:
    """conversation(("user", "Hi"), ("assistant", "Hello")) -> a conversation dict."""
    return {"messages": [{"role": r, "content": c} for r, c in turns], "tools": tools, "source": source}


def supervised_texts(sample: dict, tokenizer) -> list[str]:
    """Decode each contiguous run of supervised labels."""
    labels = sample["labels"]
    supervised = np.concatenate([[False], labels != IGNORE_INDEX, [False]])
    edges = np.flatnonzero(np.diff(supervised.astype(np.int8)))
    return [tokenizer.decode(labels[start:end].tolist()) for start, end in zip(edges[::2], edges[1::2])]


def assert_invariants(result, max_seq_len: int) -> None:
    counts = result.counts
    assert set(counts) == set(COUNT_KEYS)
    assert counts["num_conversations"] == (
        counts["num_kept"] + counts["num_dropped_too_long"] + counts["num_dropped_no_supervised"]
    )
    assert counts["num_samples"] == counts["num_kept"] - counts["num_split"] + counts["num_split_pieces"]
    assert counts["num_samples"] == len(result.samples)
    # One outcome per conversation, agreeing with the counts and with the samples' origins.
    assert len(result.outcomes) == counts["num_conversations"]
    for outcome in ("truncated", "split", "dropped_too_long", "dropped_no_supervised"):
        assert result.outcomes.count(outcome) == counts[f"num_{outcome}"]
    kept = {i for i, o in enumerate(result.outcomes) if not o.startswith("dropped")}
    assert {s["conversation"] for s in result.samples} == kept
    assert len({s["source"] for s in result.samples}) == counts["num_kept"]
    assert counts["num_tokens"] == sum(len(s["input_ids"]) for s in result.samples)
    assert counts["num_supervised_tokens"] == sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in result.samples)
    for sample in result.samples:
        assert sample["input_ids"].dtype == np.int32 and sample["labels"].dtype == np.int32
        assert len(sample["input_ids"]) == len(sample["labels"]) <= max_seq_len
        assert sample["labels"][0] == IGNORE_INDEX
        assert (sample["labels"] != IGNORE_INDEX).any()
        supervised = sample["labels"] != IGNORE_INDEX
        assert np.array_equal(sample["labels"][supervised], sample["input_ids"][supervised])


# ---------------------------------------------------------------- what is supervised


def test_builtin_single_turn(tokenizer):
    conv = conversation(("user", "What is 2+2?"), ("assistant", "It is 4."))
    text, spans = render_conversation(conv, tokenizer)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 4.<|eot_id|>"
    )
    assert [text[a:b] for a, b in spans] == ["It is 4." + EOT]
    result = tokenize_conversations([conv], tokenizer, max_seq_len=128)
    assert supervised_texts(result.samples[0], tokenizer) == ["It is 4." + EOT]
    assert_invariants(result, 128)


def test_builtin_multi_turn_with_system_and_unicode(tokenizer):
    conv = conversation(
        ("system", "You are terse."),
        ("user", "Name a café."),
        ("assistant", "Café Naïve 😀, on 5th St."),
        ("user", "Another?"),
        ("assistant", "\n  Indented answer\n\nwith paragraphs."),
    )
    result = tokenize_conversations([conv], tokenizer, max_seq_len=256)
    assert supervised_texts(result.samples[0], tokenizer) == [
        "Café Naïve 😀, on 5th St." + EOT,
        "\n  Indented answer\n\nwith paragraphs." + EOT,
    ]


def test_tool_turns_are_context_only(tokenizer):
    conv = conversation(
        ("user", "Weather in Paris?"),
        ("assistant", '{"name": "weather", "arguments": {"city": "Paris"}}'),
        ("tool", '{"temp_c": 21}'),
        ("assistant", "It is 21 °C."),
        tools='[{"name": "weather"}]',
    )
    text, _ = render_conversation(conv, tokenizer)
    assert "<|start_header_id|>tool<|end_header_id|>\n\n{\"temp_c\": 21}<|eot_id|>" in text
    result = tokenize_conversations([conv], tokenizer, max_seq_len=256)
    assert supervised_texts(result.samples[0], tokenizer) == [
        '{"name": "weather", "arguments": {"city": "Paris"}}' + EOT,
        "It is 21 °C." + EOT,
    ]


def test_tools_create_or_extend_the_system_message(tokenizer):
    tools = '[{"name": "calc"}]'
    without_system, _ = render_conversation(conversation(("user", "1+1"), ("assistant", "2"), tools=tools), tokenizer)
    assert without_system.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAvailable tools:\n"
        '[{"name": "calc"}]<|eot_id|><|start_header_id|>user'
    )
    with_system, _ = render_conversation(
        conversation(("system", "Be exact."), ("user", "1+1"), ("assistant", "2"), tools=tools), tokenizer
    )
    assert with_system.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe exact.\n\nAvailable tools:\n"
        '[{"name": "calc"}]<|eot_id|><|start_header_id|>user'
    )
    assert with_system.count("<|start_header_id|>system") == 1


def test_labels_zero_is_never_a_target():
    ids = np.array([7, 8, 9], dtype=np.int32)
    labels = labels_from_spans(ids, [(0, 1), (1, 2), (2, 3)], [(0, 3)])
    assert labels.tolist() == [IGNORE_INDEX, 8, 9]


def test_conversation_without_assistant_is_dropped(tokenizer):
    result = tokenize_conversations([conversation(("user", "Anyone there?"))], tokenizer, max_seq_len=64)
    assert result.samples == []
    assert result.counts["num_dropped_no_supervised"] == 1
    assert_invariants(result, 64)


# ---------------------------------------------------------------- own chat templates


def test_own_template_supervises_assistant_content(tokenizer):
    conv = conversation(
        ("system", "S."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye now.")
    )
    own = with_template(LLAMA3_TEMPLATE)
    text, spans = render_conversation(conv, own)
    assert [text[a:b] for a, b in spans] == ["Hello!" + EOT, "Bye now." + EOT]
    own_result = tokenize_conversations([conv], own, max_seq_len=128)
    assert supervised_texts(own_result.samples[0], own) == ["Hello!" + EOT, "Bye now." + EOT]
    # This template renders exactly the built-in text, so both paths give the same labels.
    builtin = tokenize_conversations([conv], own, max_seq_len=128, template="builtin")
    assert np.array_equal(own_result.samples[0]["labels"], builtin.samples[0]["labels"])
    assert np.array_equal(own_result.samples[0]["input_ids"], builtin.samples[0]["input_ids"])


def test_own_template_receives_tools_when_it_reads_them():
    tools = '[{"name": "calc"}, {"name": "search"}]'
    conv = conversation(("user", "1+1"), ("assistant", "2"), tools=tools)
    text, spans = render_conversation(conv, with_template(TOOLS_TEMPLATE))
    assert "<|start_header_id|>tools<|end_header_id|>\n\ncalc;search;<|eot_id|>" in text
    assert "Available tools" not in text and [text[a:b] for a, b in spans] == ["2" + EOT]
    folded, _ = render_conversation(conv, with_template(LLAMA3_TEMPLATE))
    assert "<|start_header_id|>system<|end_header_id|>\n\nAvailable tools:\n" + tools in folded


def test_template_builtin_ignores_the_tokenizers_own_template():
    conv = conversation(("user", "Hi"), ("assistant", "Hello"))
    own = with_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    text, _ = render_conversation(conv, own, template="builtin")
    assert text.startswith("<|begin_of_text|><|start_header_id|>user")


def test_prefix_unstable_template_is_located_verbatim():
    """A user turn ending in the answer's text does not capture the answer's span: contents are walked in order."""
    conv = conversation(("user", "Say OK"), ("assistant", "OK"), ("user", "Again: OK"), ("assistant", "OK"))
    unstable = with_template(UNSTABLE_TEMPLATE)
    text, spans = render_conversation(conv, unstable)
    assert text.startswith("4<|begin_of_text|>")
    _, stable_spans = render_conversation(conv, with_template(LLAMA3_TEMPLATE))
    assert [(a + 1, b + 1) for a, b in stable_spans] == spans  # the same places, one character later
    result = tokenize_conversations([conv], unstable, max_seq_len=128)
    assert supervised_texts(result.samples[0], unstable) == ["OK" + EOT, "OK" + EOT]


def test_prefix_unstable_template_without_verbatim_content_raises():
    conv = conversation(("user", "Hi"), ("assistant", "Hello"))
    with pytest.raises(ValueError, match="prefix-stable.*verbatim"):
        render_conversation(conv, with_template(SHOUTING_TEMPLATE))


def test_own_template_rejects_leading_assistant_turn():
    with pytest.raises(ValueError, match="starts with an assistant turn"):
        render_conversation(conversation(("assistant", "Hello")), with_template(LLAMA3_TEMPLATE))


# ---------------------------------------------------------------- over-length policies

# Lengths with the built-in template (5 header tokens per turn; "the the ..." is one token a word):
#   fits  13 tokens, targets at 11-12      late  43 tokens, targets at 40-42
#   early 42 tokens, targets at 11-41      none   7 tokens, no target
#   cut   17 tokens, its only target (the eot of an empty answer) at 16
POLICY_CONVERSATIONS = [
    conversation(("user", "Hi"), ("assistant", "Hello"), source="fits"),
    conversation(("user", "the" + " the" * 29), ("assistant", "Sure."), source="late"),
    conversation(("user", "Hi"), ("assistant", "the" + " the" * 29), source="early"),
    conversation(("user", "Hi"), source="none"),
    conversation(("user", "the" + " the" * 5), ("assistant", ""), source="cut"),
]
MAX_SEQ_LEN = 16


def test_policy_fixture_lengths(tokenizer):
    result = tokenize_conversations(POLICY_CONVERSATIONS, tokenizer, max_seq_len=1000)
    lengths = {s["source"]: len(s["input_ids"]) for s in result.samples}
    targets = {s["source"]: np.flatnonzero(s["labels"] != IGNORE_INDEX).tolist() for s in result.samples}
    assert lengths == {"fits": 13, "late": 43, "early": 42, "cut": 17}
    assert targets == {"fits": [11, 12], "late": [40, 41, 42], "early": list(range(11, 42)), "cut": [16]}


def expected_counts(**nonzero) -> dict:
    return {key: nonzero.get(key, 0) for key in COUNT_KEYS}


def test_truncate_counts(tokenizer):
    result = tokenize_conversations(POLICY_CONVERSATIONS, tokenizer, MAX_SEQ_LEN, overlength="truncate")
    assert result.counts == expected_counts(
        num_conversations=5, num_samples=2, num_kept=2, num_truncated=1,
        num_dropped_no_supervised=3, num_tokens=13 + 16, num_supervised_tokens=2 + 5,
    )  # fmt: skip
    assert [s["source"] for s in result.samples] == ["fits", "early"]
    assert_invariants(result, MAX_SEQ_LEN)


def test_drop_counts(tokenizer):
    result = tokenize_conversations(POLICY_CONVERSATIONS, tokenizer, MAX_SEQ_LEN, overlength="drop")
    assert result.counts == expected_counts(
        num_conversations=5, num_samples=1, num_kept=1, num_dropped_too_long=3,
        num_dropped_no_supervised=1, num_tokens=13, num_supervised_tokens=2,
    )  # fmt: skip
    assert_invariants(result, MAX_SEQ_LEN)


def test_split_counts(tokenizer):
    result = tokenize_conversations(POLICY_CONVERSATIONS, tokenizer, MAX_SEQ_LEN, overlength="split")
    # late: pieces 0-15 and 16-31 hold no target (dropped), 32-42 keeps 3.
    # early: pieces 0-15, 16-31, 32-41 keep 5, 15 and 9 targets (two cuts each lose one).
    # cut: its only target is the first token of piece 16-16, so both pieces go.
    assert result.counts == expected_counts(
        num_conversations=5, num_samples=5, num_kept=3, num_split=2, num_split_pieces=4,
        num_split_pieces_dropped=4, num_cut_targets_lost=3, num_dropped_no_supervised=2,
        num_tokens=13 + 11 + 16 + 16 + 10, num_supervised_tokens=2 + 3 + 5 + 15 + 9,
    )  # fmt: skip
    assert [s["source"] for s in result.samples] == ["fits", "late", "early", "early", "early"]
    whole = tokenize_conversations(POLICY_CONVERSATIONS[2:3], tokenizer, max_seq_len=1000).samples[0]
    pieces = [s for s in result.samples if s["source"] == "early"]
    assert np.array_equal(np.concatenate([p["input_ids"] for p in pieces]), whole["input_ids"])
    assert_invariants(result, MAX_SEQ_LEN)


@pytest.mark.parametrize("overlength", ["truncate", "drop", "split"])
@pytest.mark.parametrize("max_seq_len", [2, 3, 7, 12, 17, 40, 500])
def test_accounting_invariant(tokenizer, overlength, max_seq_len):
    conversations = POLICY_CONVERSATIONS + [
        conversation(("user", f"q{i}" * i), ("assistant", "a" * (3 * i)), ("user", "x"), source=f"extra:{i}")
        for i in range(1, 8)
    ]
    result = tokenize_conversations(conversations, tokenizer, max_seq_len, overlength=overlength)
    assert result.counts["num_conversations"] == len(conversations)
    assert_invariants(result, max_seq_len)


def policy_from_pieces(conversations, tokenizer, max_seq_len: int, overlength: str):
    """(samples, counts) of one policy chosen from a policy-free pass, the way prepare and compare choose them."""
    pieces = tokenize_pieces(conversations, tokenizer, max_seq_len)
    key, status, piece, num_tokens, num_supervised = cache_columns(pieces)
    kept = kept_rows(status, piece, num_supervised, overlength)
    samples = [s for s, k in zip(pieces.samples, kept) if k]  # the dropped records come last and are never kept
    return samples, policy_counts(key, status, piece, num_tokens, num_supervised, overlength)


@pytest.mark.parametrize("overlength", ["truncate", "drop", "split"])
@pytest.mark.parametrize("max_seq_len", [2, 7, MAX_SEQ_LEN, 40, 500])
def test_one_pass_then_any_policy_equals_the_policy_applied_while_tokenizing(tokenizer, overlength, max_seq_len):
    """The tokenized cache keeps every piece and prepare picks an arm's policy from it; the samples and counts
    must be those of tokenizing with that policy (the reference: tokenize_conversations' own policy code)."""
    conversations = POLICY_CONVERSATIONS + [
        conversation(("user", f"q{i}" * i), ("assistant", "a" * (3 * i)), ("user", "x"), source=f"extra:{i}")
        for i in range(1, 8)
    ]
    reference = tokenize_conversations(conversations, tokenizer, max_seq_len, overlength=overlength)
    samples, counts = policy_from_pieces(conversations, tokenizer, max_seq_len, overlength)
    assert [(s["source"], s["input_ids"].tolist(), s["labels"].tolist()) for s in samples] == \
        [(s["source"], s["input_ids"].tolist(), s["labels"].tolist()) for s in reference.samples]
    assert counts == {key: reference.counts[key] for key in POLICY_COUNT_KEYS}


def test_policies_from_one_pass_differ_where_they_should(tokenizer):
    """Negative control of the test above: the policies really do choose different samples here."""
    chosen = {p: [s["source"] for s in policy_from_pieces(POLICY_CONVERSATIONS, tokenizer, MAX_SEQ_LEN, p)[0]]
              for p in ("truncate", "split", "drop")}
    assert chosen == {"truncate": ["fits", "early"], "split": ["fits", "late", "early", "early", "early"],
                      "drop": ["fits"]}


# ---------------------------------------------------------------- API edges and the hot path


def test_bad_arguments_raise(tokenizer):
    conv = conversation(("user", "Hi"), ("assistant", "Hello"))
    with pytest.raises(ValueError, match="overlength"):
        tokenize_conversations([conv], tokenizer, 64, overlength="wrap")
    with pytest.raises(ValueError, match="template"):
        tokenize_conversations([conv], tokenizer, 64, template="chatml")
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_conversations([conv], tokenizer, 1)
    with pytest.raises(ValueError, match="role"):
        render_conversation(conversation(("human", "Hi")), tokenizer)
    assert tokenize_conversations([], tokenizer, 64).counts["num_conversations"] == 0


def test_one_batched_tokenizer_call(tokenizer, monkeypatch):
    calls = []
    backend = tokenizer.backend_tokenizer

    class CountingBackend:
        def encode_batch(self, texts, *args, **kwargs):
            calls.append(texts)
            return backend.encode_batch(texts, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "backend_tokenizer", property(lambda self: CountingBackend()))
    conversations = [conversation(("user", f"Question {i}"), ("assistant", f"Answer {i}")) for i in range(50)]
    result = tokenize_conversations(conversations, tokenizer, max_seq_len=64)
    assert len(result.samples) == 50
    assert len(calls) == 1 and isinstance(calls[0], list) and len(calls[0]) == 50


def test_fast_labels_equal_the_offsets_reference(tokenizer):
    """The Encoding lookups give exactly the labels of the offsets-based rule, ids identical too."""
    from raypack.data import synth
    from raypack.data.tokenize import encode_with_labels, render_conversation

    convs = [{"messages": r["messages"], "tools": None, "source": str(i)}
             for i, r in enumerate(synth.synth_conversations("wildchat-gpt4-69k", 40, seed=2))]
    convs += [conversation(("user", "  lead space"), ("assistant", " x\n\n y "), ("user", "é"), ("assistant", "ü\t"))]
    rendered = [render_conversation(c, tokenizer) for c in convs]
    texts, spans = [t for t, _ in rendered], [s for _, s in rendered]
    fast = encode_with_labels(tokenizer, texts, spans)
    ref = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    for (ids, labels), ref_ids, offsets, sp in zip(fast, ref["input_ids"], ref["offset_mapping"], spans):
        assert ids.tolist() == ref_ids
        assert np.array_equal(labels, labels_from_spans(np.asarray(ref_ids, dtype=np.int32), offsets, sp))


def test_builtin_special_tokens_are_checked_once_per_tokenizer(monkeypatch):
    tokenizer, calls = load_tokenizer(), []
    encode = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: calls.append(a) or encode(*a, **k))
    conversations = [conversation(("user", f"Question {i}"), ("assistant", f"Answer {i}")) for i in range(20)]
    tokenize_conversations(conversations, tokenizer, max_seq_len=64)
    tokenize_conversations(conversations, tokenizer, max_seq_len=64)
    assert sorted(a[0] for a in calls) == sorted(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", EOT])
