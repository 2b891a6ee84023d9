"""Tests for raypack.data.formats: golden rows, rejection reasons, strict mode, Parquet.

Run: .venv/bin/pytest tests/test_formats.py -q
"""

import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypack.data.formats import (
    FORMATS,
    REJECT_REASONS,
    FormatError,
    RowError,
    detect_format,
    iter_raw_rows,
    load_conversations,
    normalise_row,
)

FIXTURES = Path(__file__).parent / "fixtures"
REAL_DATA = Path("/work/shared/data")


def _write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _check_counts(result):
    assert result.num_input_rows == len(result.conversations) + len(result.rejected)
    assert sum(result.rejected_reasons.values()) == len(result.rejected)


def _row_reason(row, fmt="sharegpt"):
    with pytest.raises(RowError) as info:
        normalise_row(row, fmt, "x:1")
    return info.value.reason


# ---------------------------------------------------------------- golden rows


def test_alpaca_golden():
    path = str(FIXTURES / "alpaca_small.json")
    result = load_conversations([path])
    _check_counts(result)
    assert len(result.conversations) == 20 and not result.rejected
    assert result.conversations[1] == {
        "messages": [
            {"role": "user", "content": "Transform the following sentence using a synonym: The car sped quickly."},
            {"role": "assistant", "content": "The car accelerated rapidly."},
        ],
        "tools": None,
        "source": f"{path}:2",
        "topic": "",
    }
    # Row 6 has a non-empty input, joined after the instruction by a blank line.
    user = result.conversations[5]["messages"][0]
    assert user == {
        "role": "user",
        "content": "Given the parameters of a triangle, find out its perimeter.\n\nSide 1 = 4\nSide 2 = 6\nSide 3 = 8",
    }


def test_glaive_toolcall_golden():
    path = str(FIXTURES / "glaive_toolcall_small.json")
    result = load_conversations([path])
    _check_counts(result)
    assert len(result.conversations) == 20 and not result.rejected
    conv = result.conversations[10]
    assert conv["source"] == f"{path}:11"
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "tool", "assistant"]
    # function_call is what the model emits, so it is an assistant turn.
    assert conv["messages"][1]["content"] == (
        '{"name": "get_news", "arguments": {"topics": ["technology", "sports"], "location": "New York"}}'
    )
    assert conv["messages"][2]["content"].startswith('{"news": [{"title": "Tech Giants Invest in New York"')
    assert json.loads(conv["tools"])[0]["name"] == "get_news"
    # Row 2 declares tools "[]": no tools, so None rather than an empty schema.
    assert result.conversations[1]["tools"] is None


def test_sharegpt_golden():
    path = str(FIXTURES / "sharegpt_small.json")
    result = load_conversations([path])
    _check_counts(result)
    assert len(result.conversations) == 20
    assert result.conversations[0] == {
        "messages": [
            {"role": "user", "content": "Who are you?"},
            {
                "role": "assistant",
                "content": "I am Vicuna, a language model trained by researchers from "
                "Large Model Systems Organization (LMSYS).",
            },
            {"role": "user", "content": "Have a nice day!"},
            {"role": "assistant", "content": "You too!"},
        ],
        "tools": None,
        "source": f"{path}:1",
        "topic": "",
    }


def test_mixed_formats_detected_per_file():
    names = ("alpaca_small.json", "glaive_toolcall_small.json", "sharegpt_small.json")
    paths = [str(FIXTURES / name) for name in names]
    result = load_conversations(paths)
    _check_counts(result)
    assert len(result.conversations) == 60
    assert [c["source"] for c in result.conversations[19:21]] == [f"{paths[0]}:20", f"{paths[1]}:1"]


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"{REAL_DATA} not present (real demo files are dev-only)")
def test_full_real_files_load():
    expected = {
        "alpaca_en_demo.json": 999,
        "glaive_toolcall_en_demo.json": 300,
        "sharegpt_dummy_conversation.json": 500,
    }
    for name, num_rows in expected.items():
        result = load_conversations([str(REAL_DATA / name)])
        _check_counts(result)
        assert (result.num_input_rows, len(result.conversations), result.rejected) == (num_rows, num_rows, [])
        if name.startswith("glaive"):
            # 109 glaive rows declare tools "[]" and never call one.
            assert sum(c["tools"] is None for c in result.conversations) == 109


