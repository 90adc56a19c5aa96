"""What the model reads: the default prompt templates of each agent mode and the text that fills them.

Two modes:
- ``tool`` (the seed's agent): the model calls ``get_rooms_and_availability`` and then answers; this needs a
  model that can call tools and compare several rooms.
- ``inline`` (small models): the availability and each room's four hard-constraint checks are computed and
  written into the prompt, with the tie-break values of the rooms that pass, so that the model only picks
  the best passing room. Its ``answer_prefix`` (``final_choice:``) is written as the start of the answer and
  continued by the model, and the prompt ends with the list of possible answers: without that list
  SmolLM2-135M continues the prefix with text copied from the prompt (a date, a number); with it all its
  greedy answers on the 12 public validation tasks name a room (Orion, the first listed, every time: reading
  the checks is what training has to teach it).

How the inline ``{rooms}`` are written is the environment's ``room_lines`` option: ``full`` (the default: every
check spelled out, ~40 tokens a room, ~570 prompt tokens) or ``brief`` (a verdict, the failed checks or the
tie-break values, ~12 tokens a room). The same facts either way; ``brief`` is what lets a warm start on two CPU
cores see enough demonstrations in minutes (``make demo``).

The ``teacher`` mode (demonstrations for the warm start) sends exactly the ``inline`` agent's request, so its
templates are the inline ones; ``tool_teacher`` sends the ``tool`` agent's, so its templates are the tool ones.

Templates are :class:`~rltrain.types.PromptTemplate` resources, so APO can rewrite them; the agent fills
them with :func:`prompt_values`, which offers every name a template of that mode may use.
"""

from __future__ import annotations

from typing import Literal

from rltrain.envs.room_selection.catalog import Catalog
from rltrain.envs.room_selection.solver import RoomCheck, check_rooms
from rltrain.envs.room_selection.tasks import RoomRequest
from rltrain.types import PromptTemplate

RoomLines = Literal["full", "brief"]
ROOM_LINES: tuple[RoomLines, ...] = ("full", "brief")

REQUEST_FIELDS = ["date", "time", "duration_min", "attendees", "needs", "accessible_required"]

_RULES = (
    "A room is suitable only if it passes all four checks: it is free for the whole slot, its capacity is at "
    "least the number of attendees, it has every needed item of equipment, and it is accessible when "
    "accessibility is required.\n"
    "Among suitable rooms choose the best one by these tie-breaks, in order (smaller is better):\n"
    "1. capacity slack = capacity - attendees\n"
    "2. extra equipment = number of equipment items - number of needs\n"
    "3. distance in metres\n"
    "4. number of bookings the room has that day\n"
    "If no room passes all four checks, the answer is No Room."
)

_FORMAT = "Answer with one line:\nfinal_choice: <ROOM_ID or No Room>"

TOOL_PROMPTS: dict[str, PromptTemplate] = {
    "system": PromptTemplate(
        template=(
            "You are a scheduling assistant. First call get_rooms_and_availability with the request's date, "
            "time and duration_min; it lists every room with its capacity, equipment, accessibility, distance, "
            "bookings, and whether it is free for that slot.\n"
            f"{_RULES}\n{_FORMAT}"
        )
    ),
    "user": PromptTemplate(
        template=(
            "Find a room on {date} at {time} for {duration_min} minutes, {attendees} attendees. "
            "Needs: {needs}. Accessible required: {accessible_required}"
        ),
        placeholders=REQUEST_FIELDS,
    ),
}

INLINE_PROMPTS: dict[str, PromptTemplate] = {
    "system": PromptTemplate(template=f"You are a scheduling assistant.\n{_RULES}\n{_FORMAT}"),
    "user": PromptTemplate(
        template=(
            "Request: {request}\n\n"
            "Each room checked against this request:\n{rooms}\n\n"
            "Which room that PASSES is best by the tie-breaks? If none passes, answer No Room.\n"
            "Answer with one of: {answers}."
        ),
        placeholders=["request", "rooms", "answers"],
    ),
    "answer_prefix": PromptTemplate(template="final_choice:"),
}

