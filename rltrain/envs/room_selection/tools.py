"""The agent's one tool, ``get_rooms_and_availability``: its OpenAI schema, argument checking and execution.

Whatever the model writes as a tool call (an unknown tool name, arguments that are not JSON, a missing or
mistyped field) becomes an error message returned to it as the tool result, recorded in the tool span: a
small policy writes broken calls all the time, and that must cost it reward, never crash the rollout.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from rltrain.agent import tool_span
from rltrain.envs.room_selection.catalog import Catalog
from rltrain.envs.room_selection.prompts import RoomLines, brief_verdict, verdict_first
from rltrain.envs.room_selection.schema import Clock, IsoDate, describe_validation_error
from rltrain.envs.room_selection.solver import check_rooms
from rltrain.envs.room_selection.tasks import RoomRequest

TOOL_NAME = "get_rooms_and_availability"

ToolResult = Literal["full", "brief", "checks"]
TOOL_RESULTS: tuple[ToolResult, ...] = ("full", "brief", "checks")
"""What the tool is: ``full`` (the seed's tool) takes the slot and returns the catalog's record of each room
(every booking of every day: ~100 tokens a room) plus ``free``; ``brief`` takes the slot and keeps what the
checks and tie-breaks read (capacity, equipment, accessibility, distance, ``free`` and the number of bookings
on the queried day: ~30 tokens a room). With both the model compares capacities and equipment itself.
``checks`` is a search API: it takes the whole request (slot, ``attendees``, ``needs``,
``accessible_required``) and returns each room's verdict, ``PASSES`` with its tie-break values or ``FAILS``
with the checks it fails (~12 tokens a room, the inline ``brief`` room lines, or ``verdict_first``'s with the
environment's ``room_lines: verdict_first``): the model must copy the request into the call correctly (a wrong
head count gives wrong verdicts) and pick the best passing room."""

ToolContent = Literal["json", "lines"]
TOOL_CONTENTS: tuple[ToolContent, ...] = ("json", "lines")
"""How a tool result is written into the conversation (the ``tool`` message's content): ``json`` (the OpenAI
convention, ``{"rooms": ...}``) or, for the ``checks`` tool only, ``lines``: one room per line, as the inline
prompt writes them (``PASSES: Lyra (slack 2, ...)`` with ``room_lines: verdict_first``, else ``Lyra: PASSES
(...)``), and ``error: ...`` for a refused call. A small model copies the passing rooms out of lines far more
reliably than out of one line of quoted JSON strings (measured on the random-catalog tool ladder after its warm
start: the passing list was right for 75 of 100 unseen-catalog requests in JSON, 92 of 100 in lines)."""


class ToolCallError(ValueError):
    """A tool call the environment cannot execute; its message is what the model is told."""


class AvailabilityQuery(BaseModel):
    """The arguments of ``get_rooms_and_availability`` (also the source of its JSON schema)."""

    model_config = ConfigDict(extra="forbid", strict=True, title=TOOL_NAME)

    date: IsoDate = Field(description="YYYY-MM-DD")
    time: Clock = Field(description="HH:MM 24h local")
    duration_min: PositiveInt = Field(description="Meeting duration minutes")


class SearchQuery(AvailabilityQuery):
    """The arguments of the ``checks`` tool: the slot and the request's requirements."""

    model_config = ConfigDict(extra="forbid", strict=True, title=TOOL_NAME)

    attendees: PositiveInt = Field(description="Number of attendees")
    needs: list[str] = Field(description="Equipment needed, e.g. projector")
    accessible_required: bool = Field(description="Whether the room must be accessible")


def query_model(result: ToolResult) -> type[AvailabilityQuery]:
    """The arguments' model of the tool ``result`` names (its fields are what a call must give)."""
    return SearchQuery if result == "checks" else AvailabilityQuery


def _parameters_schema(result: ToolResult) -> dict[str, Any]:
    """The JSON schema of the tool's arguments without pydantic's titles and docstring, which only lengthen
    what the model reads."""
    schema = query_model(result).model_json_schema()
    properties = {
        name: {key: value for key, value in prop.items() if key != "title"}
        for name, prop in schema["properties"].items()
    }
    return {
        "type": "object",
        "properties": properties,
        "required": schema["required"],
        "additionalProperties": False,
    }


_DESCRIPTIONS: dict[ToolResult, str] = {
    "full": (
        "Return meeting rooms with capacity, equipment, accessibility, distance, booked time slots, "
        "and whether each is free for the given slot."
    ),
    "brief": (
        "Return meeting rooms with capacity, equipment, accessibility, distance, bookings that day, "
        "and whether each is free for the given slot."
    ),
    "checks": (
        "Check every meeting room against a request: PASSES with its capacity slack, extra equipment, "
        "distance and bookings that day, or FAILS with the checks it fails."
    ),
}


def tool_definitions(result: ToolResult = "full") -> list[dict[str, Any]]:
    """The ``tools=`` argument of the chat call (OpenAI function-calling format) for the tool ``result`` names."""
    return [
        {
            "type": "function",
            "function": {
                "name": TOOL_NAME,
                "description": _DESCRIPTIONS[result],
                "parameters": _parameters_schema(result),
            },
        }
    ]


TOOL_DEFINITIONS: list[dict[str, Any]] = tool_definitions("full")
"""The seed's tool (``full``), as an OpenAI ``tools=`` argument."""


def _verdicts(request: RoomRequest, catalog: Catalog, room_lines: RoomLines) -> dict[str, str] | list[str]:
    """Each room's verdict in the words of the inline room lines: keyed by room id (``{"Lyra": "PASSES (slack
    2, ...)"}``), or for ``verdict_first`` a list of lines with the verdict before the room (``["PASSES: Lyra
    (slack 2, ...)", "FAILS: Vega (busy)"]``), so that a causal model reads which rooms pass left to right, as
    in the inline ``verdict_first`` prompt (see :mod:`.prompts`)."""
    checks = check_rooms(request, catalog)
    if room_lines == "verdict_first":
        return [verdict_first(check) for check in checks]
    return {check.room.id: brief_verdict(check) for check in checks}


def get_rooms_and_availability(
    catalog: Catalog, query: AvailabilityQuery, result: ToolResult = "full", room_lines: RoomLines = "full"
) -> dict[str, Any]:
    """Every room with its details and ``free``: whether it is free for the whole queried slot; for
    ``checks``, every room's verdict against the queried request (``result``: see :data:`TOOL_RESULTS`), written
    as ``room_lines`` says (name-keyed unless ``verdict_first``)."""
    if isinstance(query, SearchQuery):
        return {"rooms": _verdicts(RoomRequest.model_validate(query.model_dump()), catalog, room_lines)}
    rooms = []
    for room in catalog.rooms:
        free = room.is_free(query.date, query.time, query.duration_min)
        if result == "full":
            rooms.append({**room.model_dump(), "free": free})
        else:
            rooms.append({**room.model_dump(exclude={"booked"}), "free": free,
                          "bookings_that_day": room.bookings_on(query.date)})
    return {"rooms": rooms}


def tool_message_content(result: dict[str, Any], content: ToolContent = "json") -> str:
    """The ``tool`` message's content for a result of :func:`execute_tool_call` (see :data:`TOOL_CONTENTS`;
    ``lines`` only for the ``checks`` tool, whose verdicts are strings: :func:`.agent.make_agent` refuses others)."""
    if content == "json":
        return json.dumps(result)
    if "error" in result:
        return f"error: {result['error']}"
    rooms = result["rooms"]
    if isinstance(rooms, dict):
        return "\n".join(f"{room}: {verdict}" for room, verdict in rooms.items())
    return "\n".join(rooms)


def parse_tool_call(name: str, arguments: str, result: ToolResult = "full") -> AvailabilityQuery:
    """Check a tool call as the model wrote it (name and JSON argument string) against the schema of the tool
    ``result`` names."""
    if name != TOOL_NAME:
        raise ToolCallError(f"unknown tool {name!r}; the only tool is {TOOL_NAME!r}")
    try:
        decoded = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        raise ToolCallError(f"arguments are not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(decoded, dict):
        raise ToolCallError(f"arguments must be a JSON object, got {type(decoded).__name__}")
    try:
        return query_model(result).model_validate(decoded)
    except ValidationError as exc:
        raise ToolCallError(f"invalid arguments: {describe_validation_error(exc)}") from exc


def execute_tool_call(
    name: str, arguments: str, catalog: Catalog, result: ToolResult = "full", room_lines: RoomLines = "full"
) -> dict[str, Any]:
    """Run one tool call inside a tool span; a bad call returns ``{"error": ...}`` (recorded as the span's
    error) instead of raising. ``room_lines`` is how the ``checks`` tool writes its verdicts."""
    try:
        recorded = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        recorded = None
    if not isinstance(recorded, dict):
        recorded = {"raw": arguments}
    try:
        with tool_span(name, recorded) as call:
            call.result = get_rooms_and_availability(
                catalog, parse_tool_call(name, arguments, result), result, room_lines
            )
    except ToolCallError as exc:
        return {"error": str(exc)}
    return call.result
