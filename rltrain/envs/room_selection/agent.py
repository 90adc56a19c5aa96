"""The room-selection agents: plain OpenAI-client programs, each an ``@rollout`` ``(task, resources) -> reward``.

Modes:
- ``tool``: the seed's agent. The model calls ``get_rooms_and_availability`` (OpenAI tools), sees the
  result, and answers ``final_choice: <room>``; up to ``max_turns`` chat calls.
- ``inline``: one chat call whose prompt already holds every room's checks (see :mod:`.prompts`). When the
  resources carry a non-empty ``answer_prefix`` template, it is sent as the start of the assistant's answer
  with ``continue_final_message`` (vLLM's extension, which the gateway also implements) and the model only
  writes the rest; an empty or absent ``answer_prefix`` makes it a plain chat call.
- ``teacher``: the ``inline`` agent's exact request, with the solver's answer sent as the reply
  (``rltrain_completion``): the gateway tokenises it as if the model had written it, so a teacher rollout is a
  demonstration recorded like any inline rollout (the warm start trains on it). It goes through the gateway,
  so it needs the serving stack, but never samples.
- ``tool_teacher``: the ``tool`` agent's exact conversation with every reply given (``rltrain_completion``): the
  tool call as the model should write it (the gateway's tool-call format, which the gateway parses back into
  ``tool_calls``), then, after the real tool result, the solver's answer. With ``tools=`` on every call the
  gateway extends one token sequence, so a demonstration is one row whose tool result tokens are masked, and
  the warm start trains both assistant turns.
- ``solver``: answers with the solver and calls no model: the reference agent, 1.0 on any correctly labelled
  task set, which checks the runner, store and grader end to end.

How the inline prompt and the ``checks`` tool write the rooms (``room_lines``: ``full``, ``brief`` or
``verdict_first``, see :mod:`.prompts`) is fixed per agent by :func:`make_agent`; the teacher of an agent must be
made with the same setting.

Which catalog: an agent is made for one catalog by :func:`make_agent` (the environment passes its own), and
a task whose payload carries a ``catalog`` (generated sets with ``catalogs=``) or names a ``catalog_path`` is
answered against that one instead: its prompt, its tool results and the parsing of its answer all use that
catalog's rooms. Nothing is configured globally, so agents for different catalogs run side by side in one
process. The module-level ``room_selector_*`` agents use the reference catalog.

Every agent grades its answer with :func:`.solver.grade`, records a ``grade`` log span (choice, expected,
correct, parseable, and ``answer``: what the answer-distribution diagnostics read), emits the reward and
returns it. ``answer`` is the choice, except for a task carrying its own catalog, where room names differ from
task to task and say nothing in a distribution: there it is the chosen room's place in its catalog
(``room #1`` is the first listed) or ``No Room``, which shows a policy that always takes the first room.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from openai import OpenAI
from pydantic import ValidationError

from rltrain.agent import Agent, current_context, emit_reward, rollout
from rltrain.envs.room_selection.catalog import Catalog, CatalogError, load_catalog, reference_catalog_path
from rltrain.envs.room_selection.prompts import (
    ANSWER_STYLES,
    ROOM_LINES,
    AnswerStyle,
    RoomLines,
    prompt_values,
    teacher_answer,
)
from rltrain.envs.room_selection.schema import describe_validation_error
from rltrain.envs.room_selection.solver import grade, solve
from rltrain.envs.room_selection.tasks import RoomRequest, request_of
from rltrain.envs.room_selection.tools import (
    TOOL_CONTENTS,
    TOOL_NAME,
    TOOL_RESULTS,
    ToolContent,
    ToolResult,
    execute_tool_call,
    query_model,
    tool_definitions,
    tool_message_content,
)
from rltrain.types import LLMResource, PromptTemplate, Resources, SpanKind

logger = logging.getLogger(__name__)

AGENT_MODES = ("tool", "inline", "teacher", "tool_teacher", "solver")
DEFAULT_MAX_TURNS = 4
GRADE_SPAN = "grade"
CONTINUE_ANSWER = {"continue_final_message": True, "add_generation_prompt": False}
"""``extra_body`` that makes the server continue the last (assistant) message instead of starting a new turn;
vLLM rejects ``continue_final_message`` unless ``add_generation_prompt`` is turned off with it."""

Answerer = Callable[[RoomRequest, Resources, Catalog], str]


@functools.lru_cache(maxsize=16)
def _catalog_at(path: str) -> Catalog:
    return load_catalog(path)


@functools.lru_cache(maxsize=1024)
def _catalog_of_json(text: str) -> Catalog:
    return Catalog.model_validate_json(text)


def catalog_for(task: dict[str, Any], bound: Catalog | None) -> Catalog:
    """The task's own ``catalog`` if it carries one, else the file its ``catalog_path`` names, else the agent's
    catalog, else the reference one. A carried catalog is validated once per process and content."""
    if task.get("catalog") is not None:
        try:
            return _catalog_of_json(json.dumps(task["catalog"], sort_keys=True))
        except ValidationError as exc:
            raise CatalogError(f"task {task.get('id')!r}: catalog: {describe_validation_error(exc)}") from exc
    if task.get("catalog_path"):
        return _catalog_at(str(Path(task["catalog_path"]).resolve()))
    return bound if bound is not None else _catalog_at(str(reference_catalog_path()))


def _template(resources: Resources, name: str, mode: str) -> PromptTemplate:
    try:
        return resources.prompts[name]
    except KeyError:
        raise KeyError(
            f"the {mode} agent needs a prompt template named {name!r} in resources.prompts, which has "
            f"{sorted(resources.prompts)}; start from the environment's default_prompts({mode!r})"
        ) from None


def _sampling(llm: LLMResource) -> dict[str, Any]:
    """The chat-call keyword arguments for the lent sampling parameters (``seed`` only when set)."""
    params = llm.sampling
    kwargs: dict[str, Any] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
    }
    if params.seed is not None:
        kwargs["seed"] = params.seed
    return kwargs


def _opening_messages(
    mode: str, request: RoomRequest, resources: Resources, catalog: Catalog, room_lines: RoomLines = "full"
) -> list[dict[str, Any]]:
    values = prompt_values(mode, request, catalog, room_lines)
    return [
        {"role": "system", "content": _template(resources, "system", mode).format(**values)},
        {"role": "user", "content": _template(resources, "user", mode).format(**values)},
    ]


def _name_and_arguments(call: Any) -> tuple[str, str]:
    """Name and argument string of a tool call, function or custom (whose free-text input is taken as the
    arguments, and then fails validation unless it is the JSON object the function expects)."""
    if call.type == "function":
        return call.function.name, call.function.arguments
    return call.custom.name, call.custom.input


def _answer_with_tools(
    request: RoomRequest,
    resources: Resources,
    catalog: Catalog,
    max_turns: int,
    *,
    teacher: bool = False,
    tool_result: ToolResult = "full",
    room_lines: RoomLines = "full",
    answer_style: AnswerStyle = "choice",
    tool_content: ToolContent = "json",
) -> str:
    """Chat with tools until the model answers without calling one (or ``max_turns`` calls are spent).

    As the ``teacher``, every reply is given instead of sampled (:func:`_teacher_replies`); the conversation,
    tools and tool execution are the same, so the demonstration is what the policy's own rollout looks like."""
    messages = _opening_messages("tool", request, resources, catalog)
    given = iter(_teacher_replies(request, catalog, tool_result, answer_style)) if teacher else None
    tools = tool_definitions(tool_result)
    with OpenAI(base_url=resources.llm.base_url, api_key=resources.llm.api_key) as client:
        for _ in range(max_turns):
            reply = next(given, None) if given is not None else None
            response = client.chat.completions.create(
                model=resources.llm.model,
                messages=messages,  # type: ignore[arg-type]
                tools=tools,  # type: ignore[arg-type]
                tool_choice="auto",
                **_sampling(resources.llm),
                extra_body={"rltrain_completion": reply} if reply is not None else None,
            )
            message = response.choices[0].message
            if not message.tool_calls:
                return message.content or ""
            calls = [_name_and_arguments(call) for call in message.tool_calls]
            messages.append(
                {
                    "role": "assistant",
                    "content": message.content,
                    "tool_calls": [
                        {
                            "id": call.id,
                            "type": "function",
                            "function": {"name": name, "arguments": arguments},
                        }
                        for call, (name, arguments) in zip(message.tool_calls, calls, strict=True)
                    ],
                }
            )
            for call, (name, arguments) in zip(message.tool_calls, calls, strict=True):
                result = execute_tool_call(name, arguments, catalog, tool_result, room_lines)
                messages.append({"role": "tool", "tool_call_id": call.id,
                                 "content": tool_message_content(result, tool_content)})
    logger.debug("tool agent used all %d turns without a final answer", max_turns)
    return message.content or ""


