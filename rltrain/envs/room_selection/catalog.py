"""The room catalog: rooms, their equipment and their bookings, loaded from a JSON file and validated.

The reference catalog (seven rooms, the one the public tasks are labelled against) ships with the package;
any other catalog in the same format can be used instead. Validation is strict (no type coercion, no
unknown fields) because a catalog error silently changes every label.
"""

from __future__ import annotations

import json
import logging
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from rltrain.envs.room_selection.schema import NO_ROOM, Clock, IsoDate, describe_validation_error, overlaps

logger = logging.getLogger(__name__)

_DATA_DIR = Path(__file__).resolve().parent / "data"


class CatalogError(ValueError):
    """A catalog file that cannot be read or does not describe a valid set of rooms."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Booking(_Strict):
    """One booked slot of a room: ``[time, time + duration_min)`` on ``date``."""

    date: IsoDate
    time: Clock
    duration_min: PositiveInt


class Room(_Strict):
    id: str = Field(min_length=1)
    capacity: PositiveInt
    equipment: list[str]
    accessible: bool
    distance_m: int = Field(ge=0)
    booked: list[Booking]

    @field_validator("id")
    @classmethod
    def _not_the_no_room_label(cls, value: str) -> str:
        if value.strip().casefold() == NO_ROOM.casefold():
            raise ValueError(f"a room cannot be called {NO_ROOM!r}: that is the answer when no room fits")
        return value

    @field_validator("equipment")
    @classmethod
    def _no_duplicate_equipment(cls, value: list[str]) -> list[str]:
        # The tie-break counts equipment items, so a duplicate would change which room wins.
        duplicates = sorted({item for item in value if value.count(item) > 1})
        if duplicates:
            raise ValueError(f"equipment lists {duplicates} more than once")
        return value

    def is_free(self, date: str, time: str, duration_min: int) -> bool:
        """Whether no booking on ``date`` overlaps the slot (half-open intervals)."""
        return not any(
            booking.date == date and overlaps(time, duration_min, booking.time, booking.duration_min)
            for booking in self.booked
        )

    def bookings_on(self, date: str) -> int:
        """How many bookings the room has on ``date`` (the last tie-break)."""
        return sum(booking.date == date for booking in self.booked)


class Catalog(_Strict):
    rooms: list[Room] = Field(min_length=1)

    @field_validator("rooms")
    @classmethod
    def _unique_ids(cls, rooms: list[Room]) -> list[Room]:
        seen: set[str] = set()
        for room in rooms:
            key = room.id.casefold()
            if key in seen:
                raise ValueError(f"room id {room.id!r} appears more than once (ids are case-insensitive)")
            seen.add(key)
        return rooms

    @cached_property
    def room_ids(self) -> list[str]:
        """Room ids in catalog order."""
        return [room.id for room in self.rooms]

    @cached_property
    def equipment(self) -> list[str]:
        """Every equipment item any room has, sorted (what a request may sensibly ask for)."""
        return sorted({item for room in self.rooms for item in room.equipment})

    @cached_property
    def booking_dates(self) -> list[str]:
        """The dates on which some room is booked, sorted."""
        return sorted({booking.date for room in self.rooms for booking in room.booked})

    def answer_space(self) -> list[str]:
        """Every answer a grader can see: the room ids, then ``No Room``."""
        return [*self.room_ids, NO_ROOM]


def reference_catalog_path() -> Path:
    """The packaged seven-room catalog that the public tasks are labelled against."""
    return _DATA_DIR / "room_catalog_7.json"


def load_catalog(path: str | Path) -> Catalog:
    """Read and validate a catalog file; errors name the file, the field and the offending value."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"cannot read catalog file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CatalogError(
            f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    try:
        catalog = Catalog.model_validate(data)
    except ValidationError as exc:
        raise CatalogError(f"{path}: {describe_validation_error(exc)}") from exc
    logger.debug("loaded catalog %s: %d rooms", path, len(catalog.rooms))
    return catalog
