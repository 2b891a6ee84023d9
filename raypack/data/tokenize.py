"""Chat-template tokenization with loss masks and counted over-length handling (pure core).

A conversation is a plain dict (as produced by `raypack.data.formats`):

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...],
     "tools": str | None, "source": "path:row"}

Rendering
    `template="auto"` uses the tokenizer's own chat template when it has one and the
    built-in Llama-3-style template otherwise; `template="builtin"` always uses the
    built-in one, which renders

        <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>...

    Tools: the built-in template appends `"\\n\\nAvailable tools:\\n" + tools` to the
    first message when it is a system message, and otherwise inserts a system
    message whose content is `"Available tools:\\n" + tools`. An own template
    receives `tools=` (parsed JSON list) when its source mentions `tools` and the
    string is a JSON list; otherwise the tools are folded into the system message
    exactly as above, so they are never silently dropped.

Supervision
    Exactly the content of every assistant turn plus the template's end-of-turn
    text (`<|eot_id|>` for the built-in template) is supervised; everything else
    is IGNORE_INDEX. With an own template the end-of-turn text is what follows
    the content when the template renders the probe [user, assistant SENTINEL]
    (found once per tokenizer: `<|im_end|>\\n` for Qwen), and each assistant turn
    i is located in one of two ways:
      prefix    the character range between render(messages[:i],
                add_generation_prompt=True) and render(messages[:i+1]), when those
                are prefixes of the full rendering. Text the template puts between
                the generation prompt and the content (Qwen3's empty
                `<think>\\n\\n</think>\\n\\n` on the last turn) is context: when the
                range ends with content + end-of-turn text, only that is supervised.
      verbatim  otherwise (templates that render a turn differently once later
                turns follow, like Qwen3's), the messages are walked in order: each
                non-assistant content is skipped where it first appears, and each
                assistant turn's content + end-of-turn text must appear verbatim
                after it. A turn that cannot be found raises ValueError.
    A token is supervised when its first character lies inside a span.
    `labels[0]` is always IGNORE_INDEX: a first token has no predecessor, so it
    is never a target. This makes the supervised count the same in every packing
    arm and keeps a packed row from holding a target that crosses a sample
    boundary.

Scoring with the same template
    `chat_template_used` is the Jinja template that renders what training rendered:
    the tokenizer's own, or `BUILTIN_CHAT_TEMPLATE`, the built-in template written
    as Jinja (tools aside: the evaluation harness passes none). raypack's export
    saves it with the model's tokenizer, so lm-eval's `apply_chat_template` gives a
    trained model its prompts exactly as training rendered the conversation's
    prefix, generation prompt included (tested against `render_conversation`).
    `end_of_turn` is the text that closes an assistant turn, the token generation
    must stop at.

BOS
    Rendered text is encoded with add_special_tokens=False, so the template's own
    `<|begin_of_text|>` (the built-in one's, or `{{ bos_token }}` in an own
    template) is the only BOS, even with tokenizers whose post-processor adds one.
    The built-in template writes its four special tokens as text, so it refuses a
    tokenizer that lacks any of them as a single token (checked once per
    tokenizer) rather than train on the pieces they would split into.

Over-length policies (`max_seq_len`, counted in `TokenizeResult.counts`)
    truncate  keep the first max_seq_len tokens (`num_truncated`); a sample left
              without a supervised token is dropped (`num_dropped_no_supervised`).
    drop      drop samples longer than max_seq_len (`num_dropped_too_long`).
    split     cut into consecutive max_seq_len pieces, each with its own labels and
              labels[0] of every piece set to IGNORE_INDEX: each cut loses exactly
              one target, the first token of the new piece, when that token was
              supervised (`num_cut_targets_lost`). Pieces with no supervised token
              are dropped (`num_split_pieces_dropped`); a conversation all of whose
              pieces are dropped counts in `num_dropped_no_supervised`.
    Conversations with no supervised token at all are dropped before any cut
    (`num_dropped_no_supervised`).

    One pass, several policies: `tokenize_pieces` keeps every long conversation as all
    its pieces (outcome `long`) and raypack.data.overlength chooses rows per policy
    afterwards; the tokenized cache of `raypack prepare` is made this way, so arms with
    different +truncate/+split/+drop suffixes share it.

Accounting (tested)
    num_conversations == num_kept + num_dropped_too_long + num_dropped_no_supervised
    num_samples       == num_kept - num_split + num_split_pieces
    where num_kept counts conversations that gave at least one sample (whole,
    truncated or split); num_truncated and num_split are subsets of num_kept.

The whole batch of rendered texts goes through the fast (Rust) tokenizer in one
call; each span's first and last token are looked up on the Encoding, so no
per-token Python work is done (`labels_from_spans` is the offsets-based reference,
used for tokenizers without a Rust backend and checked equal in the tests).
"""

