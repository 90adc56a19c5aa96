"""The one tool-call format: parsing Hermes ``<tool_call>`` blocks, and never raising on bad ones."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from weather_tool import CALL_BLOCK

from rltrain.gateway.tool_calls import ToolCall, format_tool_call, parse_tool_calls


def test_one_block_becomes_one_openai_tool_call() -> None:
    parsed = parse_tool_calls(CALL_BLOCK, allowed_names={"get_weather"})
    assert parsed.error is None
    assert parsed.content is None
    [call] = parsed.tool_calls
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    openai_shape = call.to_openai()
    assert openai_shape["type"] == "function"
    assert openai_shape["id"].startswith("call_")
    assert openai_shape["function"] == {"name": "get_weather", "arguments": call.arguments}


def test_several_blocks_and_surrounding_text() -> None:
    text = f'Let me check.\n{CALL_BLOCK}\n<tool_call>{{"name": "get_time", "arguments": {{}}}}</tool_call>'
    parsed = parse_tool_calls(text, allowed_names={"get_weather", "get_time"})
    assert parsed.error is None
    assert [call.name for call in parsed.tool_calls] == ["get_weather", "get_time"]
    assert parsed.content == "Let me check."
    assert len({call.id for call in parsed.tool_calls}) == 2


def test_text_without_blocks_is_plain_content() -> None:
    parsed = parse_tool_calls("The weather is fine.", allowed_names={"get_weather"})
    assert parsed == parse_tool_calls("The weather is fine.")
    assert (parsed.content, parsed.tool_calls, parsed.error) == ("The weather is fine.", [], None)


def test_missing_arguments_mean_no_arguments() -> None:
    [call] = parse_tool_calls('<tool_call>{"name": "list_rooms"}</tool_call>').tool_calls
    assert json.loads(call.arguments) == {}


def test_non_ascii_arguments_survive() -> None:
    [call] = parse_tool_calls(format_tool_call("book", {"room": "Salle Été", "note": "日本"})).tool_calls
    assert json.loads(call.arguments) == {"room": "Salle Été", "note": "日本"}


def _assert_kept_as_text(text: str, expected_error: str, allowed: set[str] | None = None) -> None:
    parsed = parse_tool_calls(text, allowed_names=allowed)
    assert parsed.tool_calls == []
    assert parsed.content == text
    assert parsed.error is not None and expected_error in parsed.error


def test_bad_json_is_kept_as_text_with_an_error() -> None:
    _assert_kept_as_text(
        '<tool_call>{"name": "get_weather", "arguments": {"city": }</tool_call>', "invalid JSON"
    )


def test_missing_name_is_an_error() -> None:
    _assert_kept_as_text('<tool_call>{"arguments": {}}</tool_call>', '"name" must be a non-empty string')


def test_arguments_must_be_an_object() -> None:
    _assert_kept_as_text('<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>', "\"arguments\" of 'f'")
    _assert_kept_as_text('<tool_call>{"name": "f", "arguments": "{}"}</tool_call>', "must be a JSON object")


def test_block_that_is_not_an_object() -> None:
    _assert_kept_as_text("<tool_call>[1]</tool_call>", "expected a JSON object")


def test_unknown_tool_name_is_an_error() -> None:
    _assert_kept_as_text(CALL_BLOCK, "unknown tool 'get_weather'", allowed={"get_time"})


def test_unclosed_block_is_an_error() -> None:
    _assert_kept_as_text('<tool_call>{"name": "get_weather", "arguments": {"ci', "not closed")


def test_one_bad_block_keeps_all_as_text() -> None:
    """All or nothing: a half-executed plan would be worse than a visible error."""
    text = CALL_BLOCK + '<tool_call>{"name": 3}</tool_call>'
    _assert_kept_as_text(text, "tool call 2:", allowed={"get_weather"})


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(
    name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True),
    arguments=st.dictionaries(st.text(max_size=8), _json_values, max_size=4),
)
def test_format_then_parse_round_trips(name: str, arguments: dict) -> None:
    parsed = parse_tool_calls(format_tool_call(name, arguments), allowed_names={name})
    assert parsed.error is None
    assert [(call.name, json.loads(call.arguments)) for call in parsed.tool_calls] == [(name, arguments)]


def test_tool_call_ids_are_unique() -> None:
    assert len({ToolCall(name="f", arguments="{}").id for _ in range(100)}) == 100
