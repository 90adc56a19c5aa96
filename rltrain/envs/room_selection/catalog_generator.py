"""Random room catalogs, one per seed: what ``generated:...,catalogs=random`` trains and evaluates on.

A policy trained on one catalog learns that catalog (which room is big, which has a projector) instead of
reading the per-room checks in its prompt; on an unseen catalog it falls back to a label prior. Giving every task
a catalog of its own removes that shortcut. A catalog is drawn from a seed:

- 3-11 rooms (the reference has 7), named from :data:`ROOM_NAMES`, 400 made-up two-syllable names that no
  other catalog favours and none of which is a reference room;
- capacities from :data:`CAPACITIES` (requests ask for 1-14 people, so some rooms are too small and a few
  requests fit nowhere), 0-4 items of :data:`EQUIPMENT`, accessible with probability 0.6, 5-60 m away;
- 1-3 booking dates in 2026, each room with 0-3 bookings a date that do not overlap one another, and at least one
  booking on every date (the request generator asks about booking dates only).

Catalog seeds are strings ``"room-catalog/{set_seed}/{index}"`` (:func:`catalog_seed`), distinct for distinct
``(set_seed, index)``: two task sets with different seeds never draw a catalog from the same seed, so the
``seed=99`` evaluation catalogs are not the ``seed=11`` training ones. String seeds are hashed by ``random``
with SHA-512, the same in every process.
"""

from __future__ import annotations

import datetime
import random

from rltrain.envs.room_selection.catalog import Booking, Catalog, Room
from rltrain.envs.room_selection.schema import clock_of, overlaps

_ONSETS = ("Al", "Bram", "Cal", "Dor", "El", "Fen", "Gil", "Hal", "Is", "Jun", "Kel", "Lom", "Mar", "Nel", "Os",
           "Pim", "Quil", "Ren", "Sal", "Tam", "Ul", "Vel", "Wen", "Yar", "Zan")
_ENDINGS = ("a", "is", "on", "ar", "en", "ix", "o", "ut", "ey", "ith", "ora", "und", "esk", "ane", "ow", "im")
_REFERENCE_NAMES = frozenset({"orion", "lyra", "vega", "nova", "quark", "atlas", "pulse"})

ROOM_NAMES: tuple[str, ...] = tuple(sorted(
    {onset + ending for onset in _ONSETS for ending in _ENDINGS} - _REFERENCE_NAMES,
    key=str.casefold,
))
"""The pool room names are drawn from, uniformly: 400 single words, so that a name says nothing about its room."""

MIN_ROOMS = 3
MAX_ROOMS = 11
CAPACITIES = (2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20)
EQUIPMENT = ("projector", "whiteboard", "tv", "confphone", "ledwall", "videobar", "flipchart", "speakers")
MAX_EQUIPMENT = 4
MAX_DATES = 3
MAX_BOOKINGS_A_DATE = 3
_FIRST_DATE = datetime.date(2026, 1, 5)
_DATE_SPAN_DAYS = 180
_BOOKING_STARTS = tuple(clock_of(minutes) for minutes in range(8 * 60, 17 * 60 + 31, 30))
_BOOKING_MINUTES = (30, 60, 90, 120)


def catalog_seed(set_seed: int, index: int) -> str:
    """The seed of catalog ``index`` of the task set generated with ``set_seed``."""
    return f"room-catalog/{set_seed}/{index}"


def _bookings_on(rng: random.Random, date: str, count: int) -> list[Booking]:
    """Up to ``count`` bookings on ``date`` that do not overlap each other (a clash is dropped, not redrawn)."""
    kept: list[Booking] = []
    for _ in range(count):
        booking = Booking(date=date, time=rng.choice(_BOOKING_STARTS), duration_min=rng.choice(_BOOKING_MINUTES))
        if not any(overlaps(booking.time, booking.duration_min, b.time, b.duration_min) for b in kept):
            kept.append(booking)
    return kept


def generate_catalog(seed: str) -> Catalog:
    """The catalog drawn from ``seed`` (see the module docstring for what is drawn); the same seed, the same
    catalog."""
    rng = random.Random(seed)
    count = rng.randint(MIN_ROOMS, MAX_ROOMS)
    names = rng.sample(ROOM_NAMES, count)
    dates = sorted(
        (_FIRST_DATE + datetime.timedelta(days=day)).isoformat()
        for day in rng.sample(range(_DATE_SPAN_DAYS), rng.randint(1, MAX_DATES))
    )
    booked: list[list[Booking]] = [
        [b for date in dates for b in _bookings_on(rng, date, rng.randint(0, MAX_BOOKINGS_A_DATE))] for _ in names
    ]
    for date in dates:  # every date needs a booking, or no request would be asked about it
        if not any(b.date == date for bookings in booked for b in bookings):
            rng.choice(booked).extend(_bookings_on(rng, date, 1))
    rooms = [
        Room(
            id=name,
            capacity=rng.choice(CAPACITIES),
            equipment=sorted(rng.sample(EQUIPMENT, rng.randint(0, MAX_EQUIPMENT))),
            accessible=rng.random() < 0.6,
            distance_m=rng.randint(5, 60),
            booked=sorted(bookings, key=lambda b: (b.date, b.time)),
        )
        for name, bookings in zip(names, booked, strict=True)
    ]
    return Catalog(rooms=rooms)


def generate_catalogs(set_seed: int, count: int) -> list[Catalog]:
    """The ``count`` catalogs of the task set generated with ``set_seed``."""
    return [generate_catalog(catalog_seed(set_seed, index)) for index in range(count)]