import json
import weakref
from dataclasses import dataclass, field

import numpy as np

from raypack.config import OVERLENGTH_POLICIES

IGNORE_INDEX = -100
TEMPLATES = ("auto", "builtin")
ROLES = ("system", "user", "assistant", "tool")
OUTCOMES = ("whole", "truncated", "split", "dropped_too_long", "dropped_no_supervised")

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
END_OF_TURN = "<|eot_id|>"
BUILTIN_SPECIAL_TOKENS = (BEGIN_OF_TEXT, START_HEADER, END_HEADER, END_OF_TURN)
TOOLS_HEADER = "Available tools:\n"
# The built-in template as Jinja, for tokenizer.apply_chat_template (lm-eval and generation): the same text as
# _render_builtin, plus the assistant header as the generation prompt.
BUILTIN_CHAT_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# The assistant content of the probe that finds an own template's end-of-turn text.
PROBE_SENTINEL = "RAYPACK_PROBE_SENTINEL"

COUNT_KEYS = (
    "num_conversations",
    "num_samples",
    "num_kept",
    "num_truncated",
    "num_split",
    "num_split_pieces",
    "num_split_pieces_dropped",
    "num_cut_targets_lost",
    "num_dropped_too_long",
    "num_dropped_no_supervised",
    "num_tokens",
    "num_supervised_tokens",
)


@dataclass
class TokenizeResult:
    """Tokenized samples and the counts that account for every input conversation.

    samples:  [{"input_ids": np.int32 array, "labels": np.int32 array, "source": str,
                "conversation": index of the input conversation it came from}, ...]
    counts:   one int per name in COUNT_KEYS (see the module docstring for the equations).
    outcomes: one per input conversation, in OUTCOMES: whole, truncated, split,
              dropped_too_long or dropped_no_supervised.
    """

    samples: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    outcomes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- rendering


def render_conversation(conversation: dict, tokenizer, template: str = "auto") -> tuple[str, list[tuple[int, int]]]:
    """Render one conversation to text and the character spans to supervise.

    Spans are sorted, non-overlapping (start, end) ranges of the returned text.
    """
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is not one of {TEMPLATES}; use 'auto' or 'builtin'")
    messages = _checked_messages(conversation)
    tools = conversation.get("tools") or None
    if template == "auto" and getattr(tokenizer, "chat_template", None):
        return _render_own(messages, tools, tokenizer, conversation.get("source", "?"))
    check_builtin_tokens(tokenizer)
    return _render_builtin(_fold_tools(messages, tools))


def chat_template_used(tokenizer, template: str = "auto") -> str:
    """The Jinja chat template that renders conversations as `render_conversation(.., template)` does: the
    tokenizer's own under "auto" when it has one, else BUILTIN_CHAT_TEMPLATE."""
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is not one of {TEMPLATES}; use 'auto' or 'builtin'")
    if template == "auto" and getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    check_builtin_tokens(tokenizer)
    return BUILTIN_CHAT_TEMPLATE


def end_of_turn(tokenizer, template: str = "auto") -> str | None:
    """The text the template writes after an assistant turn's content (supervised, so a trained model writes
    it when its answer ends): '<|eot_id|>' for the built-in one; None if an own template hides the content."""
    if template == "auto" and getattr(tokenizer, "chat_template", None):
        return _own_end_of_turn(tokenizer)
    return END_OF_TURN


# What is learnt once per tokenizer (weak keys: a tokenizer that goes away takes its entry along).
_BUILTIN_MISSING: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_END_OF_TURN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def check_builtin_tokens(tokenizer) -> None:
    """ValueError unless each special token the built-in template writes is one token of `tokenizer`."""
    if tokenizer not in _BUILTIN_MISSING:
        _BUILTIN_MISSING[tokenizer] = [
            token for token in BUILTIN_SPECIAL_TOKENS if len(tokenizer.encode(token, add_special_tokens=False)) != 1
        ]
    missing = _BUILTIN_MISSING[tokenizer]
    if missing:
        raise ValueError(
            f"the built-in Llama-3 template writes {', '.join(missing)} as text, but this tokenizer has no single "
            "token for them, so they would be split into ordinary pieces; use a tokenizer with a chat template "
            "(data.template=auto) or one with the Llama-3 special tokens"
        )