def _teacher_replies(
    request: RoomRequest, catalog: Catalog, tool_result: ToolResult = "full", answer_style: AnswerStyle = "choice"
) -> list[str]:
    """The tool teacher's two replies: the tool call for the request's slot (the whole request for the
    ``checks`` tool), written in the gateway's tool-call format (the one the model is asked for, natively or
    through the fallback prompt), then the answer in ``answer_style``."""
    # Imported here: the format lives with the gateway's parser, whose package pulls in the HTTP server.
    from rltrain.gateway.tool_calls import format_tool_call

    query = request.model_dump(include=set(query_model(tool_result).model_fields))
    return [format_tool_call(TOOL_NAME, query), teacher_answer(request, catalog, answer_style)]


def _inline_request(
    request: RoomRequest, resources: Resources, catalog: Catalog, room_lines: RoomLines
) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """The inline call: its messages, the answer prefix they end with ("" for none) and the ``extra_body``
    that makes the server continue that prefix (empty without one)."""
    messages = _opening_messages("inline", request, resources, catalog, room_lines)
    prefix_template = resources.prompts.get("answer_prefix")
    prefix = prefix_template.format() if prefix_template is not None else ""
    if not prefix:
        return messages, "", {}
    messages.append({"role": "assistant", "content": prefix})
    return messages, prefix, dict(CONTINUE_ANSWER)


