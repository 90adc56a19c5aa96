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
tie-break values, ~12 tokens a room) or ``verdict_first`` (the ``brief`` line with the verdict before the room:
``- PASSES: Lyra (slack 2, ...)``). The same facts every way; ``brief`` is what lets a warm start on two CPU
cores see enough demonstrations in minutes (``make demo``). ``verdict_first`` is for catalogs whose names change
from task to task: a causal model reads a line left to right, so in ``- Lyra: PASSES`` the name's tokens cannot
carry the verdict that follows them, and copying the rooms that pass (``answer_style: passing``) takes a
look-ahead; after ``PASSES:`` the name is a plain copy.

The ``teacher`` mode (demonstrations for the warm start) sends exactly the ``inline`` agent's request, so its
templates are the inline ones; ``tool_teacher`` sends the ``tool`` agent's, so its templates are the tool ones.

Templates are :class:`~rltrain.types.PromptTemplate` resources, so APO can rewrite them; the agent fills
them with :func:`prompt_values`, which offers every name a template of that mode may use.
"""

from __future__ import annotations

from typing import Literal

from rltrain.envs.room_selection.catalog import Catalog
from rltrain.envs.room_selection.solver import RoomCheck, check_rooms, solve
from rltrain.envs.room_selection.tasks import RoomRequest
from rltrain.types import PromptTemplate

RoomLines = Literal["full", "brief", "verdict_first"]
ROOM_LINES: tuple[RoomLines, ...] = ("full", "brief", "verdict_first")

AnswerStyle = Literal["choice", "passing", "stepwise"]
ANSWER_STYLES: tuple[AnswerStyle, ...] = ("choice", "passing", "stepwise")
"""How the agent is asked to answer, and how the teachers answer: ``choice`` is one line, ``final_choice: <room>``;
``passing`` first copies every room that passes, with its tie-break values, then chooses
(``passing: Lyra (slack 2, extra 1, 20 m, 0 bookings), Nova (slack 0, ...)`` / ``final_choice: Nova``; ``passing:
none`` / ``final_choice: No Room``); ``stepwise`` writes the passing line, then narrows it one tie-break at a
time, keeping the rooms with the smallest value, until one room is left (``slack 0: Nova, Pulse`` / ``extra 0:
Nova`` / ``final_choice: Nova``). The grade reads the ``final_choice`` line every way. ``passing`` splits the
decision into steps a small model can learn from few demonstrations on catalogs whose room names change from
task to task: find the lines that say PASSES (copying), then take the smallest values among a few; ``stepwise``
splits the last step too, so that each line is the minimum of one number over a short list."""

#: the tie-breaks in the order of :attr:`RoomCheck.rank`, as the ``stepwise`` lines name them, with the unit
#: written after each value
_TIE_BREAKS: tuple[tuple[str, str], ...] = (("slack", ""), ("extra", ""), ("distance", " m"), ("bookings", ""))

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

_FORMATS: dict[AnswerStyle, str] = {
    "choice": "Answer with one line:\nfinal_choice: <ROOM_ID or No Room>",
    "passing": (
        "Answer with two lines: first every room that PASSES with its values, then the best of them:\n"
        "passing: <ROOM_ID (slack, extra, distance, bookings), ... or none>\n"
        "final_choice: <ROOM_ID or No Room>"
    ),
    "stepwise": (
        "First list every room that PASSES with its values, then keep the rooms with the smallest slack, then "
        "of those the least extra, the shortest distance, the fewest bookings, until one is left:\n"
        "passing: <ROOM_ID (slack, extra, distance, bookings), ... or none>\n"
        "slack <smallest>: <ROOM_ID, ...>\n"
        "final_choice: <ROOM_ID or No Room>"
    ),
}
"""The end of every system prompt: the answer format of each answer style."""

#: what the inline agent writes after its prompt before the model continues (the first line's key)
_ANSWER_PREFIXES: dict[AnswerStyle, str] = {"choice": "final_choice:", "passing": "passing:", "stepwise": "passing:"}

_SEED_TOOL_INTRO = (
    "You are a scheduling assistant. First call get_rooms_and_availability with the request's date, "
    "time and duration_min; it lists every room with its capacity, equipment, accessibility, distance, "
    "bookings, and whether it is free for that slot.\n"
    f"{_RULES}"
)
_TOOL_INTROS: dict[str, str] = {
    "full": _SEED_TOOL_INTRO,
    "brief": _SEED_TOOL_INTRO,
    # the tool does the four checks, so the rules shrink to the tie-breaks
    "checks": (
        "You are a scheduling assistant. First call get_rooms_and_availability with the request's date, "
        "time, duration_min, attendees, needs and accessible_required; it says for every room whether it "
        "PASSES (with its capacity slack, extra equipment, distance and bookings that day) or FAILS.\n"
        "Pick the best room that PASSES: smallest slack, then least extra equipment, then shortest "
        "distance, then fewest bookings. If none passes: No Room."
    ),
}
"""The tool agents' system prompts before the answer format, by the tool they describe (see
:data:`.tools.TOOL_RESULTS`)."""
_INLINE_INTRO = f"You are a scheduling assistant.\n{_RULES}"

_USER_TEMPLATES: dict[str, PromptTemplate] = {
    "tool": PromptTemplate(
        template=(
            "Find a room on {date} at {time} for {duration_min} minutes, {attendees} attendees. "
            "Needs: {needs}. Accessible required: {accessible_required}"
        ),
        placeholders=REQUEST_FIELDS,
    ),
    "inline": PromptTemplate(
        template=(
            "Request: {request}\n\n"
            "Each room checked against this request:\n{rooms}\n\n"
            "Which room that PASSES is best by the tie-breaks? If none passes, answer No Room.\n"
            "Answer with one of: {answers}."
        ),
        placeholders=["request", "rooms", "answers"],
    ),
}

#: the agent modes that read templates, and the prompt form each uses (the teachers see what their pupils see)
PROMPT_FORMS: dict[str, str] = {"tool": "tool", "tool_teacher": "tool", "inline": "inline", "teacher": "inline"}


def default_prompts(
    mode: str, tool_result: str = "full", answer_style: AnswerStyle = "choice"
) -> dict[str, PromptTemplate]:
    """Fresh default templates of ``mode`` (one of :data:`PROMPT_FORMS`): the tool modes' system prompt describes
    the tool ``tool_result`` names, every mode's asks for the ``answer_style``, and the inline forms start the
    answer with that style's first key (``final_choice:`` or ``passing:``)."""
    if mode not in PROMPT_FORMS:
        raise ValueError(f"no default prompts for agent mode {mode!r}; modes with prompts: {sorted(PROMPT_FORMS)}")
    form = PROMPT_FORMS[mode]
    intro = _TOOL_INTROS[tool_result] if form == "tool" else _INLINE_INTRO
    prompts = {
        "system": PromptTemplate(template=f"{intro}\n{_FORMATS[answer_style]}"),
        "user": _USER_TEMPLATES[form].model_copy(deep=True),
    }
    if form == "inline":
        prompts["answer_prefix"] = PromptTemplate(template=_ANSWER_PREFIXES[answer_style])
    return prompts


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