def _checked_messages(conversation: dict) -> list[dict]:
    source = conversation.get("source", "?")
    messages = conversation.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"conversation {source}: 'messages' must be a non-empty list of {{role, content}} dicts")
    for message in messages:
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise ValueError(
                f"conversation {source}: message {message!r} needs a role in {ROLES} and a str content; "
                "fix the format reader that produced it"
            )
    return messages


def _fold_tools(messages: list[dict], tools: str | None) -> list[dict]:
    """Put the tools text into the system message (see the module docstring)."""
    if not tools:
        return messages
    if messages[0]["role"] == "system":
        system = {"role": "system", "content": messages[0]["content"] + "\n\n" + TOOLS_HEADER + tools}
        return [system, *messages[1:]]
    return [{"role": "system", "content": TOOLS_HEADER + tools}, *messages]


def _render_builtin(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    parts, spans, position = [BEGIN_OF_TEXT], [], len(BEGIN_OF_TEXT)
    for message in messages:
        header = f"{START_HEADER}{message['role']}{END_HEADER}\n\n"
        body = message["content"] + END_OF_TURN
        position += len(header)
        if message["role"] == "assistant":
            spans.append((position, position + len(body)))
        position += len(body)
        parts += [header, body]
    return "".join(parts), spans


def _tools_for_template(tools: str | None, chat_template: str) -> list | None:
    """The tools as the `tools=` argument of an own template, or None to fold them in."""
    if not tools or "tools" not in chat_template:
        return None
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) else None


def _render_own(messages: list[dict], tools: str | None, tokenizer, source: str) -> tuple[str, list[tuple[int, int]]]:
    tools_arg = _tools_for_template(tools, tokenizer.chat_template)
    if tools_arg is None:
        messages = _fold_tools(messages, tools)
    if messages[0]["role"] == "assistant":
        raise ValueError(
            f"conversation {source} starts with an assistant turn, which a chat template cannot "
            "render a prompt for; start it with a system or user message, or use template='builtin'"
        )

    def render(prefix: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            prefix, tools=tools_arg, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    text, end_of_turn = render(messages, False), _own_end_of_turn(tokenizer)
    spans = _prefix_spans(messages, render, text, end_of_turn)
    if spans is None:
        spans = _verbatim_spans(messages, text, end_of_turn, source)
    return text, spans


def _own_end_of_turn(tokenizer) -> str | None:
    """What the tokenizer's template writes after an assistant turn's content; None if it hides the content."""
    template = tokenizer.chat_template
    cached = _END_OF_TURN.get(tokenizer)
    if cached is None or cached[0] != template:
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE_SENTINEL}]
        text = tokenizer.apply_chat_template(probe, tokenize=False)
        cached = (template, text.split(PROBE_SENTINEL, 1)[1] if PROBE_SENTINEL in text else None)
        _END_OF_TURN[tokenizer] = cached
    return cached[1]