# ---------------------------------------------------------------- rejections


BAD_ROWS_EXPECTED = [
    (3, "unparseable_json"),
    (4, "unknown_role"),
    (5, "empty_content"),
    (6, "no_assistant_turn"),
    (7, "last_turn_not_assistant"),
    (8, "non_string_content"),
    (9, "missing_field"),
    (10, "missing_field"),
]


def test_bad_rows_rejected_with_reason_and_line():
    path = str(FIXTURES / "bad_rows.jsonl")
    result = load_conversations([path])
    _check_counts(result)
    assert [(r["row"], r["reason"]) for r in result.rejected] == BAD_ROWS_EXPECTED
    assert all(r["source"] == path and r["detail"] for r in result.rejected)
    # Line 2 is blank: skipped, but line numbers still match the file.
    assert [c["source"] for c in result.conversations] == [f"{path}:1", f"{path}:11"]
    assert result.conversations[1]["messages"][0] == {"role": "system", "content": "Answer briefly."}
    assert result.num_input_rows == 10
    assert result.rejected_reasons == {
        "unparseable_json": 1,
        "missing_field": 2,
        "unknown_role": 1,
        "empty_content": 1,
        "no_assistant_turn": 1,
        "last_turn_not_assistant": 1,
        "non_string_content": 1,
    }
    assert set(result.rejected_reasons) == set(REJECT_REASONS)


def test_strict_raises_with_path_row_and_reason():
    path = str(FIXTURES / "bad_rows.jsonl")
    with pytest.raises(FormatError, match=rf"{path}:3: unparseable_json"):
        load_conversations([path], strict=True)


def test_iter_raw_rows_numbers_lines():
    rows = list(iter_raw_rows(str(FIXTURES / "bad_rows.jsonl")))
    assert [n for n, _ in rows] == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert isinstance(rows[1][1], RowError) and rows[1][1].reason == "unparseable_json"


def test_precedence_is_fixed_not_positional():
    # Unknown role in turn 0 and non-string content in turn 1: the type fault wins.
    row = {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": 5}]}
    assert _row_reason(row) == "non_string_content"
    # A missing key anywhere beats everything else.
    row = {"conversations": [{"from": "narrator", "value": ""}, {"from": "gpt"}]}
    assert _row_reason(row) == "missing_field"
    # An unknown role beats empty content.
    row = {"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": ""}]}
    assert _row_reason(row) == "unknown_role"
    # Empty content beats the shape of the conversation.
    row = {"conversations": [{"from": "human", "value": " "}]}
    assert _row_reason(row) == "empty_content"


def test_alpaca_rejections_and_history():
    assert _row_reason({"instruction": "", "input": "ctx", "output": "y"}, "alpaca") == "empty_content"
    assert _row_reason({"instruction": "x", "output": " "}, "alpaca") == "empty_content"
    assert _row_reason({"instruction": "x"}, "alpaca") == "missing_field"
    assert _row_reason({"instruction": "x", "output": ["a", "b"]}, "alpaca") == "non_string_content"
    assert _row_reason({"instruction": "x", "output": "y", "history": [["q"]]}, "alpaca") == "missing_field"
    row = {
        "instruction": "Now?",
        "input": None,
        "output": "Yes.",
        "system": "Be brief.",
        "history": [["Ready?", "Almost."]],
    }
    assert normalise_row(row, "alpaca", "a.json:1")["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Ready?"},
        {"role": "assistant", "content": "Almost."},
        {"role": "user", "content": "Now?"},
        {"role": "assistant", "content": "Yes."},
    ]


def test_row_error_pickles_for_ray_workers():
    err = pickle.loads(pickle.dumps(RowError("empty_content", "turn 2 is blank")))
    assert (err.reason, err.detail, str(err)) == ("empty_content", "turn 2 is blank", "empty_content: turn 2 is blank")


