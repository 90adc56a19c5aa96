"""Chat templating: the fallback tool format for templates without tools (SmolLM2), native templates (Qwen2.5),
raw text of the gateway's own turns, and continuing a final assistant message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trl
import weather_tool
from transformers import AutoTokenizer

from rltrain.gateway.chat_format import ChatFormat, ChatFormatError
from rltrain.gateway.schemas import ChatMessage, ToolSpec
from rltrain.gateway.tool_calls import parse_tool_calls

WEATHER_TOOL = ToolSpec.model_validate(weather_tool.WEATHER_TOOL)
CALL_BLOCK = weather_tool.CALL_BLOCK

#: ChatML, but refusing any role other than system/user/assistant (as many templates do)
STRICT_ROLES_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _messages(*raw: dict[str, Any]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(message) for message in raw]


TOOL_CONVERSATION = _messages(
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
)


@pytest.fixture(scope="module")
def smollm(smollm_tokenizer_dir: Path) -> ChatFormat:
    return ChatFormat(AutoTokenizer.from_pretrained(smollm_tokenizer_dir))


def _format_with_template(tokenizer_dir: Path, template: str) -> ChatFormat:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = template
    return ChatFormat(tokenizer)


def test_smollm_template_gets_the_fallback(smollm: ChatFormat) -> None:
    assert not smollm.native_tools
    assert smollm.tool_role == "tool"
    assert smollm.turn_closing == "<|im_end|>\n"
    assert smollm.end_of_turn_ids == {smollm.tokenizer.eos_token_id}


def test_without_tools_the_template_renders_unchanged(smollm: ChatFormat) -> None:
    messages = _messages({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"})
    expected = smollm.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert smollm.render(messages) == expected


def test_fallback_renders_tools_calls_and_results(smollm: ChatFormat) -> None:
    text = smollm.render(TOOL_CONVERSATION, [WEATHER_TOOL])
    # the tools are listed in a created system message, with the calling convention
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert json.dumps(WEATHER_TOOL.model_dump(exclude_none=True)) in text
    assert "<tool_call></tool_call> XML tags" in text
    # the assistant's call as a block (it has no content, which the bare template cannot render)
    assert f"<|im_start|>assistant\n{CALL_BLOCK}<|im_end|>\n" in text
    # the result as a tool turn
    assert "<|im_start|>tool\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    # what the model is shown is what the parser reads back
    [call] = parse_tool_calls(CALL_BLOCK, allowed_names={"get_weather"}).tool_calls
    assert call.name == "get_weather"


def test_fallback_appends_to_an_existing_system_message(smollm: ChatFormat) -> None:
    messages = _messages(
        {"role": "developer", "content": "You book rooms."}, {"role": "user", "content": "Hi"}
    )
    text = smollm.render(messages, [WEATHER_TOOL])
    assert text.startswith("<|im_start|>system\nYou book rooms.\n\n# Tools\n")
    assert text.count("<|im_start|>system") == 1


def test_assistant_content_and_calls_render_together(smollm: ChatFormat) -> None:
    messages = _messages(
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
    )
    assert f"<|im_start|>assistant\nChecking.\n{CALL_BLOCK}<|im_end|>" in smollm.render(
        messages, [WEATHER_TOOL]
    )


def test_tool_results_become_user_turns_when_the_template_rejects_the_role(
    smollm_tokenizer_dir: Path,
) -> None:
    fmt = _format_with_template(smollm_tokenizer_dir, STRICT_ROLES_TEMPLATE)
    assert not fmt.native_tools
    assert fmt.tool_role == "user"
    text = fmt.render(TOOL_CONVERSATION, [WEATHER_TOOL])
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>\n" in text


def test_qwen25_template_renders_tools_natively(smollm_tokenizer_dir: Path) -> None:
    """Qwen2.5's own template (as TRL ships it) is detected as native, and writes the same blocks."""
    template = Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja"
    fmt = _format_with_template(smollm_tokenizer_dir, template.read_text())
    assert fmt.native_tools
    text = fmt.render(TOOL_CONVERSATION, [WEATHER_TOOL])
    assert '"name": "get_weather"' in text.split("<|im_start|>user")[0]  # tools in Qwen's system prompt
    assert f"<|im_start|>assistant\n{CALL_BLOCK}<|im_end|>" in text
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text


def test_raw_text_replaces_the_gateways_own_messages(smollm: ChatFormat) -> None:
    raw = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    text = smollm.render(TOOL_CONVERSATION, [WEATHER_TOOL], raw_assistant={1: raw})
    assert f"<|im_start|>assistant\n{raw}<|im_end|>\n" in text
    assert CALL_BLOCK not in text.split("<|im_start|>user")[1]


def test_continue_final_message_leaves_the_message_open(smollm: ChatFormat) -> None:
    messages = _messages(
        {"role": "user", "content": "Pick a room"}, {"role": "assistant", "content": "final_choice:"}
    )
    text = smollm.render(messages, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nfinal_choice:")


def test_render_errors_are_chat_format_errors(smollm_tokenizer_dir: Path) -> None:
    """A template that refuses system messages cannot take the fallback's tools prompt: a clear error."""
    no_system = STRICT_ROLES_TEMPLATE.replace("['system', 'user', 'assistant']", "['user', 'assistant']")
    fmt = _format_with_template(smollm_tokenizer_dir, no_system)
    with pytest.raises(ChatFormatError, match="cannot render these messages: Unknown role: system"):
        fmt.render(_messages({"role": "user", "content": "Weather?"}), [WEATHER_TOOL])


def test_rendered_prompt_tokenises_and_decodes_back(smollm: ChatFormat) -> None:
    text = smollm.render(TOOL_CONVERSATION, [WEATHER_TOOL])
    ids = smollm.tokenize(text)
    assert ids[0] == smollm.tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS added on top
    assert smollm.decode(ids, skip_special_tokens=False) == text


def test_repeated_texts_tokenise_to_the_tokenizers_own_ids(smollm: ChatFormat) -> None:
    """The tokenisation cache hands out the tokenizer's exact ids, as a fresh list each time."""
    texts = [
        smollm.render(TOOL_CONVERSATION, [WEATHER_TOOL]),
        smollm.render(TOOL_CONVERSATION[:1]),
        " Paris?",
    ]
    for text in texts * 2:
        expected = list(smollm.tokenizer(text, add_special_tokens=False)["input_ids"])
        ids = smollm.tokenize(text)
        assert ids == expected
        ids.append(-1)  # a caller extending its list must not change the next caller's
    assert smollm.tokenize(texts[0]) == list(
        smollm.tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    )