def _prefix_spans(messages: list[dict], render, text: str, end_of_turn: str | None) -> list | None:
    """Spans from renderings of growing prefixes; None when they are not prefixes of `text`."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (through.startswith(before) and text.startswith(through)):
            return None
        start, end = len(before), len(through)
        turn = message["content"] + (end_of_turn or "")
        if end_of_turn is not None and text.endswith(turn, start, end):
            start = end - len(turn)  # what precedes the content is the template's, not the answer
        spans.append((start, end))
    return spans


def _verbatim_spans(messages: list[dict], text: str, end_of_turn: str | None, source: str) -> list:
    """Spans found by walking the messages through `text` in order (see the module docstring)."""
    spans, position = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            found = text.find(message["content"], position)
            position = position if found < 0 else found + len(message["content"])
            continue
        turn = message["content"] + (end_of_turn or "")
        found = text.find(turn, position) if end_of_turn is not None else -1
        if found < 0:
            raise ValueError(
                f"conversation {source}: the tokenizer's chat template is not prefix-stable (rendering "
                f"messages[:{i}] with add_generation_prompt=True, then messages[:{i + 1}], then all messages "
                f"does not extend the text each time), and assistant turn {i}'s content followed by the "
                f"template's end-of-turn text {end_of_turn!r} does not appear verbatim in the rendering, so "
                "its span cannot be found; fix the template or use template='builtin'"
            )
        position = found + len(turn)
        spans.append((found, position))
    return spans


# ---------------------------------------------------------------- tokenizing


def tokenize_conversations(
    conversations: list[dict],
    tokenizer,
    max_seq_len: int,
    overlength: str = "truncate",
    template: str = "auto",
) -> TokenizeResult:
    """Render, tokenize (one batched call) and mask conversations; apply the over-length policy."""
    _check_arguments(max_seq_len, overlength, template)
    result = TokenizeResult()
    result.counts["num_conversations"] = len(conversations)
    for conversation, (input_ids, labels) in zip(conversations, _encode(conversations, tokenizer, template)):
        pieces, outcome = _apply_overlength(input_ids, labels, max_seq_len, overlength, result.counts)
        _add(result, conversation, pieces, outcome)
    return _totals(result)


def tokenize_pieces(conversations: list[dict], tokenizer, max_seq_len: int, template: str = "auto") -> TokenizeResult:
    """Like tokenize_conversations, but with no over-length policy: a conversation longer than max_seq_len
    gives ALL its consecutive pieces (`cut_pieces`, with or without a target) and the outcome `long`, one that
    fits the outcome `whole`; raypack.data.overlength then applies any policy to them (one tokenization,
    several policies). Each sample carries its `piece` number; counts hold num_conversations, num_samples
    (pieces), num_tokens, num_supervised_tokens and num_dropped_no_supervised."""
    _check_arguments(max_seq_len, OVERLENGTH_POLICIES[0], template)
    result = TokenizeResult()
    result.counts["num_conversations"] = len(conversations)
    for conversation, (input_ids, labels) in zip(conversations, _encode(conversations, tokenizer, template)):
        if not _has_target(labels):
            pieces, outcome = [], "dropped_no_supervised"
            result.counts["num_dropped_no_supervised"] += 1
        elif len(input_ids) <= max_seq_len:
            pieces, outcome = [(input_ids, labels)], "whole"
        else:
            pieces, outcome = cut_pieces(input_ids, labels, max_seq_len), "long"
        _add(result, conversation, pieces, outcome)
    return _totals(result)


def _encode(conversations: list[dict], tokenizer, template: str) -> list[tuple]:
    if not conversations:
        return []
    rendered = [render_conversation(c, tokenizer, template) for c in conversations]
    return encode_with_labels(tokenizer, [text for text, _ in rendered], [spans for _, spans in rendered])


def _add(result: TokenizeResult, conversation: dict, pieces: list, outcome: str) -> None:
    result.outcomes.append(outcome)
    for number, (piece_ids, piece_labels) in enumerate(pieces):
        result.samples.append({"input_ids": piece_ids, "labels": piece_labels, "source": conversation.get("source", ""),
                               "conversation": len(result.outcomes) - 1, "piece": number})


def _totals(result: TokenizeResult) -> TokenizeResult:
    result.counts["num_samples"] = len(result.samples)
    result.counts["num_tokens"] = sum(len(s["input_ids"]) for s in result.samples)
    result.counts["num_supervised_tokens"] = sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in result.samples)
    return result


def _check_arguments(max_seq_len: int, overlength: str, template: str) -> None:
    if overlength not in OVERLENGTH_POLICIES:
        raise ValueError(f"overlength={overlength!r} is not one of {OVERLENGTH_POLICIES}")
    if template not in TEMPLATES:
        raise ValueError(f"template={template!r} is not one of {TEMPLATES}; use 'auto' or 'builtin'")
    # Two tokens is the least that can hold a target (labels[0] never is one).
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len!r} must be an int >= 2")


def encode_with_labels(tokenizer, texts: list[str], spans: list[list[tuple[int, int]]]) -> list[tuple]:
    """(input_ids, labels) per text, from ONE batched call of the fast tokenizer.

    The Rust tokenizer (`backend_tokenizer`) is called directly and each span's
    first and last token are looked up on its Encoding (a few calls per assistant
    turn): converting every token's offsets to Python and NumPy would cost as much
    as tokenizing. Tokenizers without a backend go through `labels_from_spans`.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(ids := np.asarray(i, dtype=np.int32), labels_from_spans(ids, o, sp))
                for i, o, sp in zip(encoded["input_ids"], encoded["offset_mapping"], spans)]
    out = []
    for encoding, text_spans in zip(backend.encode_batch(texts, add_special_tokens=False), spans):
        ids = np.array(encoding.ids, dtype=np.int32)
        labels = _labels_from_encoding(encoding, ids, text_spans)
        if labels is None:  # a span boundary that maps to no token: take the exact, slower route
            labels = labels_from_spans(ids, encoding.offsets, text_spans)
        out.append((ids, labels))
    return out