def tie_break_values(check: RoomCheck) -> str:
    """A passing room's tie-break values in a few tokens: ``slack 2, extra 1, 20 m, 0 bookings``."""
    return (
        f"slack {check.capacity_slack}, extra {check.extra_equipment}, {check.room.distance_m} m, "
        f"{check.bookings_that_day} bookings"
    )


def teacher_answer(request: RoomRequest, catalog: Catalog, answer_style: AnswerStyle = "choice") -> str:
    """The answer a teacher demonstrates in ``answer_style`` (see :data:`ANSWER_STYLES`): the solver's choice,
    after the passing rooms (in catalog order, with their tie-break values) for ``passing``, and after them the
    narrowing by each tie-break for ``stepwise``."""
    choice = f"final_choice: {solve(request, catalog)}"
    if answer_style == "choice":
        return choice
    checks = [check for check in check_rooms(request, catalog) if check.passes]
    passing = ", ".join(f"{check.room.id} ({tie_break_values(check)})" for check in checks) or "none"
    lines = [f"{_ANSWER_PREFIXES[answer_style]} {passing}"]
    if answer_style == "stepwise":
        lines += _narrowing(checks)
    return "\n".join([*lines, choice])


def _narrowing(checks: list[RoomCheck]) -> list[str]:
    """``stepwise`` lines: the rooms left after each tie-break (``slack 0: Nova, Pulse``), until one is left.
    Rooms tied on all four stay in catalog order, and the solver takes the first of them."""
    lines: list[str] = []
    for position, (name, unit) in enumerate(_TIE_BREAKS):
        if len(checks) < 2:
            break
        best = min(check.rank[position] for check in checks)
        checks = [check for check in checks if check.rank[position] == best]
        lines.append(f"{name} {best}{unit}: {', '.join(check.room.id for check in checks)}")
    return lines


def _verdict_parts(check: RoomCheck) -> tuple[str, str]:
    """``("FAILS", "(busy; too small)")`` or ``("PASSES", "(slack 2, extra 1, 20 m, 0 bookings)")``."""
    if not check.passes:
        failed = [
            *(["busy"] if not check.free else []),
            *(["too small"] if not check.capacity_ok else []),
            *([f"no {', '.join(check.missing_needs)}"] if check.missing_needs else []),
            *(["not accessible"] if not check.accessible_ok else []),
        ]
        return "FAILS", f"({'; '.join(failed)})"
    return "PASSES", f"({tie_break_values(check)})"


def brief_verdict(check: RoomCheck) -> str:
    """One room's verdict in a few tokens: ``FAILS`` and the checks it fails, or ``PASSES`` and its tie-break
    values (also what the ``checks`` tool returns for each room)."""
    return " ".join(_verdict_parts(check))


def describe_check_brief(check: RoomCheck) -> str:
    """One room's line in the ``brief`` inline prompt: its id and :func:`brief_verdict`."""
    return f"- {check.room.id}: {brief_verdict(check)}"


def verdict_first(check: RoomCheck) -> str:
    """One room's verdict before its id: ``PASSES: Lyra (slack 2, ...)`` or ``FAILS: Orion (busy)`` (also what
    the ``checks`` tool returns for each room with ``room_lines: verdict_first``)."""
    verdict, details = _verdict_parts(check)
    return f"{verdict}: {check.room.id} {details}"


def describe_check_verdict_first(check: RoomCheck) -> str:
    """One room's line in the ``verdict_first`` inline prompt: ``- PASSES: Lyra (slack 2, ...)``."""
    return f"- {verdict_first(check)}"


_ROOM_LINE_WRITERS = {"brief": describe_check_brief, "verdict_first": describe_check_verdict_first}


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
            describe_check(check, request.attendees)
            if room_lines == "full"
            else _ROOM_LINE_WRITERS[room_lines](check)
            for check in checks
        )
        values["answers"] = ", ".join(catalog.answer_space())
    return values
