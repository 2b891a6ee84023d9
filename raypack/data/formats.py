"""Read SFT files (JSON, JSONL, Parquet) and normalise each row to one conversation type (pure core).

Three input formats are accepted, detected per file from its first JSON object or
forced by the caller:

- ``messages`` (OpenAI style): ``{"messages": [{"role": "user", "content": "Hi"}, ...], "tools": ...}``
- ``sharegpt``: ``{"conversations": [{"from": "human", "value": "Hi"}, ...], "system": ..., "tools": ...}``
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ..., "system": ..., "history": [[q, a], ...]}``

Every valid row becomes a plain, Arrow-friendly dict, for example::

    {"messages": [{"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "Blue."}],
     "tools": None,
     "source": "data/alpaca.json:1",
     "topic": ""}

``topic`` is the row's own ``topic`` field when it is a string, else "" (no topic):
what ``pack.group_backend: topic`` groups by (raypack.data.pipeline.group). It is
never a reason to reject a row; grouping by topic refuses samples without one.

Every invalid row is rejected with exactly one reason from ``REJECT_REASONS``. When
several apply, the first failing check in this fixed order names the row:

1. ``unparseable_json``: a JSONL line that is not JSON (found while reading).
2. ``missing_field``: not a JSON object, a required key absent or null, a turn that
   is not an object or lacks its role/content keys, a malformed alpaca ``history``.
3. ``non_string_content``: a turn's content (or ``system``/``tools``) is not a string;
   a list of ``{"type": "text", "text": ...}`` parts counts as a string.
4. ``unknown_role``: a role outside the format's role set.
5. ``empty_content``: an empty or whitespace-only turn (alpaca: instruction or output).
6. ``no_assistant_turn``: nothing to supervise.
7. ``last_turn_not_assistant``: the conversation ends on a turn the model does not write.

So a row is first judged on its shape, then on its values, then on whether it can be
trained on; the position of a fault inside the conversation never changes the reason.

Null is treated like an absent key everywhere, because Arrow (Parquet, Ray Data) fills
absent struct fields with null and a row must normalise the same after a round trip.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from raypack.config import FORMATS

REJECT_REASONS = (
    "unparseable_json",
    "missing_field",
    "unknown_role",
    "empty_content",
    "no_assistant_turn",
    "last_turn_not_assistant",
    "non_string_content",
)
ROLES = ("system", "user", "assistant", "tool")
EXTENSIONS = (".json", ".jsonl", ".parquet")

_MESSAGES_ROLES = {role: role for role in ROLES}
# function_call is the model emitting a tool call, so it is an assistant turn and
# gets supervised; observation is the tool's answer, which the model only reads.
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
}
# Keys that identify each format, checked in FORMATS order.
_FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
}
# Tool schemas that declare no tools; templates should see None, not an empty block.
_NO_TOOLS = ("", "[]", "{}", "null")

# (where, raw role, text): "where" locates the turn in the row for error details.
Turn = tuple[str, Any, Any]


class RowError(ValueError):
    """One invalid row: ``reason`` is one of REJECT_REASONS, ``detail`` says what is wrong."""

    def __init__(self, reason: str, detail: str):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}; use one of {REJECT_REASONS}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        # Ray pickles exceptions between workers; the default reduce would replay
        # only the joined message into __init__ and fail.
        return (RowError, (self.reason, self.detail))


class FormatError(ValueError):
    """A file that cannot be read or whose format cannot be told, or a bad row in strict mode."""


@dataclass
class LoadResult:
    """What load_conversations kept and what it rejected, with counts that add up."""

    conversations: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    num_input_rows: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))

    def reject(self, path: str, row_num: int, error: RowError) -> None:
        self.rejected.append({"source": path, "row": row_num, "reason": error.reason, "detail": error.detail})
        self.rejected_reasons[error.reason] += 1


# ---------------------------------------------------------------- detection


def detect_format(row: dict) -> str:
    """Name the format of one row from its keys; FormatError if none matches."""
    if not isinstance(row, dict):
        raise FormatError(f"cannot detect the format of a {type(row).__name__}; rows must be JSON objects")
    for fmt in FORMATS:
        if all(key in row for key in _FORMAT_KEYS[fmt]):
            return fmt
    expected = ", ".join(f"{fmt} ({' + '.join(_FORMAT_KEYS[fmt])})" for fmt in FORMATS)
    raise FormatError(f"no format matches a row with keys {sorted(row)}; expected one of {expected}")


def _check_format_name(fmt: str, allow_auto: bool) -> None:
    valid = (("auto",) if allow_auto else ()) + FORMATS
    if fmt not in valid:
        raise ValueError(f"unknown format {fmt!r}; use one of {valid}")


# ---------------------------------------------------------------- normalisation


def num_assistant_turns(conversation: dict) -> int:
    """Assistant messages of a normalised conversation: 1 for a single-turn one (pack.only_single_turn)."""
    return sum(m["role"] == "assistant" for m in conversation["messages"])


def normalise_row(row: dict, fmt: str, source: str) -> dict:
    """Turn one raw row of format ``fmt`` into the conversation dict, or raise RowError.

    ``source`` ("path:row") is copied into the result so any later error can point
    back at the input line.
    """
    _check_format_name(fmt, allow_auto=False)
    if not isinstance(row, dict):
        raise RowError("missing_field", f"row is a JSON {type(row).__name__}, not an object with {fmt} keys")
    extract, role_map = _EXTRACTORS[fmt]
    turns, tools = extract(row)
    messages = _validate_turns(turns, role_map)
    return {"messages": messages, "tools": tools, "source": source, "topic": row_topic(row)}


def row_topic(row: dict) -> str:
    """The row's ``topic`` field if it is a string, else "" (absent, null or another type: no topic)."""
    topic = row.get("topic")
    return topic if isinstance(topic, str) else ""


