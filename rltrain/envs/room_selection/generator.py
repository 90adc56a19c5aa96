"""Random room requests, labelled by the solver: more training data of the public tasks' kind.

Requests are drawn on the dates the catalog has bookings (the other days every room is free, which teaches
nothing about availability), at 08:00-18:00 on the half hour, for 30-120 minutes, 1-14 attendees, a subset
of the catalog's equipment, and an accessibility flag. Uniform draws are lopsided (with the reference
catalog 43 % are ``No Room`` and 18 % ``Nova``, the one room for 11-12 people), and a policy collapses onto
a majority answer, so a draw whose label already fills ``MAX_LABEL_SHARE`` of the rows is redrawn. After
``MAX_REDRAWS`` redraws in a row the draw is kept, so a catalog with only a few possible answers still
gets its ``n`` rows.

Given several catalogs instead of one (``catalogs=`` in a task set spec, see :mod:`.catalog_generator`), row ``i``
is asked of catalog ``i mod K`` and carries it (``"catalog"`` in the row), and the share is counted per answer
*kind*, ``No Room`` or the chosen room's place in its catalog's order: names differ from catalog to catalog,
so counting names would never redraw anything. With one catalog place and name are the same thing, so the rows
are those this module always drew.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from rltrain.envs.room_selection.catalog import Catalog, CatalogError
from rltrain.envs.room_selection.schema import NO_ROOM, clock_of
from rltrain.envs.room_selection.solver import solve
from rltrain.envs.room_selection.tasks import MAX_TASKS, RoomRequest, TaskSpecError

START_TIMES = tuple(clock_of(minutes) for minutes in range(8 * 60, 18 * 60 + 1, 30))
DURATIONS_MIN = (30, 60, 90, 120)
MAX_ATTENDEES = 14
MAX_NEEDS = 3
MAX_LABEL_SHARE = 0.2
MAX_REDRAWS = 50


def _draw_request(rng: random.Random, catalog: Catalog) -> RoomRequest:
    equipment = catalog.equipment
    return RoomRequest(
        date=rng.choice(catalog.booking_dates),
        time=rng.choice(START_TIMES),
        duration_min=rng.choice(DURATIONS_MIN),
        attendees=rng.randint(1, MAX_ATTENDEES),
        needs=rng.sample(equipment, rng.randint(0, min(MAX_NEEDS, len(equipment)))),
        accessible_required=rng.random() < 0.5,
    )


def _identity(request: RoomRequest) -> tuple[Any, ...]:
    """What makes two requests the same question (the order of the needs does not)."""
    return (
        request.date,
        request.time,
        request.duration_min,
        request.attendees,
        frozenset(request.needs),
        request.accessible_required,
    )


def _answer_kind(label: str, catalog: Catalog) -> str | int:
    """What the label balance counts: ``No Room``, or the chosen room's place in catalog order."""
    return label if label == NO_ROOM else catalog.room_ids.index(label)


def generate_tasks(
    catalogs: Catalog | Sequence[Catalog], n: int, seed: int, exclude: Iterable[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """``n`` task rows, deterministic per ``(catalogs, n, seed)``; requests equal to one in ``exclude``
    (task_input dicts) are never produced.

    One catalog: rows ``{"id": "g{seed}-{i}", "task_input", "expected_choice"}`` labelled against it. A sequence
    of catalogs: row ``i`` is ``{"id": "g{seed}c-{i}", ..., "catalog": {...}}``, labelled against and carrying
    ``catalogs[i % len(catalogs)]``."""
    if not 1 <= n <= MAX_TASKS:
        raise TaskSpecError(f"the number of tasks to generate must be in [1, {MAX_TASKS}], got {n}")
    own = not isinstance(catalogs, Catalog)
    pool = [catalogs] if isinstance(catalogs, Catalog) else list(catalogs)
    if not pool:
        raise TaskSpecError("cannot generate requests: no catalog given")
    if any(not catalog.booking_dates for catalog in pool):
        raise CatalogError("cannot generate requests: the catalog has no bookings, so no date to ask about")
    excluded = {_identity(RoomRequest.model_validate(request)) for request in exclude}
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    kind_counts: Counter[str | int] = Counter()
    redraws = 0
    while len(rows) < n:
        catalog = pool[len(rows) % len(pool)]
        request = _draw_request(rng, catalog)
        if _identity(request) in excluded:
            continue
        label = solve(request, catalog)
        kind = _answer_kind(label, catalog)
        if kind_counts[kind] >= max(1.0, MAX_LABEL_SHARE * (len(rows) + 1)) and redraws < MAX_REDRAWS:
            redraws += 1
            continue
        redraws = 0
        kind_counts[kind] += 1
        row: dict[str, Any] = {
            "id": f"g{seed}{'c' if own else ''}-{len(rows)}",
            "task_input": request.model_dump(),
            "expected_choice": label,
        }
        if own:
            row["catalog"] = catalog.model_dump()
        rows.append(row)
    return rows