def _labels_from_encoding(encoding, ids: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray | None:
    """Same rule as labels_from_spans (a token is supervised when its first character is in a span)."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    for start, end in spans:
        if end <= start:
            continue
        first, last = encoding.char_to_token(start), encoding.char_to_token(end - 1)
        if first is None or last is None:
            return None
        if encoding.token_to_chars(first)[0] < start:  # the token straddles the span's start
            first += 1
        labels[first:last + 1] = ids[first:last + 1]
    if labels.size:
        labels[0] = IGNORE_INDEX
    return labels


def labels_from_spans(input_ids: np.ndarray, offsets, spans: list[tuple[int, int]]) -> np.ndarray:
    """Labels: input_ids where the token's first character is in a span, else IGNORE_INDEX.

    Sorted, disjoint spans flatten to boundaries [s0, e0, s1, e1, ...]; a start
    offset falls inside a span exactly when the number of boundaries <= it is odd.
    """
    starts = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[:, 0]
    boundaries = np.asarray(spans, dtype=np.int64).reshape(-1)
    inside = np.searchsorted(boundaries, starts, side="right") % 2 == 1
    labels = np.where(inside, input_ids, IGNORE_INDEX).astype(np.int32)
    if labels.size:
        labels[0] = IGNORE_INDEX
    return labels


def _has_target(labels: np.ndarray) -> bool:
    return bool((labels != IGNORE_INDEX).any())


def _apply_overlength(input_ids, labels, max_seq_len: int, overlength: str, counts: dict) -> tuple[list, str]:
    """The samples one conversation yields under the policy, and its outcome; updates counts."""
    if not _has_target(labels):
        return _count([], "dropped_no_supervised", counts)
    if len(input_ids) <= max_seq_len:
        return _count([(input_ids, labels)], "whole", counts)
    if overlength == "drop":
        return _count([], "dropped_too_long", counts)
    if overlength == "truncate":
        # Copies, so the dropped tail's memory is freed rather than kept by a view.
        pieces = [(input_ids[:max_seq_len].copy(), labels[:max_seq_len].copy())]
        outcome = "truncated"
    else:
        pieces = _split(input_ids, labels, max_seq_len, counts)
        outcome = "split"
    pieces = [(ids, lab) for ids, lab in pieces if _has_target(lab)]
    if not pieces:
        return _count([], "dropped_no_supervised", counts)
    if outcome == "split":
        counts["num_split_pieces"] += len(pieces)
    return _count(pieces, outcome, counts)


def _count(pieces: list, outcome: str, counts: dict) -> tuple[list, str]:
    # Every outcome but "whole" has its own counter, named num_<outcome>.
    if outcome != "whole":
        counts[f"num_{outcome}"] += 1
    if pieces:
        counts["num_kept"] += 1
    return pieces, outcome


def _split(input_ids, labels, max_seq_len: int, counts: dict) -> list[tuple]:
    pieces = cut_pieces(input_ids, labels, max_seq_len)
    # A cut removes the target of the new piece's first token: it would be
    # predicted from the previous token, which now sits in another sample.
    counts["num_cut_targets_lost"] += int((labels[max_seq_len::max_seq_len] != IGNORE_INDEX).sum())
    counts["num_split_pieces_dropped"] += sum(not _has_target(lab) for _, lab in pieces)
    return pieces


def cut_pieces(input_ids: np.ndarray, labels: np.ndarray, max_seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Consecutive max_seq_len pieces (copies), labels[0] of each set to IGNORE_INDEX.

    >>> [(i.tolist(), l.tolist()) for i, l in cut_pieces(np.arange(5), np.array([-100, 1, 2, 3, 4]), 2)]
    [([0, 1], [-100, 1]), ([2, 3], [-100, 3]), ([4], [-100])]
    """
    pieces = []
    for start in range(0, len(input_ids), max_seq_len):
        piece_labels = labels[start: start + max_seq_len].copy()
        piece_labels[0] = IGNORE_INDEX
        pieces.append((input_ids[start: start + max_seq_len].copy(), piece_labels))
    return pieces