# ---------------------------------------------------------------- messages, parquet, options


MESSAGES_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "text", "text": "2 + 2?"}]},
            {"role": "assistant", "content": "4"},
        ],
        "tools": [{"name": "calc"}],
    },
    {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "image_url", "image_url": "x"}]},
        ]
    },
]


def test_messages_text_parts_and_tools(tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", MESSAGES_ROWS)
    result = load_conversations([path])
    _check_counts(result)
    assert result.conversations[0]["messages"][1] == {"role": "user", "content": "Look:\n2 + 2?"}
    assert result.conversations[0]["tools"] == '[{"name": "calc"}]'
    assert [(r["row"], r["reason"]) for r in result.rejected] == [(2, "non_string_content")]


def test_json_file_holding_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "chat.json", MESSAGES_ROWS[:1])
    assert len(load_conversations([path]).conversations) == 1


def test_json_wrapper_object_is_a_file_error(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": MESSAGES_ROWS}, indent=2))
    with pytest.raises(FormatError, match=r"single multi-line JSON object with keys \['data'\]"):
        load_conversations([str(path)])


def test_broken_json_array_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "x", "output": "y"},')
    with pytest.raises(FormatError, match="broken.json: not valid JSON"):
        load_conversations([str(path)])


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "chat.parquet"
    rows = [
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "r"},
            ],
            "tools": '[{"name": "calc"}]',
        },
        # No tools key: Arrow fills it with null, which must read as "no tools".
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = load_conversations([str(path)])
    _check_counts(result)
    assert not result.rejected
    assert result.conversations[1] == {
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        "tools": None,
        "source": f"{path}:2",
        "topic": "",
    }
    # The output type itself survives Arrow, as it must through Ray Data.
    assert pa.Table.from_pylist(result.conversations).to_pylist() == result.conversations


def test_forced_format_rejects_rows_of_another_format():
    path = str(FIXTURES / "alpaca_small.json")
    result = load_conversations([path], fmt="sharegpt")
    _check_counts(result)
    assert result.rejected_reasons["missing_field"] == 20
    assert "'conversations'" in result.rejected[0]["detail"]


def test_detection_failure_lists_formats_and_keys(tmp_path):
    with pytest.raises(FormatError) as info:
        detect_format({"prompt": "a", "completion": "b"})
    message = str(info.value)
    assert all(fmt in message for fmt in FORMATS) and "'completion', 'prompt'" in message
    path = _write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(FormatError, match=r"pc.jsonl:1: .*fmt="):
        load_conversations([path])


def test_bad_arguments():
    with pytest.raises(ValueError, match="auto"):
        load_conversations([str(FIXTURES / "alpaca_small.json")], fmt="openai")
    with pytest.raises(ValueError, match="messages"):
        normalise_row({}, "auto", "x:1")
    with pytest.raises(FormatError, match="unsupported extension"):
        load_conversations(["data.csv"])
    with pytest.raises(FormatError, match="cannot read"):
        load_conversations(["/nonexistent/data.jsonl"])


def test_topic_is_carried_in_every_format_and_never_rejects(tmp_path):
    """A row's string `topic` field becomes the conversation's topic (what pack.group_backend=topic groups by);
    absent, null or not a string is "" (no topic), and the row is still kept."""
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rows = [{"messages": turns, "topic": "owl"}, {"messages": turns}, {"messages": turns, "topic": None},
            {"messages": turns, "topic": 7}, {"messages": turns, "topic": ["owl"]}]
    result = load_conversations([_write_jsonl(tmp_path / "t.jsonl", rows)])
    assert not result.rejected
    assert [c["topic"] for c in result.conversations] == ["owl", "", "", "", ""]
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "topic": "cat"}
    alpaca = {"instruction": "q", "output": "a", "topic": "dog"}
    assert normalise_row(sharegpt, "sharegpt", "x:1")["topic"] == "cat"
    assert normalise_row(alpaca, "alpaca", "x:1")["topic"] == "dog"