def _answer_inline(
    request: RoomRequest, resources: Resources, catalog: Catalog, *, room_lines: RoomLines = "full"
) -> str:
    """One chat call; with an answer prefix, the model continues it and the answer is prefix + continuation."""
    messages, prefix, extra_body = _inline_request(request, resources, catalog, room_lines)
    with OpenAI(base_url=resources.llm.base_url, api_key=resources.llm.api_key) as client:
        response = client.chat.completions.create(
            model=resources.llm.model,
            messages=messages,  # type: ignore[arg-type]
            **_sampling(resources.llm),
            extra_body=extra_body,
        )
    return prefix + (response.choices[0].message.content or "")


def _answer_as_teacher(
    request: RoomRequest,
    resources: Resources,
    catalog: Catalog,
    *,
    room_lines: RoomLines = "full",
    answer_style: AnswerStyle = "choice",
) -> str:
    """The inline call with the solver's answer (in ``answer_style``) as the given reply: after the default
    prefix ``final_choice:`` the reply is `` Lyra``, so prefix + reply reads ``final_choice: Lyra``, as the
    student should write it. After another prefix the reply is the room alone (``choice``) or the whole
    answer on the next line (``passing``)."""
    messages, prefix, extra_body = _inline_request(request, resources, catalog, room_lines)
    answer = teacher_answer(request, catalog, answer_style)
    if answer.startswith(prefix):
        reply = answer[len(prefix):]
    else:
        reply = f" {solve(request, catalog)}" if answer_style == "choice" else f"\n{answer}"
    with OpenAI(base_url=resources.llm.base_url, api_key=resources.llm.api_key) as client:
        response = client.chat.completions.create(
            model=resources.llm.model,
            messages=messages,  # type: ignore[arg-type]
            **_sampling(resources.llm),
            extra_body={**extra_body, "rltrain_completion": reply},
        )
    return prefix + (response.choices[0].message.content or "")


def _answer_with_solver(request: RoomRequest, resources: Resources, catalog: Catalog) -> str:
    return f"final_choice: {solve(request, catalog)}"


def answer_label(choice: str | None, catalog: Catalog, own_catalog: bool) -> str | None:
    """What the answer distribution counts: the choice, or for a task with its own catalog the chosen room's
    place in that catalog (``room #1``, ...) or ``No Room``."""
    if not own_catalog or choice not in catalog.room_ids:  # None, No Room
        return choice
    return f"room #{catalog.room_ids.index(choice) + 1}"


