"""Room requests and task files: validation, loading, writing, and the recipe strings that name task sets.

A task row is ``{"id", "task_input": {...request...}, "expected_choice"}`` (the public room-selector format),
optionally with the catalog it is labelled against: ``catalog`` (the catalog itself, what generated sets with
``catalogs=`` write) or ``catalog_path`` (a catalog file). Rows are validated on load, and the
:class:`~rltrain.types.Task` payload is the row exactly as read, so what the agent sees is what the file says.

Why a generated row carries its catalog inline rather than a reference to a file: the row is then the whole
question (the store's rollout record holds the exact rooms it was graded against, a run directory can be moved
or resumed without side files that could go missing or change), and it stays small: at most 11 rooms of 3
dates x 3 bookings, under 10 KB against the 64 KiB row bound.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from rltrain.envs.room_selection.catalog import Catalog, load_catalog, reference_catalog_path
from rltrain.envs.room_selection.schema import Clock, IsoDate, describe_validation_error
from rltrain.types import Task

logger = logging.getLogger(__name__)

PUBLIC_TASKS_PATH = Path(__file__).resolve().parent / "data" / "room_tasks_public.jsonl"
PUBLIC_TRAIN_SIZE = 28
"""The public file's authors train on its first 28 rows and validate on the rest."""


#: Bounds checked before any work, so a careless or hostile task file costs an error, not hours and gigabytes:
#: a task set holds at most MAX_TASKS tasks (files and ``generated:n=``), a line of a task file at most
#: MAX_ROW_BYTES (a room request is about 300 bytes), an id at most MAX_ID_CHARS characters.
MAX_TASKS = 100_000
MAX_ROW_BYTES = 64 * 1024
MAX_ID_CHARS = 200


class TaskSpecError(ValueError):
    """A task file, task row or task recipe string that cannot be turned into tasks."""


class RoomRequest(BaseModel):
    """What a user asks for: a slot, a head count, equipment, and whether the room must be accessible."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    date: IsoDate
    time: Clock
    duration_min: PositiveInt
    attendees: PositiveInt
    needs: list[str]
    accessible_required: bool

    @field_validator("needs")
    @classmethod
    def _distinct_needs(cls, value: list[str]) -> list[str]:
        # The equipment-surplus tie-break counts needs, so a duplicate would change which room wins.
        duplicates = sorted({item for item in value if value.count(item) > 1})
        if duplicates:
            raise ValueError(f"needs lists {duplicates} more than once")
        return value


class TaskRow(BaseModel):
    """One line of a task file."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    task_input: RoomRequest
    expected_choice: str = Field(min_length=1)
    catalog: Catalog | None = None
    catalog_path: str | None = None

    @model_validator(mode="after")
    def _one_catalog_and_its_answer(self) -> TaskRow:
        if self.catalog is not None and self.catalog_path is not None:
            raise ValueError("a row names its catalog once: 'catalog' or 'catalog_path', not both")
        if self.catalog is not None and self.expected_choice not in self.catalog.answer_space():
            raise ValueError(
                f"expected_choice {self.expected_choice!r} is not an answer of the row's own catalog "
                f"(expected one of {self.catalog.answer_space()})"
            )
        return self


def request_of(payload: dict[str, Any]) -> RoomRequest:
    """The validated request inside a task payload (what every agent starts from)."""
    try:
        return RoomRequest.model_validate(payload.get("task_input"))
    except ValidationError as exc:
        raise TaskSpecError(
            f"task {payload.get('id')!r}: task_input: {describe_validation_error(exc)}"
        ) from exc


