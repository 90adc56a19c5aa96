"""Task sets from what users already have: a list of dicts, a ``datasets.Dataset``, or a ``.jsonl`` file.

Every form becomes the same ``list[Task]``: each row (a dict) is the task's payload, handed to the agent as
is; its ``id`` is the row's ``"id"`` when it has one, else ``<name>-<row number>``. A bad row is a
:class:`TaskDataError` naming the file (or dataset) and the line, never a bare ``JSONDecodeError``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rltrain.types import Task


class TaskDataError(ValueError):
    """A task set that cannot be read; the message names the file or dataset and the row."""


def _task(row: Any, where: str, number: int, name: str) -> Task:
    if isinstance(row, Task):
        return row
    if not isinstance(row, Mapping):
        raise TaskDataError(f"{where}: row {number}: a task must be a JSON object (a dict), got "
                            f"{type(row).__name__}: {row!r:.80}")
    raw_id = row.get("id", f"{name}-{number}")
    if not isinstance(raw_id, str | int) or isinstance(raw_id, bool):
        raise TaskDataError(f"{where}: row {number}: `id` must be a string or an integer, got {raw_id!r:.80}")
    return Task(id=str(raw_id), payload=dict(row))


def _check_unique(tasks: list[Task], where: str) -> list[Task]:
    seen: set[str] = set()
    for number, task in enumerate(tasks, 1):
        if task.id in seen:
            raise TaskDataError(f"{where}: row {number}: duplicate task id {task.id!r}; ids name rollouts and "
                                "groups, so each must be unique")
        seen.add(task.id)
    return tasks


def read_jsonl(path: str | Path) -> list[Task]:
    """The tasks of a ``.jsonl`` file, one JSON object per line (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise TaskDataError(f"task file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskDataError(f"{path}: cannot be read as text: {exc}") from None
    tasks = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"{path}:{number}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        tasks.append(_task(row, f"{path}:{number}", number, path.stem))
    if not tasks:
        raise TaskDataError(f"{path}: holds no tasks")
    return _check_unique(tasks, str(path))


def load_task_data(data: Any, name: str = "tasks") -> list[Task]:
    """``data`` (a ``.jsonl`` path, a list of dicts or Tasks, a ``datasets.Dataset``, any iterable of dicts) as
    tasks. ``name`` names the set in messages and in the ids of rows without one."""
    if isinstance(data, str | Path):
        if Path(data).suffix != ".jsonl":
            raise TaskDataError(f"{name}: {str(data)!r} is not a .jsonl file; give a .jsonl path, a list of dicts "
                                "or a datasets.Dataset")
        return read_jsonl(data)
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise TaskDataError(f"{name}: expected a .jsonl path, a list of dicts or a datasets.Dataset, got "
                            f"{type(data).__name__}")
    tasks = [_task(row, f"{name}", number, name) for number, row in enumerate(data, 1)]
    if not tasks:
        raise TaskDataError(f"{name}: the dataset is empty")
    return _check_unique(tasks, name)


def write_jsonl(tasks: list[Task], path: Path) -> Path:
    """Write tasks as a ``.jsonl`` file that :func:`read_jsonl` reads back to the same tasks (the id is kept in
    each row), so a run's recipe can name in-memory datasets by path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({**task.payload, "id": task.id}) for task in tasks]
    path.write_text("\n".join(lines) + "\n")
    return path
