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
from rltrain.envs.room_selection.schema import Clock, IsoDate, describe_validation_error

TOOL_NAME = "get_rooms_and_availability"

ToolResult = Literal["full", "brief"]
TOOL_RESULTS: tuple[ToolResult, ...] = ("full", "brief")
"""What the tool returns for each room: ``full`` is the catalog's record (every booking of every day, as the
seed's tool does: ~100 tokens a room) plus ``free``; ``brief`` keeps what the checks and tie-breaks read
(capacity, equipment, accessibility, distance, ``free`` and the number of bookings on the queried day:
~30 tokens a room). The same decision either way; ``brief`` makes a tool rollout of SmolLM2 about half as
long, which is what a CPU warm start pays for."""


class ToolCallError(ValueError):
    """A tool call the environment cannot execute; its message is what the model is told."""


class AvailabilityQuery(BaseModel):
    """The arguments of ``get_rooms_and_availability`` (also the source of its JSON schema)."""

    model_config = ConfigDict(extra="forbid", strict=True, title=TOOL_NAME)

    date: IsoDate = Field(description="YYYY-MM-DD")
    time: Clock = Field(description="HH:MM 24h local")
    duration_min: PositiveInt = Field(description="Meeting duration minutes")


def _parameters_schema() -> dict[str, Any]:
    """The JSON schema of :class:`AvailabilityQuery` without pydantic's titles and docstring, which only
    lengthen what the model reads."""
    schema = AvailabilityQuery.model_json_schema()
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


TOOL_DEFINITIONS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": TOOL_NAME,
            "description": (
                "Return meeting rooms with capacity, equipment, accessibility, distance, booked time slots, "
                "and whether each is free for the given slot."
            ),
            "parameters": _parameters_schema(),
        },
    }
]
"""The ``tools=`` argument of the chat call (OpenAI function-calling format)."""


def get_rooms_and_availability(
    catalog: Catalog, query: AvailabilityQuery, result: ToolResult = "full"
) -> dict[str, Any]:
    """Every room with its details and ``free``: whether it is free for the whole queried slot (``result``:
    see :data:`TOOL_RESULTS`)."""
    rooms = []
    for room in catalog.rooms:
        free = room.is_free(query.date, query.time, query.duration_min)
        if result == "full":
            rooms.append({**room.model_dump(), "free": free})
        else:
            rooms.append({**room.model_dump(exclude={"booked"}), "free": free,
                          "bookings_that_day": room.bookings_on(query.date)})
    return {"rooms": rooms}


def parse_tool_call(name: str, arguments: str) -> AvailabilityQuery:
    """Check a tool call as the model wrote it (name and JSON argument string) against the schema."""
    if name != TOOL_NAME:
        raise ToolCallError(f"unknown tool {name!r}; the only tool is {TOOL_NAME!r}")
    try:
        decoded = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        raise ToolCallError(f"arguments are not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(decoded, dict):
        raise ToolCallError(f"arguments must be a JSON object, got {type(decoded).__name__}")
    try:
        return AvailabilityQuery.model_validate(decoded)
    except ValidationError as exc:
        raise ToolCallError(f"invalid arguments: {describe_validation_error(exc)}") from exc


def execute_tool_call(
    name: str, arguments: str, catalog: Catalog, result: ToolResult = "full"
) -> dict[str, Any]:
    """Run one tool call inside a tool span; a bad call returns ``{"error": ...}`` (recorded as the span's
    error) instead of raising."""
    try:
        recorded = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        recorded = None
    if not isinstance(recorded, dict):
        recorded = {"raw": arguments}
    try:
        with tool_span(name, recorded) as call:
            call.result = get_rooms_and_availability(catalog, parse_tool_call(name, arguments), result)
    except ToolCallError as exc:
        return {"error": str(exc)}
    return call.result
