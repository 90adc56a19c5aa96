"""Field types shared by the catalog, the requests and the tool arguments, and how their errors read.

Dates and times are kept as the strings the data files use (``"2025-10-13"``, ``"09:30"``) so that a task
round-trips byte for byte, but they are checked on the way in: a ``"9:30"`` or ``"25:00"`` is an error at
load time, not a silent mismatch in an overlap test later.
"""

from __future__ import annotations

import datetime
import re
from typing import Annotated

from pydantic import AfterValidator, ValidationError

_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")

NO_ROOM = "No Room"
"""The answer when no room passes every hard constraint (the literal label used by the data files)."""


def _check_clock(value: str) -> str:
    if not _CLOCK.match(value):
        raise ValueError("expected a 24-hour time HH:MM such as '09:30'")
    return value


def _check_date(value: str) -> str:
    try:
        parsed = datetime.date.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed.isoformat() != value:
        raise ValueError("expected a calendar date YYYY-MM-DD such as '2025-10-13'")
    return value


Clock = Annotated[str, AfterValidator(_check_clock)]
"""A time of day, ``HH:MM`` on the 24-hour clock."""

IsoDate = Annotated[str, AfterValidator(_check_date)]
"""A calendar date, ``YYYY-MM-DD``."""


def minutes_of(clock: str) -> int:
    """Minutes since midnight of an ``HH:MM`` time (already validated by :data:`Clock`)."""
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


def clock_of(minutes: int) -> str:
    """The ``HH:MM`` time ``minutes`` after midnight (inverse of :func:`minutes_of`)."""
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def overlaps(start_a: str, duration_a: int, start_b: str, duration_b: int) -> bool:
    """Whether two slots on the same day overlap as half-open intervals ``[start, start + duration)``:
    a meeting that ends at 10:00 and one that starts at 10:00 do not overlap."""
    a0, b0 = minutes_of(start_a), minutes_of(start_b)
    return max(a0, b0) < min(a0 + duration_a, b0 + duration_b)


def describe_validation_error(exc: ValidationError) -> str:
    """A pydantic error as ``field: what was expected (got value)`` lines, one per problem.

    Pydantic's own text is accurate but verbose and names the model class; a user fixing a data file needs
    the dotted field path (``rooms.2.capacity``) and the offending value.
    """
    lines = []
    for error in exc.errors(include_url=False):
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            lines.append(f"{field}: required field is missing")
        else:
            lines.append(f"{field}: {message} (got {error['input']!r:.120})")
    return "; ".join(lines)
