"""``new_id``: ids keep their shape and stay unique across threads and forked processes. ``Task``: a plain
dataclass that checks its own fields, and that pydantic validates and serialises like a model as a field."""

from __future__ import annotations

import os
import re
import threading

import pytest
from pydantic import ValidationError

from rltrain.types import Rollout, Task, new_id

ID_SHAPE = re.compile(r"^sp-[0-9a-f]{16}$")


def test_ids_have_the_prefix_and_16_hex_digits() -> None:
    assert all(ID_SHAPE.match(new_id("sp")) for _ in range(1000))


def test_ids_made_by_many_threads_are_unique() -> None:
    made: list[list[str]] = [[] for _ in range(4)]

    def make(out: list[str]) -> None:
        out.extend(new_id("sp") for _ in range(5000))

    threads = [threading.Thread(target=make, args=(out,)) for out in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [i for out in made for i in out]
    assert len(set(everything)) == len(everything)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write its next ids and leave without running pytest's teardown
        os.close(read_end)
        os.write(write_end, " ".join(new_id("sp") for _ in range(100)).encode())
        os._exit(0)
    os.close(write_end)
    parent_ids = {new_id("sp") for _ in range(100)}
    with os.fdopen(read_end, "rb") as pipe:
        child_ids = set(pipe.read().decode().split())
    os.waitpid(pid, 0)
    assert len(child_ids) == 100
    assert not parent_ids & child_ids


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"id": 7, "payload": {}}, "Task.id must be a str, got int: 7"),
        (
            {"id": "t1", "payload": ["a"]},
            "Task.payload of task 't1' must be a dict (a JSON object), got list: ['a']",
        ),
        (
            {"id": "t1", "payload": {"a": 1, 2: "b"}},
            "Task.payload of task 't1' must have str keys (a JSON object's), got int key 2",
        ),
    ],
)
def test_a_malformed_task_is_refused_naming_the_field_and_value(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(TypeError) as caught:
        Task(**fields)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_a_task_is_frozen_and_compares_by_value() -> None:
    task = Task(id="t1", payload={"a": [1, 2]})
    with pytest.raises(AttributeError):
        task.id = "t2"  # type: ignore[misc]
    assert task == Task(id="t1", payload={"a": [1, 2]}) and task != Task(id="t1", payload={"a": [1]})


def test_a_task_field_keeps_the_instance_and_round_trips_through_json() -> None:
    task = Task(id="t1", payload={"a": [1, 2], "b": {"c": None}})
    rollout = Rollout(task=task)
    assert rollout.task is task  # taken as is: no copy, no second validation
    assert rollout.model_dump()["task"] == {"id": "t1", "payload": {"a": [1, 2], "b": {"c": None}}}
    back = Rollout.model_validate_json(rollout.model_dump_json())
    assert type(back.task) is Task and back == rollout


@pytest.mark.parametrize(
    ("task", "location"),
    [
        ({"id": 7, "payload": {}}, ("task", "id")),
        ({"id": "t1", "payload": []}, ("task", "payload")),
        ({"id": "t1"}, ("task", "payload")),
        ({"id": "t1", "payload": {}, "grader": "x"}, ("task", "grader")),  # unknown keys are errors
    ],
)
def test_a_task_read_from_json_is_validated_by_the_same_rules(
    task: dict[str, object], location: tuple[str, ...]
) -> None:
    with pytest.raises(ValidationError) as caught:
        Rollout.model_validate({"task": task})
    assert [error["loc"] for error in caught.value.errors()] == [location]