def load_tasks(path: str | Path, answers: Collection[str] | None = None) -> list[Task]:
    """Read a JSONL task file, one row a line (blank lines skipped).

    With ``answers`` (a catalog's answer space), every ``expected_choice`` of a row that does not carry or name
    its own catalog must be one of them (a row carrying its ``catalog`` is checked against that one): a label
    naming a room that does not exist could never be earned. Errors name the file, the line, the field and the
    value.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_TASKS * MAX_ROW_BYTES:
            raise TaskSpecError(f"{path}: {size} bytes, more than {MAX_TASKS} rows of at most {MAX_ROW_BYTES} bytes")
        raw = path.read_bytes()
    except OSError as exc:
        raise TaskSpecError(f"cannot read task file {path}: {exc.strerror or exc}") from exc
    try:
        # "\n" only: str.splitlines would also break inside JSON strings holding U+2028, U+0085 and the like
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        line_no = raw[: exc.start].count(b"\n") + 1
        raise TaskSpecError(
            f"{path}:{line_no}: not UTF-8 text (byte {raw[exc.start]:#04x} at offset {exc.start})"
        ) from None
    tasks: list[Task] = []
    first_line_of: dict[str, int] = {}
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        if len(line) > MAX_ROW_BYTES:  # characters, each at least a byte: a cheap first check
            raise TaskSpecError(f"{where}: a row of {len(line)} characters; a task row may take {MAX_ROW_BYTES} bytes")
        if len(tasks) >= MAX_TASKS:
            raise TaskSpecError(f"{where}: more than {MAX_TASKS} tasks in one file, the most a task set may hold")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskSpecError(f"{where}: not valid JSON (column {exc.colno}: {exc.msg})") from exc
        except RecursionError:
            raise TaskSpecError(f"{where}: JSON nested too deeply to read") from None
        if not isinstance(row, dict):
            raise TaskSpecError(f"{where}: expected a JSON object, got {type(row).__name__}")
        try:
            parsed = TaskRow.model_validate(row)
        except ValidationError as exc:
            raise TaskSpecError(f"{where}: {describe_validation_error(exc)}") from exc
        if parsed.id in first_line_of:
            raise TaskSpecError(f"{where}: id {parsed.id!r} already used on line {first_line_of[parsed.id]}")
        first_line_of[parsed.id] = line_no
        own_catalog = parsed.catalog is not None or parsed.catalog_path is not None
        if answers is not None and not own_catalog and parsed.expected_choice not in answers:
            raise TaskSpecError(
                f"{where}: expected_choice {parsed.expected_choice!r} is not an answer of the catalog "
                f"(expected one of {sorted(answers)})"
            )
        tasks.append(Task.from_row(row, len(tasks)))
    logger.debug("loaded %d tasks from %s", len(tasks), path)
    return tasks


def write_tasks(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows as JSONL after validating each one, so that only loadable files are ever written."""
    path = Path(path)
    lines = []
    for index, row in enumerate(rows):
        try:
            TaskRow.model_validate(row)
        except ValidationError as exc:
            raise TaskSpecError(f"row {index} ({row.get('id')!r}): {describe_validation_error(exc)}") from exc
        lines.append(json.dumps(row) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


_SPEC_HELP = (
    "expected 'public', 'public:train' (first 28), 'public:val' (the rest), "
    "'generated:n=<count>,seed=<int>[,catalogs=random|<count>]', or the path of a .jsonl task file"
)


def resolve_tasks(spec: str, catalog: Catalog) -> list[Task]:
    """The tasks a recipe string names, labelled against ``catalog``.

    The public tasks are labelled against the reference catalog, so asking for them with another catalog is
    an error rather than a set of wrong labels. Generated requests never repeat a public request, so a model
    trained on generated tasks is never shown a public validation request. ``generated:...,catalogs=random``
    gives every task a catalog of its own and ``catalogs=<K>`` spreads the tasks over K catalogs (see
    :mod:`.catalog_generator`), drawn from the set's seed, so ``catalog`` is then unused.
    """
    kind, _, argument = spec.strip().partition(":")
    if kind == "public":
        return _public_tasks(argument, catalog)
    if kind == "generated":
        # Imported here because the generator builds on this module's RoomRequest.
        from rltrain.envs.room_selection.catalog_generator import generate_catalogs
        from rltrain.envs.room_selection.generator import generate_tasks

        options = _generated_options(spec, argument)
        public_requests = [task.payload["task_input"] for task in load_tasks(PUBLIC_TASKS_PATH)]
        catalogs = catalog if options.catalogs is None else generate_catalogs(options.seed, options.catalogs)
        rows = generate_tasks(catalogs, options.n, options.seed, exclude=public_requests)
        return [Task.from_row(row, index) for index, row in enumerate(rows)]
    path = Path(spec)
    if path.suffix == ".jsonl":
        return load_tasks(path, answers=catalog.answer_space())
    raise TaskSpecError(f"unknown task set {spec!r}: {_SPEC_HELP}")


def _public_tasks(split: str, catalog: Catalog) -> list[Task]:
    if catalog.model_dump() != load_catalog(reference_catalog_path()).model_dump():
        raise TaskSpecError(
            "the public tasks are labelled against the reference catalog (room_catalog_7.json); this "
            "environment uses another catalog: use 'generated:...' or a task file labelled for it"
        )
    tasks = load_tasks(PUBLIC_TASKS_PATH, answers=catalog.answer_space())
    splits = {"": tasks, "train": tasks[:PUBLIC_TRAIN_SIZE], "val": tasks[PUBLIC_TRAIN_SIZE:]}
    if split not in splits:
        raise TaskSpecError(
            f"unknown public split in 'public:{split}': expected 'public', 'public:train' or 'public:val'"
        )
    return splits[split]


@dataclass(frozen=True)
class GeneratedOptions:
    """The options of a ``generated:`` spec; ``catalogs`` is None for the environment's catalog."""

    n: int
    seed: int = 0
    catalogs: int | None = None


def _generated_options(spec: str, argument: str) -> GeneratedOptions:
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in argument.split(","))):
        key, equals, value = item.partition("=")
        if key not in ("n", "seed", "catalogs") or not equals:
            raise TaskSpecError(f"task set {spec!r}: unknown option {item!r}; {_SPEC_HELP}")
        options[key] = value.strip()
    numbers: dict[str, int] = {}
    for key in ("n", "seed"):
        if key in options:
            try:
                numbers[key] = int(options[key])
            except ValueError:
                raise TaskSpecError(f"task set {spec!r}: {key} must be an integer, got {options[key]!r}") from None
    if "n" not in numbers or not 1 <= numbers["n"] <= MAX_TASKS:
        raise TaskSpecError(f"task set {spec!r}: needs n=<count> with 1 <= count <= {MAX_TASKS}; {_SPEC_HELP}")
    n, seed = numbers["n"], numbers.get("seed", 0)
    value = options.get("catalogs")
    if value is None:
        return GeneratedOptions(n=n, seed=seed)
    count = n if value == "random" else int(value) if value.isdecimal() else 0
    if not 1 <= count <= n:
        raise TaskSpecError(
            f"task set {spec!r}: catalogs must be 'random' (a catalog per task) or a count of catalogs from 1 to "
            f"n={n}, got {value!r}"
        )
    return GeneratedOptions(n=n, seed=seed, catalogs=count)