def record_grade(answer_text: str, expected: str, catalog: Catalog, own_catalog: bool = False) -> float:
    """Grade an answer, record the ``grade`` span (inside a rollout), emit and return the reward."""
    start = time.time()
    result = grade(answer_text, expected, catalog.room_ids)
    ctx = current_context()
    if ctx is not None:
        ctx.record(
            SpanKind.LOG,
            GRADE_SPAN,
            start,
            {
                "choice": result.choice,
                "expected": result.expected,
                "correct": result.correct,
                "parseable": result.parseable,
                "answer": answer_label(result.choice, catalog, own_catalog),
            },
        )
    emit_reward(result.reward)
    return result.reward


def check_options(room_lines: str, tool_result: str, answer_style: str, tool_content: str) -> None:
    """Refuse an option value the agents cannot use, with a ``ValueError`` naming the option, its value and the
    values it may take (the environment checks them when it is built, before any agent is made)."""
    for option, value, allowed in [("room_lines", room_lines, ROOM_LINES), ("tool_result", tool_result, TOOL_RESULTS),
                                   ("answer_style", answer_style, ANSWER_STYLES),
                                   ("tool_content", tool_content, TOOL_CONTENTS)]:
        if value not in allowed:
            raise ValueError(f"room_selection option {option} must be one of {list(allowed)}, got {value!r}")
    if tool_content == "lines" and tool_result != "checks":
        raise ValueError(f"room_selection option tool_content 'lines' writes the checks tool's verdicts one room a "
                         f"line; tool_result is {tool_result!r} (room records): set tool_result: checks, or "
                         "tool_content: json")


def make_agent(
    mode: str,
    catalog: Catalog | None = None,
    max_turns: int = DEFAULT_MAX_TURNS,
    room_lines: RoomLines = "full",
    tool_result: ToolResult = "full",
    answer_style: AnswerStyle = "choice",
    tool_content: ToolContent = "json",
) -> Agent:
    """The agent of ``mode`` (see :data:`AGENT_MODES`) answering against ``catalog`` (the reference catalog when
    ``None``); ``max_turns`` bounds the chat calls of the tool agents, ``room_lines`` is how the inline prompt
    and the ``checks`` tool write the rooms (``full``, ``brief`` or ``verdict_first``), ``tool_result`` which tool
    the tool agents call (``full``, ``brief`` or ``checks``, see :data:`.tools.TOOL_RESULTS`), ``answer_style``
    how the teachers answer (``choice``, ``passing`` or ``stepwise``, see :data:`.prompts.ANSWER_STYLES`; the
    student is asked for it by the default prompts of the same style), ``tool_content`` how a tool result is
    written into the conversation (``json`` or, for ``checks``, ``lines``: see :data:`.tools.TOOL_CONTENTS`)."""
    if mode not in AGENT_MODES:
        raise ValueError(f"unknown room-selection agent mode {mode!r}; expected one of {list(AGENT_MODES)}")
    if max_turns < 1:
        raise ValueError(f"max_turns must be at least 1, got {max_turns}")
    check_options(room_lines, tool_result, answer_style, tool_content)
    answerers: dict[str, Answerer] = {
        "tool": functools.partial(
            _answer_with_tools, max_turns=max_turns, tool_result=tool_result, room_lines=room_lines,
            tool_content=tool_content,
        ),
        "inline": functools.partial(_answer_inline, room_lines=room_lines),
        "teacher": functools.partial(_answer_as_teacher, room_lines=room_lines, answer_style=answer_style),
        "tool_teacher": functools.partial(
            _answer_with_tools, max_turns=max_turns, teacher=True, tool_result=tool_result,
            room_lines=room_lines, answer_style=answer_style, tool_content=tool_content,
        ),
        "solver": _answer_with_solver,
    }
    answer = answerers[mode]

    def room_selector(task: dict[str, Any], resources: Resources) -> float:
        task_catalog = catalog_for(task, catalog)
        own = task.get("catalog") is not None
        return record_grade(
            answer(request_of(task), resources, task_catalog), task["expected_choice"], task_catalog, own
        )

    return rollout(room_selector, name=f"room_selector_{mode}", needs_llm=mode != "solver")


room_selector_tool = make_agent("tool")
room_selector_inline = make_agent("inline")
room_selector_teacher = make_agent("teacher")
room_selector_tool_teacher = make_agent("tool_teacher")
room_selector_solver = make_agent("solver")