def _validate_turns(turns: list[Turn], role_map: dict[str, str]) -> list[dict]:
    """Apply the value checks (roles, emptiness, assistant turns) in precedence order."""
    for where, role, _ in turns:
        if not (isinstance(role, str) and role in role_map):
            raise RowError("unknown_role", f"{where} has role {role!r}; use one of {sorted(role_map)}")
    for where, _, text in turns:
        if not text.strip():
            raise RowError("empty_content", f"{where} is empty or whitespace only")
    messages = [{"role": role_map[role], "content": text} for _, role, text in turns]
    if not any(message["role"] == "assistant" for message in messages):
        raise RowError("no_assistant_turn", "the conversation has no assistant turn to train on")
    if messages[-1]["role"] != "assistant":
        raise RowError(
            "last_turn_not_assistant",
            f"the last turn is from {turns[-1][1]!r}; drop trailing turns the model does not write",
        )
    return messages


def _require(row: dict, key: str, fmt: str) -> Any:
    if row.get(key) is None:
        raise RowError("missing_field", f"{fmt} rows need key {key!r}; this row has keys {sorted(row)}")
    return row[key]


def _require_turns(row: dict, key: str, fmt: str, role_key: str, content_key: str) -> list[dict]:
    """The list of turn objects under ``key``, each holding ``role_key`` and ``content_key``."""
    turns = _require(row, key, fmt)
    if not isinstance(turns, list):
        raise RowError("missing_field", f"{key!r} must be a list of turns, got a {type(turns).__name__}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError("missing_field", f"{key}[{i}] must be an object, got a {type(turn).__name__}")
        for needed in (role_key, content_key):
            if turn.get(needed) is None:
                raise RowError("missing_field", f"{key}[{i}] lacks {needed!r}; it has keys {sorted(turn)}")
    return turns


def _text(value: Any, where: str) -> str:
    """A string, or a list of text parts joined by newlines; RowError otherwise."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(_is_text_part(part) for part in value):
        # Newline-joined like vLLM does, so adjacent parts do not fuse words.
        return "\n".join(part["text"] for part in value)
    raise RowError(
        "non_string_content",
        f"{where} is a {type(value).__name__}; use a string or a list of {{'type': 'text', 'text': ...}} parts",
    )


def _is_text_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)


def _tools_text(value: Any) -> str | None:
    """The tool schema as text, None when the row declares no tools."""
    if isinstance(value, (list, dict)):
        value = json.dumps(value, ensure_ascii=False)
    if value is not None and not isinstance(value, str):
        raise RowError("non_string_content", f"'tools' is a {type(value).__name__}; use a JSON string, list or object")
    if value is None or value.strip() in _NO_TOOLS:
        return None
    return value


def _system_turns(row: dict) -> list[Turn]:
    """The row-level ``system`` prompt as a turn; blank means no system prompt, not an empty turn."""
    system = row.get("system")
    if system is None or (isinstance(system, str) and not system.strip()):
        return []
    return [("system", "system", _text(system, "system"))]


def _extract_messages(row: dict) -> tuple[list[Turn], str | None]:
    turns = _require_turns(row, "messages", "messages", "role", "content")
    texts = [_text(turn["content"], f"messages[{i}].content") for i, turn in enumerate(turns)]
    tools = _tools_text(row.get("tools"))
    return [(f"messages[{i}]", turn["role"], text) for i, (turn, text) in enumerate(zip(turns, texts))], tools


def _extract_sharegpt(row: dict) -> tuple[list[Turn], str | None]:
    turns = _require_turns(row, "conversations", "sharegpt", "from", "value")
    system = _system_turns(row)
    texts = [_text(turn["value"], f"conversations[{i}].value") for i, turn in enumerate(turns)]
    tools = _tools_text(row.get("tools"))
    body = [(f"conversations[{i}]", turn["from"], text) for i, (turn, text) in enumerate(zip(turns, texts))]
    return system + body, tools


def _require_history(row: dict) -> list:
    history = row.get("history")
    if history is None:
        return []
    if not isinstance(history, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in history):
        raise RowError("missing_field", "'history' must be a list of [query, response] pairs")
    return history


def _extract_alpaca(row: dict) -> tuple[list[Turn], str | None]:
    instruction = _require(row, "instruction", "alpaca")
    output = _require(row, "output", "alpaca")
    history = _require_history(row)
    system = _system_turns(row)
    instruction = _text(instruction, "instruction")
    extra = row.get("input")
    extra = "" if extra is None else _text(extra, "input")
    output = _text(output, "output")
    past = []
    for i, (query, response) in enumerate(history):
        past.append((f"history[{i}][0]", "user", _text(query, f"history[{i}][0]")))
        past.append((f"history[{i}][1]", "assistant", _text(response, f"history[{i}][1]")))
    if not instruction.strip():
        # Checked here because joining with a non-empty input would hide it.
        raise RowError("empty_content", "instruction is empty or whitespace only")
    prompt = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    return system + past + [("instruction", "user", prompt), ("output", "assistant", output)], None


_EXTRACTORS: dict[str, tuple[Callable[[dict], tuple[list[Turn], str | None]], dict[str, str]]] = {
    "messages": (_extract_messages, _MESSAGES_ROLES),
    "sharegpt": (_extract_sharegpt, _SHAREGPT_ROLES),
    "alpaca": (_extract_alpaca, _MESSAGES_ROLES),
}


# ---------------------------------------------------------------- reading files


def iter_raw_rows(path: str) -> Iterator[tuple[int, dict | RowError]]:
    """Yield (1-based row number, parsed row or RowError) for a .json, .jsonl or .parquet file.

    JSONL row numbers are line numbers (blank lines are skipped but counted), so an
    error points at the line to fix. A .json file whose first non-space character is
    not '[' is read as JSONL.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise FormatError(f"{path}: unsupported extension {ext!r}; use one of {EXTENSIONS}")
    try:
        if ext == ".parquet":
            yield from _iter_parquet(path)
        elif ext == ".jsonl" or _first_char(path) != "[":
            yield from _iter_jsonl(path, is_json_ext=ext == ".json")
        else:
            yield from _iter_json_array(path)
    except OSError as err:
        raise FormatError(f"{path}: cannot read the file ({err})") from err


def _first_char(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return head[:1]


def _iter_jsonl(path: str, is_json_ext: bool) -> Iterator[tuple[int, dict | RowError]]:
    with open(path, "rb") as f:
        for line_num, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                # Bytes go straight to json.loads so a bad encoding on one line
                # rejects that line only, and a UTF-8 BOM is accepted.
                value = json.loads(line)
            except ValueError as err:
                if is_json_ext and line_num == 1:
                    _raise_if_single_object(path)
                yield line_num, RowError("unparseable_json", f"line {line_num} is not valid JSON ({err})")
                continue
            yield line_num, _as_row(value, line_num)


def _raise_if_single_object(path: str) -> None:
    """A .json holding one multi-line object is a wrapper, not JSONL; say so once, not per line."""
    try:
        with open(path, "rb") as f:
            value = json.load(f)
    except ValueError:
        return
    what = f"object with keys {sorted(value)}" if isinstance(value, dict) else type(value).__name__
    raise FormatError(
        f"{path}: holds a single multi-line JSON {what}, not rows; "
        "write a JSON array of rows or one row per line (JSONL)"
    )


def _iter_json_array(path: str) -> Iterator[tuple[int, dict | RowError]]:
    try:
        with open(path, "rb") as f:
            rows = json.load(f)
    except ValueError as err:
        raise FormatError(
            f"{path}: not valid JSON ({err}); fix it, or convert it to JSONL so one bad row "
            "is rejected instead of the whole file"
        ) from err
    for row_num, value in enumerate(rows, start=1):
        yield row_num, _as_row(value, row_num)


def _iter_parquet(path: str) -> Iterator[tuple[int, dict | RowError]]:
    # Imported here so JSON-only users and workers do not pay for pyarrow.parquet.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        row_num = 0
        for batch in batches:
            for value in batch.to_pylist():
                row_num += 1
                yield row_num, _as_row(value, row_num)
    except pa.ArrowException as err:
        raise FormatError(f"{path}: cannot read as Parquet ({err})") from err


def _as_row(value: Any, row_num: int) -> dict | RowError:
    if isinstance(value, dict):
        return value
    return RowError("missing_field", f"row {row_num} is a JSON {type(value).__name__}, not an object")


# ---------------------------------------------------------------- loading


def load_conversations(paths: Iterable[str], fmt: str = "auto", strict: bool = False) -> LoadResult:
    """Read every file and normalise every row; bad rows are counted, never dropped silently.

    ``fmt="auto"`` detects the format of each file from its first JSON object, so
    files of different formats can be mixed. With ``strict=True`` the first bad row
    raises FormatError naming "path:row" and the reason. A file whose format cannot
    be detected always raises, since every row of it would be rejected.
    """
    _check_format_name(fmt, allow_auto=True)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(path) for path in paths]
    if not paths:
        raise ValueError("no input files given; pass at least one .json, .jsonl or .parquet path")
    result = LoadResult()
    for path in paths:
        _load_file(path, fmt, strict, result)
    assert result.num_input_rows == len(result.conversations) + len(result.rejected)
    return result


def _load_file(path: str, fmt: str, strict: bool, result: LoadResult) -> None:
    file_fmt = None if fmt == "auto" else fmt
    for row_num, row in iter_raw_rows(path):
        result.num_input_rows += 1
        try:
            if isinstance(row, RowError):
                raise row
            if file_fmt is None:
                file_fmt = _detect_file_format(row, path, row_num)
            result.conversations.append(normalise_row(row, file_fmt, f"{path}:{row_num}"))
        except RowError as err:
            if strict:
                raise FormatError(f"{path}:{row_num}: {err.reason}: {err.detail}") from err
            result.reject(path, row_num, err)


def _detect_file_format(row: dict, path: str, row_num: int) -> str:
    try:
        return detect_format(row)
    except FormatError as err:
        raise FormatError(f"{path}:{row_num}: {err}; or pass the format explicitly (fmt=...)") from err