DEFAULT_PROMPTS: dict[str, dict[str, PromptTemplate]] = {
    "tool": TOOL_PROMPTS,
    "inline": INLINE_PROMPTS,
    "teacher": INLINE_PROMPTS,
    "tool_teacher": TOOL_PROMPTS,
}


def default_prompts(mode: str) -> dict[str, PromptTemplate]:
    """A fresh copy of the default templates of ``mode`` (``tool``, ``inline`` or ``teacher``)."""
    if mode not in DEFAULT_PROMPTS:
        raise ValueError(
            f"no default prompts for agent mode {mode!r}; modes with prompts: {sorted(DEFAULT_PROMPTS)}"
        )
    return {name: template.model_copy(deep=True) for name, template in DEFAULT_PROMPTS[mode].items()}


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def describe_request(request: RoomRequest) -> str:
    """The request as one line."""
    return (
        f"{request.date} at {request.time} for {request.duration_min} minutes, {request.attendees} attendees; "
        f"needs: {', '.join(request.needs) or 'nothing'}; "
        f"accessible room required: {_yes_no(request.accessible_required)}."
    )


def describe_check(check: RoomCheck, attendees: int) -> str:
    """One room's four checks and verdict; the tie-break values only for a room that passes."""
    room = check.room
    needs = "yes" if check.has_needs else f"no (missing {', '.join(check.missing_needs)})"
    line = (
        f"- {room.id}: free: {_yes_no(check.free)}; capacity {room.capacity} >= {attendees}: "
        f"{_yes_no(check.capacity_ok)}; has needs: {needs}; accessibility ok: {_yes_no(check.accessible_ok)}."
    )
    if not check.passes:
        return f"{line} FAILS."
    return (
        f"{line} PASSES (capacity slack {check.capacity_slack}, extra equipment {check.extra_equipment}, "
        f"distance {room.distance_m} m, bookings that day {check.bookings_that_day})."
    )


def describe_check_brief(check: RoomCheck) -> str:
    """One room in a few tokens: ``FAILS`` and the checks it fails, or ``PASSES`` and its tie-break values."""
    room = check.room
    if not check.passes:
        failed = [
            *(["busy"] if not check.free else []),
            *(["too small"] if not check.capacity_ok else []),
            *([f"no {', '.join(check.missing_needs)}"] if check.missing_needs else []),
            *(["not accessible"] if not check.accessible_ok else []),
        ]
        return f"- {room.id}: FAILS ({'; '.join(failed)})"
    return (
        f"- {room.id}: PASSES (slack {check.capacity_slack}, extra {check.extra_equipment}, "
        f"{room.distance_m} m, {check.bookings_that_day} bookings)"
    )


def prompt_values(
    mode: str, request: RoomRequest, catalog: Catalog, room_lines: RoomLines = "full"
) -> dict[str, str]:
    """Every value a template of ``mode`` may use: the request's fields, the request as a sentence, and in
    ``inline`` mode the rooms' checks (written as ``room_lines`` says) and the list of possible answers (never
    in ``tool`` mode, where finding the rooms is the model's job)."""
    values = {
        "date": request.date,
        "time": request.time,
        "duration_min": str(request.duration_min),
        "attendees": str(request.attendees),
        "needs": ", ".join(request.needs) or "none",
        "accessible_required": _yes_no(request.accessible_required),
        "request": describe_request(request),
    }
    if mode == "inline":
        checks = check_rooms(request, catalog)
        values["rooms"] = "\n".join(
            describe_check(check, request.attendees) if room_lines == "full" else describe_check_brief(check)
            for check in checks
        )
        values["answers"] = ", ".join(catalog.answer_space())
    return values
