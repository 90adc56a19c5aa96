"""The labelling rule and the grader.

The rule (from the data README, and it reproduces every public label):
1. hard constraints: free for the whole slot, capacity >= attendees, every need present, accessible when
   required;
2. among the rooms that pass, the best minimises, in order: capacity - attendees, equipment count - needs
   count, distance_m, bookings that day (then catalog order, which no public task needs);
3. no room passes: ``No Room``.

The grader reads the model's answer out of free text and scores it 1.0 when it names the labelled room.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from pydantic import BaseModel

from rltrain.envs.room_selection.catalog import Catalog, Room
from rltrain.envs.room_selection.schema import NO_ROOM
from rltrain.envs.room_selection.tasks import RoomRequest


@dataclass(frozen=True)
class RoomCheck:
    """One room measured against one request: the four hard constraints and the tie-break values."""

    room: Room
    free: bool
    capacity_ok: bool
    missing_needs: tuple[str, ...]
    accessible_ok: bool
    capacity_slack: int
    extra_equipment: int
    bookings_that_day: int

    @property
    def has_needs(self) -> bool:
        return not self.missing_needs

    @property
    def passes(self) -> bool:
        """Whether the room satisfies every hard constraint."""
        return self.free and self.capacity_ok and self.has_needs and self.accessible_ok

    @property
    def rank(self) -> tuple[int, int, int, int]:
        """The tie-break key: lower is better."""
        return (self.capacity_slack, self.extra_equipment, self.room.distance_m, self.bookings_that_day)


def check_room(request: RoomRequest, room: Room) -> RoomCheck:
    return RoomCheck(
        room=room,
        free=room.is_free(request.date, request.time, request.duration_min),
        capacity_ok=room.capacity >= request.attendees,
        missing_needs=tuple(need for need in request.needs if need not in room.equipment),
        accessible_ok=room.accessible or not request.accessible_required,
        capacity_slack=room.capacity - request.attendees,
        extra_equipment=len(room.equipment) - len(request.needs),
        bookings_that_day=room.bookings_on(request.date),
    )


def check_rooms(request: RoomRequest, catalog: Catalog) -> list[RoomCheck]:
    """Every room of the catalog, in catalog order, checked against the request."""
    return [check_room(request, room) for room in catalog.rooms]


def feasible_rooms(request: RoomRequest, catalog: Catalog) -> list[Room]:
    """The rooms that pass every hard constraint, best first."""
    passing = [check for check in check_rooms(request, catalog) if check.passes]
    return [check.room for check in sorted(passing, key=lambda check: check.rank)]


def solve(request: RoomRequest, catalog: Catalog) -> str:
    """The labelled answer: the best feasible room's id, or ``No Room``."""
    feasible = feasible_rooms(request, catalog)
    return feasible[0].id if feasible else NO_ROOM


class Grade(BaseModel):
    """How one answer scored. ``choice`` is ``None`` when no answer could be read from the text."""

    reward: float
    choice: str | None
    expected: str
    correct: bool
    parseable: bool


# "final_choice: X", "Final answer = X", "final choice:\nX" (the answer may start on the next line).
_MARKER = re.compile(r"final[ _-]?(?:choice|answer)\s*[:=][ \t]*\n?[ \t]*(?P<value>[^\n]*)", re.IGNORECASE)
# The format line of the prompt echoed back ("<ROOM_ID or No Room>") names no answer.
_PLACEHOLDER = re.compile(r"<[^<>\n]*room[ _-]?id[^<>\n]*>", re.IGNORECASE)


def _pattern_of(answer: str) -> str:
    if answer == NO_ROOM:
        return r"no[ _-]?room"
    return r"\s+".join(re.escape(word) for word in answer.split())


def _mentions(text: str, answers: Collection[str]) -> list[tuple[int, str]]:
    """(position, answer) of every whole-word, case-insensitive mention of an answer, in text order."""
    found = [
        (match.start(), answer)
        for answer in answers
        for match in re.finditer(rf"(?<![\w-]){_pattern_of(answer)}(?![\w-])", text, re.IGNORECASE)
    ]
    return sorted(found)


def parse_choice(text: str, answers: Collection[str]) -> str | None:
    """The answer a text gives, or ``None``.

    The last ``final_choice:`` / ``final answer:`` line that names an answer wins (its first answer, so
    ``final_choice: Orion (Lyra is busy)`` is Orion). Without such a line, a text that mentions exactly one
    answer (possibly several times) gives that answer. Matching is case-insensitive and returns the
    canonical spelling from ``answers``.
    """
    text = _PLACEHOLDER.sub(" ", text)
    for marker in reversed(list(_MARKER.finditer(text))):
        named = _mentions(marker.group("value"), answers)
        if named:
            return named[0][1]
    distinct = {answer for _, answer in _mentions(text, answers)}
    return distinct.pop() if len(distinct) == 1 else None


def grade(answer_text: str | None, expected: str, room_ids: Collection[str] = ()) -> Grade:
    """Score an answer: 1.0 when it names ``expected`` (a room id or ``No Room``), else 0.0.

    ``room_ids`` are the catalog's rooms; pass them so that a wrong room counts as a parseable answer.
    Without them only ``expected`` and ``No Room`` are recognised.
    """
    answers = {*room_ids, NO_ROOM, expected}
    choice = parse_choice(answer_text or "", answers)
    correct = choice is not None and choice.casefold() == expected.casefold()
    return Grade(
        reward=1.0 if correct else 0.0,
        choice=choice,
        expected=expected,
        correct=correct,
        parseable=choice is not None,
    )
