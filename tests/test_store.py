"""The Store contract, checked on both stores, plus what only the durable SQLite store promises
(several processes, reopening, integrity checks, no secret in the file)."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rltrain.store import MemoryStore, SqliteStore, Store, StoreError, UnknownRolloutError, open_store
from rltrain.store import sqlite as sqlite_module
from rltrain.store.span_cache import SpanCache
from rltrain.types import LLMResource, PromptTemplate, Resources, Rollout, RolloutStatus, Span, SpanKind, Task

SECRET = "sk-test-0123456789abcdef-do-not-store"


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    opened = MemoryStore() if request.param == "memory" else SqliteStore(tmp_path / "store.sqlite")
    yield opened
    opened.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "store.sqlite")
    yield opened
    opened.close()


def make_rollouts(n: int, mode: str = "train", max_attempts: int = 1) -> list[Rollout]:
    return [
        Rollout(task=Task(id=f"{mode}-{i}", payload={"i": i}), mode=mode, max_attempts=max_attempts)
        for i in range(n)
    ]


def span(rollout_id: str, attempt_no: int = 1, sequence: int | None = None, name: str = "step") -> Span:
    return Span(rollout_id=rollout_id, attempt_no=attempt_no, sequence=sequence, kind=SpanKind.LOG, name=name)


def claim(store: Store, mode: str | None = None, batch_id: str | None = None) -> tuple[Rollout, int]:
    claimed = store.claim_rollout("w0", mode, batch_id)
    assert claimed is not None
    rollout, attempt = claimed
    return rollout, attempt.attempt_no


# -- queue ----------------------------------------------------------------------------------------------
def test_is_a_store(store: Store) -> None:
    assert isinstance(store, Store)


def test_claim_takes_the_oldest_queued_rollout(store: Store) -> None:
    rollouts = make_rollouts(3)
    store.enqueue_rollouts(rollouts[:2])
    store.enqueue_rollouts(rollouts[2:])
    claimed = [store.claim_rollout(f"w{i}") for i in range(3)]
    assert [c[0].rollout_id for c in claimed if c] == [r.rollout_id for r in rollouts]
    assert store.claim_rollout("w9") is None
    rollout, attempt = claimed[0]  # type: ignore[misc]
    assert rollout.status is RolloutStatus.RUNNING and rollout.attempt_count == 1
    assert rollout.started_at is not None
    assert (attempt.rollout_id, attempt.attempt_no, attempt.worker_id) == (rollout.rollout_id, 1, "w0")
    assert attempt.status is RolloutStatus.RUNNING
    assert store.get_rollout(rollout.rollout_id) == rollout
    assert store.get_attempts(rollout.rollout_id) == [attempt]


def test_claim_filters_by_mode(store: Store) -> None:
    train, val = make_rollouts(2, "train"), make_rollouts(1, "val")
    store.enqueue_rollouts([train[0], val[0], train[1]])
    assert claim(store, "val")[0].rollout_id == val[0].rollout_id
    assert store.claim_rollout("w", "val") is None
    assert store.claim_rollout("w", "test") is None
    assert claim(store)[0].rollout_id == train[0].rollout_id
    assert claim(store, "train")[0].rollout_id == train[1].rollout_id


def test_claim_filters_by_batch(store: Store) -> None:
    mine, theirs, also_mine = (
        r.model_copy(update={"batch_id": batch})
        for r, batch in zip(make_rollouts(3), ["b1", "b2", "b1"], strict=True)
    )
    val = make_rollouts(1, "val")[0].model_copy(update={"batch_id": "b1"})
    store.enqueue_rollouts([theirs, mine, val, also_mine])
    first, _ = claim(store, batch_id="b1")
    assert (first.rollout_id, first.batch_id) == (mine.rollout_id, "b1")
    assert store.get_rollout(mine.rollout_id).batch_id == "b1"
    assert claim(store, "train", "b1")[0].rollout_id == also_mine.rollout_id
    assert store.claim_rollout("w", "train", "b1") is None
    assert claim(store, batch_id="b1")[0].rollout_id == val.rollout_id
    assert claim(store)[0].rollout_id == theirs.rollout_id
    assert store.claim_rollout("w") is None


def test_enqueue_rejects_duplicates_and_non_queued_rollouts(store: Store) -> None:
    first = make_rollouts(1)[0]
    store.enqueue_rollouts([first])
    with pytest.raises(StoreError, match=first.rollout_id):
        store.enqueue_rollouts([first.model_copy()])
    running = make_rollouts(1)[0].model_copy(update={"status": RolloutStatus.RUNNING})
    with pytest.raises(StoreError, match="'queued'"):
        store.enqueue_rollouts([running])
    fresh = make_rollouts(1)[0]
    with pytest.raises(StoreError):  # one transaction: the fresh rollout is not added either
        store.enqueue_rollouts([fresh, first.model_copy()])
    with pytest.raises(UnknownRolloutError):
        store.get_rollout(fresh.rollout_id)


def test_enqueue_tasks_makes_groups_of_queued_rollouts_in_task_order(store: Store) -> None:
    tasks = [Task(id=f"t{i}", payload={"i": i}) for i in range(3)]
    new_ids = store.enqueue_tasks(
        tasks, mode="val", resources_version=4, batch_id="b1", group_size=2, max_attempts=3
    )
    made = [store.get_rollout(rid) for rid in new_ids]
    assert [(r.task, r.group_id) for r in made] == [(t, f"{t.id}@b1") for t in tasks for _ in range(2)]
    assert len(set(new_ids)) == 6 and all(re.fullmatch(r"ro-[0-9a-f]{16}", rid) for rid in new_ids)
    shared = {(r.status, r.mode, r.resources_version, r.batch_id, r.max_attempts, r.attempt_count) for r in made}
    assert shared == {(RolloutStatus.QUEUED, "val", 4, "b1", 3, 0)}
    assert len({r.created_at for r in made}) == 1
    assert ids(store.list_rollouts()) == new_ids
    assert [claim(store)[0].rollout_id for _ in made] == new_ids  # claimed in enqueue order
    [alone] = store.enqueue_tasks(tasks[:1])
    assert store.get_rollout(alone).group_id is None  # no batch: grouping falls back to the task id
    assert store.enqueue_tasks([]) == []


def test_enqueue_tasks_rollouts_are_true_rollouts(store: Store) -> None:
    """The memory store keeps records made without per-rollout validation: they must behave exactly like
    validated ones (the SQLite store reads validated ones back)."""
    task = Task(id="t", payload={"x": [1, 2]})
    first, second = (store.get_rollout(rid) for rid in store.enqueue_tasks([task], batch_id="b", group_size=2))
    validated = Rollout.model_validate(first.model_dump())
    assert first == validated and first.model_dump_json() == validated.model_dump_json()
    assert first.model_copy(update={"reward": 0.5}).reward == 0.5 and first.reward is None
    if isinstance(store, MemoryStore):
        assert first.model_fields_set == {
            "rollout_id",
            "task",
            "mode",
            "resources_version",
            "batch_id",
            "group_id",
            "max_attempts",
            "created_at",
        }
        first.model_fields_set.add("reward")
        assert "reward" not in second.model_fields_set  # each rollout has its own set


def test_enqueue_tasks_refuses_what_is_not_a_task_batch(store: Store) -> None:
    with pytest.raises(StoreError, match="group_size must be >= 1, got 0"):
        store.enqueue_tasks([Task(id="t", payload={})], group_size=0)
    with pytest.raises(StoreError, match=r"tasks\[1\] must be a Task, got dict"):
        store.enqueue_tasks([Task(id="t", payload={}), {"id": "u"}])  # type: ignore[list-item]
    assert store.list_rollouts() == []


def ids(rollouts: list[Rollout]) -> list[str]:
    return [r.rollout_id for r in rollouts]


def test_list_rollouts_filters_in_creation_order(store: Store) -> None:
    train, val = make_rollouts(2, "train"), make_rollouts(1, "val")
    v1 = train[1].model_copy(update={"resources_version": 1})
    store.enqueue_rollouts([train[0], val[0], v1])
    claim(store, "val")
    assert ids(store.list_rollouts()) == [train[0].rollout_id, val[0].rollout_id, v1.rollout_id]
    assert ids(store.list_rollouts(status=RolloutStatus.QUEUED)) == [train[0].rollout_id, v1.rollout_id]
    assert ids(store.list_rollouts(mode="val")) == [val[0].rollout_id]
    assert ids(store.list_rollouts(resources_version=1)) == [v1.rollout_id]
    assert store.list_rollouts(status=RolloutStatus.RUNNING, mode="train") == []


# -- attempts -------------------------------------------------------------------------------------------
def test_requeue_retries_until_max_attempts(store: Store) -> None:
    rollout = make_rollouts(1, max_attempts=2)[0]
    store.enqueue_rollouts([rollout])
    first, attempt_no = claim(store)
    requeued = store.finish_attempt(
        rollout.rollout_id, attempt_no, RolloutStatus.TIMED_OUT, error="slow", requeue=True
    )
    assert requeued.status is RolloutStatus.QUEUED and requeued.ended_at is None
    second, attempt_no = claim(store)
    assert (second.attempt_count, attempt_no) == (2, 2)
    assert second.started_at == first.started_at  # the first claim started the rollout
    with pytest.raises(StoreError, match="max_attempts=2"):
        store.finish_attempt(rollout.rollout_id, 2, RolloutStatus.FAILED, requeue=True)
    final = store.finish_attempt(rollout.rollout_id, 2, RolloutStatus.SUCCEEDED, reward=0.75)
    assert (final.status, final.reward, final.error) == (RolloutStatus.SUCCEEDED, 0.75, None)
    assert final.ended_at is not None
    attempts = store.get_attempts(rollout.rollout_id)
    assert [(a.attempt_no, a.status, a.error) for a in attempts] == [
        (1, RolloutStatus.TIMED_OUT, "slow"),
        (2, RolloutStatus.SUCCEEDED, None),
    ]
    assert all(a.ended_at is not None for a in attempts)


def test_requeued_rollout_keeps_its_place_in_the_queue(store: Store) -> None:
    older, newer = make_rollouts(2, max_attempts=3)
    store.enqueue_rollouts([older, newer])
    _, attempt_no = claim(store)
    store.finish_attempt(older.rollout_id, attempt_no, RolloutStatus.FAILED, requeue=True)
    assert claim(store)[0].rollout_id == older.rollout_id


def test_failed_final_attempt_records_the_error(store: Store) -> None:
    rollout = make_rollouts(1)[0]
    store.enqueue_rollouts([rollout])
    claim(store)
    final = store.finish_attempt(rollout.rollout_id, 1, RolloutStatus.FAILED, error="ValueError: bad")
    assert (final.status, final.reward, final.error) == (RolloutStatus.FAILED, None, "ValueError: bad")


def test_finishing_twice_is_an_error(store: Store) -> None:
    rollout = make_rollouts(1, max_attempts=3)[0]
    store.enqueue_rollouts([rollout])
    claim(store)
    done = store.finish_attempt(rollout.rollout_id, 1, RolloutStatus.SUCCEEDED, reward=1.0)
    for requeue in (False, True):
        with pytest.raises(StoreError, match="already finished"):
            store.finish_attempt(rollout.rollout_id, 1, RolloutStatus.FAILED, reward=0.0, requeue=requeue)
    assert store.get_rollout(rollout.rollout_id) == done


@pytest.mark.parametrize(
    ("attempt_no", "status", "requeue", "message"),
    [
        (2, RolloutStatus.FAILED, False, "not its open attempt"),
        (0, RolloutStatus.FAILED, False, "not its open attempt"),
        (1, RolloutStatus.RUNNING, False, "final status"),
        (1, RolloutStatus.QUEUED, True, "final status"),
        (1, RolloutStatus.SUCCEEDED, True, "only a failed or timed_out"),
        (1, RolloutStatus.CANCELLED, True, "only a failed or timed_out"),
    ],
)
def test_finish_refuses_a_wrong_attempt_or_status(
    store: Store, attempt_no: int, status: RolloutStatus, requeue: bool, message: str
) -> None:
    rollout = make_rollouts(1, max_attempts=3)[0]
    store.enqueue_rollouts([rollout])
    running, _ = claim(store)
    with pytest.raises(StoreError, match=message):
        store.finish_attempt(rollout.rollout_id, attempt_no, status, requeue=requeue)
    assert store.get_rollout(rollout.rollout_id) == running


def test_a_reward_must_be_finite(store: Store) -> None:
    rollout = make_rollouts(1)[0]
    store.enqueue_rollouts([rollout])
    claim(store)
    with pytest.raises(StoreError, match="reward must be a finite number"):
        store.finish_attempt(rollout.rollout_id, 1, RolloutStatus.SUCCEEDED, reward=float("nan"))
    assert store.get_rollout(rollout.rollout_id).status is RolloutStatus.RUNNING


def test_finishing_a_queued_rollout_is_an_error(store: Store) -> None:
    rollout = make_rollouts(1)[0]
    store.enqueue_rollouts([rollout])
    with pytest.raises(StoreError, match="not its open attempt"):
        store.finish_attempt(rollout.rollout_id, 1, RolloutStatus.SUCCEEDED)


def test_returned_records_do_not_change_afterwards(store: Store) -> None:
    rollout = make_rollouts(1)[0]
    store.enqueue_rollouts([rollout])
    claimed = store.claim_rollout("w")
    assert claimed is not None
    store.finish_attempt(rollout.rollout_id, 1, RolloutStatus.SUCCEEDED, reward=1.0)
    assert claimed[0].status is RolloutStatus.RUNNING and claimed[0].reward is None
    assert claimed[1].status is RolloutStatus.RUNNING and claimed[1].ended_at is None


def test_cancel_stops_queued_and_running_rollouts_only(store: Store) -> None:
    done, running, queued = make_rollouts(3)
    store.enqueue_rollouts([done, running, queued])
    claim(store)
    store.finish_attempt(done.rollout_id, 1, RolloutStatus.SUCCEEDED, reward=1.0)
    claim(store)
    store.cancel_rollouts([done.rollout_id, running.rollout_id, queued.rollout_id])
    assert store.get_rollout(done.rollout_id).status is RolloutStatus.SUCCEEDED
    for rid in (running.rollout_id, queued.rollout_id):
        cancelled = store.get_rollout(rid)
        assert cancelled.status is RolloutStatus.CANCELLED and cancelled.ended_at is not None
    [attempt] = store.get_attempts(running.rollout_id)
    assert attempt.status is RolloutStatus.CANCELLED and attempt.ended_at is not None
    assert store.get_attempts(queued.rollout_id) == []
    assert store.claim_rollout("w") is None
    with pytest.raises(StoreError, match="already finished"):  # the worker that ran it reports too late
        store.finish_attempt(running.rollout_id, 1, RolloutStatus.SUCCEEDED, reward=1.0)


def test_cancel_with_an_unknown_id_changes_nothing(store: Store) -> None:
    rollout = make_rollouts(1)[0]
    store.enqueue_rollouts([rollout])
    with pytest.raises(UnknownRolloutError, match="ro-missing"):
        store.cancel_rollouts([rollout.rollout_id, "ro-missing"])
    assert store.get_rollout(rollout.rollout_id).status is RolloutStatus.QUEUED


def test_unknown_rollout_ids_raise(store: Store) -> None:
    calls = [
        lambda: store.get_rollout("ro-missing"),
        lambda: store.get_attempts("ro-missing"),
        lambda: store.get_spans("ro-missing"),
        lambda: store.add_spans([span("ro-missing")]),
        lambda: store.finish_attempt("ro-missing", 1, RolloutStatus.SUCCEEDED),
    ]
    for call in calls:
        with pytest.raises(UnknownRolloutError, match="ro-missing") as info:
            call()
        assert isinstance(info.value, KeyError)


# -- spans ----------------------------------------------------------------------------------------------
def test_span_sequences_keep_rising_across_attempts(store: Store) -> None:
    rollout = make_rollouts(1, max_attempts=2)[0]
    store.enqueue_rollouts([rollout])
    rid = rollout.rollout_id
    claim(store)
    stored = store.add_spans([span(rid, name="a"), span(rid, name="b")])
    assert [s.sequence for s in stored] == [0, 1]
    store.add_spans([span(rid, name="c")])
    store.finish_attempt(rid, 1, RolloutStatus.FAILED, requeue=True)
    claim(store)
    store.add_spans([span(rid, 2, name="d"), span(rid, 2, name="e")])
    all_spans = store.get_spans(rid)
    assert [(s.attempt_no, s.sequence, s.name) for s in all_spans] == [
        (1, 0, "a"),
        (1, 1, "b"),
        (1, 2, "c"),
        (2, 3, "d"),
        (2, 4, "e"),
    ]
    assert [s.name for s in store.get_spans(rid, attempt_no=2)] == ["d", "e"]
    assert store.get_spans(rid, attempt_no=3) == []


def test_spans_with_given_sequences_come_back_in_order(store: Store) -> None:
    rollout = make_rollouts(1)[0]
    store.enqueue_rollouts([rollout])
    rid = rollout.rollout_id
    store.add_spans([span(rid, sequence=5, name="late"), span(rid, sequence=2, name="early")])
    store.add_spans([span(rid, name="auto")])  # goes after the highest given number
    assert [(s.sequence, s.name) for s in store.get_spans(rid)] == [(2, "early"), (5, "late"), (6, "auto")]
    with pytest.raises(StoreError, match="sequence"):
        store.add_spans([span(rid, sequence=2, name="clash")])
    dup = span(rid, name="dup")
    with pytest.raises(StoreError, match="span_id"):
        store.add_spans([dup, dup.model_copy(update={"name": "again"})])
    assert [s.name for s in store.get_spans(rid)] == ["early", "late", "auto"]


def test_spans_keep_their_attributes(store: Store) -> None:
    rollout = make_rollouts(1)[0]
    store.enqueue_rollouts([rollout])
    attributes = {
        "prompt_ids": [1, 2, 3],
        "logprobs": [-0.5, -1.25],
        "messages": [{"role": "user", "content": "hé"}],
    }
    original = Span(
        rollout_id=rollout.rollout_id, kind=SpanKind.LLM, name="chat", attributes=attributes, end_time=2.5
    )
    [stored] = store.add_spans([original])
    assert store.get_spans(rollout.rollout_id) == [stored]
    assert stored.attributes == attributes and stored.kind is SpanKind.LLM


def test_a_batch_with_an_unknown_rollout_adds_nothing(store: Store) -> None:
    rollout = make_rollouts(1)[0]
    store.enqueue_rollouts([rollout])
    with pytest.raises(UnknownRolloutError):
        store.add_spans([span(rollout.rollout_id), span("ro-missing")])
    assert store.get_spans(rollout.rollout_id) == []


# -- spans written behind (add_spans_nowait) and rollouts answered at once (get_rollout_nowait) -----------
def test_nowait_takes_only_spans_of_running_attempts(store: Store) -> None:
    first, queued = make_rollouts(2, max_attempts=2)
    store.enqueue_rollouts([first, queued])
    rid = first.rollout_id
    assert store.add_spans_nowait([span(rid)]) is False  # queued, not running
    claimed, attempt_no = claim(store)
    assert store.get_rollout_nowait(rid) == claimed
    refused = [[span(queued.rollout_id)], [span(rid, 2)], [span(rid, sequence=7)], [span("ro-missing")]]
    for spans in refused:
        assert store.add_spans_nowait(spans) is False
    assert store.add_spans_nowait([span(rid, name="a"), span(rid, name="b")]) is True
    store.add_spans([span(rid, name="c")])  # after the ones taken before it
    assert store.add_spans_nowait([span(rid, name="d")]) is True
    assert [(s.sequence, s.name) for s in store.get_spans(rid)] == [(0, "a"), (1, "b"), (2, "c"), (3, "d")]
    store.finish_attempt(rid, attempt_no, RolloutStatus.FAILED, requeue=True)
    assert store.add_spans_nowait([span(rid, name="late")]) is False
    claim(store)
    assert store.add_spans_nowait([span(rid, attempt_no + 1, name="retry")]) is True
    store.cancel_rollouts([rid])
    assert store.add_spans_nowait([span(rid, attempt_no + 1, name="after cancel")]) is False
    assert [s.name for s in store.get_spans(rid)] == ["a", "b", "c", "d", "retry"]
    assert store.get_rollout_nowait("ro-missing") is None


def test_sqlite_nowait_answers_only_for_rollouts_it_claimed(tmp_path: Path) -> None:
    """Another store object on the file (another process) finishes them: only add_spans would be durable."""
    runner, gateway = SqliteStore(tmp_path / "store.sqlite"), SqliteStore(tmp_path / "store.sqlite")
    rollout = make_rollouts(1)[0]
    runner.enqueue_rollouts([rollout])
    claim(runner)
    assert gateway.get_rollout_nowait(rollout.rollout_id) is None
    assert gateway.add_spans_nowait([span(rollout.rollout_id)]) is False
    assert runner.get_rollout_nowait(rollout.rollout_id) is not None
    runner.finish_attempt(rollout.rollout_id, 1, RolloutStatus.SUCCEEDED, reward=1.0)
    assert runner.get_rollout_nowait(rollout.rollout_id) is None
    runner.close()
    gateway.close()


def test_a_finished_rollouts_spans_are_durable_when_finish_returns(tmp_path: Path) -> None:
    store, other = SqliteStore(tmp_path / "store.sqlite"), SqliteStore(tmp_path / "store.sqlite")
    first, second = make_rollouts(2)
    store.enqueue_rollouts([first, second])
    claim(store)
    claim(store)
    assert store.add_spans_nowait([span(first.rollout_id, name="a"), span(second.rollout_id, name="b")])
    assert other.get_spans(first.rollout_id) == []  # in memory only, so far
    store.finish_attempt(first.rollout_id, 1, RolloutStatus.SUCCEEDED, reward=1.0)
    # one transaction with the finish: every span waiting is on file now, the other rollout's too
    assert [s.name for s in other.get_spans(first.rollout_id)] == ["a"]
    assert [s.name for s in other.get_spans(second.rollout_id)] == ["b"]
    assert store.add_spans_nowait([span(second.rollout_id, name="c")])
    store.close()  # writes what still waits
    assert [s.name for s in other.get_spans(second.rollout_id)] == ["b", "c"]
    assert other.integrity_check() == []
    other.close()


def test_a_span_taken_while_the_attempt_finishes_is_written_or_refused(sqlite_store: SqliteStore) -> None:
    """The finish takes the waiting spans and ends the writing behind in one step: a span the gateway was
    told is recorded can never miss the finish that the runner then reports."""
    rollout = make_rollouts(1)[0]
    sqlite_store.enqueue_rollouts([rollout])
    claim(sqlite_store)
    taken = 0
    started = threading.Event()

    def gateway() -> None:
        nonlocal taken
        while sqlite_store.add_spans_nowait([span(rollout.rollout_id)]):
            taken += 1
            started.set()

    thread = threading.Thread(target=gateway)
    thread.start()
    started.wait(10)
    finished = sqlite_store.finish_attempt(rollout.rollout_id, 1, RolloutStatus.SUCCEEDED, reward=1.0)
    thread.join(10)
    assert finished.status is RolloutStatus.SUCCEEDED and taken > 0
    reader = SqliteStore(sqlite_store.path)  # what is on file, not what this store caches
    assert len(reader.get_spans(rollout.rollout_id)) == taken
    reader.close()


def test_a_failed_write_puts_the_waiting_spans_back(sqlite_store: SqliteStore) -> None:
    rollout = make_rollouts(1)[0]
    sqlite_store.enqueue_rollouts([rollout])
    claim(sqlite_store)
    waiting = span(rollout.rollout_id, name="waiting")
    assert sqlite_store.add_spans_nowait([waiting])
    with pytest.raises(UnknownRolloutError):  # the transaction that would have written it is rolled back
        sqlite_store.add_spans([span("ro-missing")])
    assert waiting.sequence is None
    assert sqlite_store.add_spans_nowait([span(rollout.rollout_id, name="next")])  # still claimed here
    sqlite_store.finish_attempt(rollout.rollout_id, 1, RolloutStatus.SUCCEEDED, reward=1.0)
    assert [(s.sequence, s.name) for s in sqlite_store.get_spans(rollout.rollout_id)] == [
        (0, "waiting"),
        (1, "next"),
    ]


def test_a_span_that_cannot_be_written_behind_is_logged_and_left_out(
    sqlite_store: SqliteStore, caplog: pytest.LogCaptureFixture
) -> None:
    rollout = make_rollouts(1)[0]
    sqlite_store.enqueue_rollouts([rollout])
    claim(sqlite_store)
    rid = rollout.rollout_id
    bad = Span(rollout_id=rid, kind=SpanKind.TOOL, name="bad", attributes={"result": object()})
    twice = span(rid, name="twice")
    assert sqlite_store.add_spans_nowait([span(rid, name="a"), bad, twice, twice, span(rid, name="b")])
    sqlite_store.finish_attempt(rid, 1, RolloutStatus.SUCCEEDED, reward=1.0)  # the finish is not held up
    assert [s.name for s in sqlite_store.get_spans(rid)] == ["a", "twice", "b"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 2 and "not JSON-serialisable" in errors[0] and twice.span_id in errors[1]
    assert sqlite_store.integrity_check() == []


def test_at_most_so_many_spans_wait(sqlite_store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_module, "MAX_PENDING_SPANS", 2)
    rollout = make_rollouts(1)[0]
    sqlite_store.enqueue_rollouts([rollout])
    claim(sqlite_store)
    rid = rollout.rollout_id
    assert sqlite_store.add_spans_nowait([span(rid), span(rid)])
    assert not sqlite_store.add_spans_nowait([span(rid)])  # the caller's add_spans writes all three
    sqlite_store.add_spans([span(rid)])
    assert sqlite_store.add_spans_nowait([span(rid), span(rid)])


def _nowait_in_child(store: SqliteStore, rollout_id: str, results: multiprocessing.Queue) -> None:
    results.put((store.get_rollout_nowait(rollout_id), store.add_spans_nowait([span(rollout_id)])))


def test_a_forked_process_writes_nothing_behind_for_its_parent(sqlite_store: SqliteStore) -> None:
    rollout = make_rollouts(1)[0]
    sqlite_store.enqueue_rollouts([rollout])
    claim(sqlite_store)
    assert sqlite_store.add_spans_nowait([span(rollout.rollout_id, name="parent's")])
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_nowait_in_child, args=(sqlite_store, rollout.rollout_id, results))
    child.start()
    assert results.get(timeout=30) == (None, False)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert [s.name for s in sqlite_store.get_spans(rollout.rollout_id)] == ["parent's"]


# -- resources ------------------------------------------------------------------------------------------
def resources(version: int, api_key: str = SECRET) -> Resources:
    llm = LLMResource(base_url="http://127.0.0.1:8000/v1", model="policy", api_key=api_key)
    return Resources(version=version, llm=llm, prompts={"system": PromptTemplate(template=f"v{version}")})


def test_resources_versions(store: Store) -> None:
    with pytest.raises(StoreError, match="no resources"):
        store.get_resources()
    store.add_resources(resources(0))
    store.add_resources(resources(2))
    store.add_resources(resources(1))
    assert store.get_resources().version == 2
    assert store.get_resources(1).prompts["system"].template == "v1"
    with pytest.raises(StoreError, match="version 1 is already published"):
        store.add_resources(resources(1))
    with pytest.raises(StoreError, match=r"version 7 is not published; known: \[0, 1, 2\]"):
        store.get_resources(7)


def test_resources_are_kept_without_the_api_key(store: Store) -> None:
    store.add_resources(resources(0))
    store.add_resources(resources(1, api_key="rltrain"))
    assert store.get_resources(0).llm.api_key == "***"
    assert store.get_resources(1).llm.api_key == "rltrain"  # the gateway's public default is no secret


def test_the_api_key_never_reaches_the_sqlite_file(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "store.sqlite")
    store.add_resources(resources(0))
    while_open = {
        file.name: file.read_bytes() for file in tmp_path.iterdir()
    }  # the WAL holds the newest pages
    store.close()
    after_close = {file.name: file.read_bytes() for file in tmp_path.iterdir()}
    assert b"policy" in while_open["store.sqlite-wal"] and b"policy" in after_close["store.sqlite"]
    for name, data in [*while_open.items(), *after_close.items()]:
        assert SECRET.encode() not in data, name


# -- concurrency ----------------------------------------------------------------------------------------
def test_threads_never_claim_a_rollout_twice(store: Store) -> None:
    rollouts = make_rollouts(200)
    store.enqueue_rollouts(rollouts)
    claimed: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def worker(index: int) -> None:
        start.wait()
        while (got := store.claim_rollout(f"w{index}")) is not None:
            claimed[index].append(got[0].rollout_id)
            store.add_spans([span(got[0].rollout_id)])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [rid for ids in claimed for rid in ids]
    assert sorted(everything) == sorted(ids(rollouts))
    assert all(len(store.get_spans(r.rollout_id)) == 1 for r in rollouts)


def _claim_in_process(
    path: str, worker_id: str, start: threading.Barrier, results: multiprocessing.Queue
) -> None:
    store = SqliteStore(path)
    start.wait()
    ids = []
    while (got := store.claim_rollout(worker_id)) is not None:
        ids.append(got[0].rollout_id)
    store.close()
    results.put(ids)


def test_processes_never_claim_a_rollout_twice(sqlite_store: SqliteStore) -> None:
    rollouts = make_rollouts(200)
    sqlite_store.enqueue_rollouts(rollouts)
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(3), ctx.Queue()
    workers = [
        ctx.Process(target=_claim_in_process, args=(str(sqlite_store.path), f"p{i}", start, results))
        for i in range(3)
    ]
    for process in workers:
        process.start()
    per_process = [results.get(timeout=60) for _ in workers]
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    everything = [rid for ids in per_process for rid in ids]
    assert sorted(everything) == sorted(ids(rollouts))
    assert {a.worker_id for r in rollouts for a in sqlite_store.get_attempts(r.rollout_id)} <= {
        "p0",
        "p1",
        "p2",
    }
    assert sqlite_store.integrity_check() == []


def _claim_with_inherited_store(store: SqliteStore, results: multiprocessing.Queue) -> None:
    # Sharing the parent's connection would corrupt the file only by bad luck, so look at it directly.
    inherited = store._conn
    got = store.claim_rollout("forked")
    results.put((None if got is None else got[0].rollout_id, store._conn is not inherited))


def test_a_forked_process_uses_its_own_connection(sqlite_store: SqliteStore) -> None:
    first, second = make_rollouts(2)
    sqlite_store.enqueue_rollouts([first, second])
    claim(sqlite_store)
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_claim_with_inherited_store, args=(sqlite_store, results))
    child.start()
    assert results.get(timeout=30) == (second.rollout_id, True)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert (
        sqlite_store.get_rollout(second.rollout_id).status is RolloutStatus.RUNNING
    )  # parent sees the claim
    assert sqlite_store.claim_rollout("parent") is None
    assert sqlite_store.integrity_check() == []


def test_spans_written_through_another_connection_are_seen(tmp_path: Path) -> None:
    """Each SqliteStore caches decoded spans; another writer on the same file must never make them stale."""
    writer, reader = SqliteStore(tmp_path / "store.sqlite"), SqliteStore(tmp_path / "store.sqlite")
    rollout = make_rollouts(1)[0]
    writer.enqueue_rollouts([rollout])
    rid = rollout.rollout_id
    writer.add_spans([span(rid, name="a")])
    assert [s.name for s in reader.get_spans(rid)] == ["a"]
    writer.add_spans([span(rid, name="b")])
    assert [s.name for s in reader.get_spans(rid)] == ["a", "b"]
    reader.add_spans([span(rid, name="c")])
    writer.add_spans([span(rid, name="d")])  # the writer's cached list missed "c"
    for store in (writer, reader):
        assert [(s.sequence, s.name) for s in store.get_spans(rid)] == [
            (0, "a"),
            (1, "b"),
            (2, "c"),
            (3, "d"),
        ]
    writer.close()
    reader.close()


def test_span_cache_forgets_the_least_recently_used_rollouts() -> None:
    cache = SpanCache(max_bytes=100)
    a, b, c = [span(f"ro-{name}", sequence=0) for name in "abc"]
    cache.added("ro-a", 0, [a], 40)
    cache.added("ro-b", 0, [b], 40)
    assert cache.get("ro-a", 1) == [a]  # now ro-b is the least recently used
    cache.added("ro-c", 0, [c], 40)
    assert cache.get("ro-b", 1) is None
    assert cache.get("ro-a", 1) == [a] and cache.get("ro-c", 1) == [c]
    assert cache.get("ro-a", 2) is None  # the file holds more than the cache knows: stale, dropped
    assert cache.get("ro-a", 1) is None


def test_span_cache_keeps_spans_in_order_and_drops_what_it_cannot_extend() -> None:
    cache = SpanCache()
    first, late, early = span("ro-a", 1, 0), span("ro-a", 2, 5), span("ro-a", 1, 3)
    cache.added("ro-a", 0, [first], 10)
    cache.added("ro-a", 1, [late, early], 20)
    assert cache.get("ro-a", 3) == [first, early, late]
    cache.added("ro-a", 4, [span("ro-a", 2, 6)], 10)  # one span was added elsewhere in between
    assert cache.get("ro-a", 5) is None
    cache.added("ro-b", 2, [span("ro-b", 1, 2)], 10)  # the earlier spans were never seen here
    assert cache.get("ro-b", 3) is None


# -- durability -----------------------------------------------------------------------------------------
def test_sqlite_store_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "run" / "store.sqlite"
    store = SqliteStore(path)
    rollouts = make_rollouts(3, max_attempts=2)
    store.enqueue_rollouts(rollouts)
    first, _ = claim(store)
    store.add_spans([span(first.rollout_id), span(first.rollout_id)])
    store.add_resources(resources(0))
    before = (store.list_rollouts(), store.get_attempts(first.rollout_id), store.get_spans(first.rollout_id))
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get_rollout(first.rollout_id)

    reopened = SqliteStore(path)
    assert (
        reopened.list_rollouts(),
        reopened.get_attempts(first.rollout_id),
        reopened.get_spans(first.rollout_id),
    ) == before
    assert reopened.get_resources().version == 0
    assert [s.sequence for s in reopened.add_spans([span(first.rollout_id)])] == [2]
    assert claim(reopened)[0].rollout_id == rollouts[1].rollout_id
    assert reopened.integrity_check() == []
    reopened.close()


def _work_until_killed(path: str, busy: threading.Event) -> None:
    store = SqliteStore(path)
    while True:
        store.enqueue_rollouts(make_rollouts(5, max_attempts=2))
        for _ in range(5):
            got = store.claim_rollout("doomed")
            assert got is not None
            rid, attempt_no = got[0].rollout_id, got[1].attempt_no
            store.add_spans([span(rid, attempt_no), span(rid, attempt_no)])
            store.finish_attempt(rid, attempt_no, RolloutStatus.FAILED, requeue=attempt_no == 1)
        busy.set()


def test_a_killed_writer_leaves_a_sound_file(sqlite_store: SqliteStore) -> None:
    ctx = multiprocessing.get_context("spawn")
    busy = ctx.Event()
    worker = ctx.Process(target=_work_until_killed, args=(str(sqlite_store.path), busy))
    worker.start()
    assert busy.wait(timeout=60)
    os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
    worker.join(timeout=30)
    assert worker.exitcode == -signal.SIGKILL
    reopened = SqliteStore(sqlite_store.path)
    assert reopened.integrity_check() == []
    assert reopened.list_rollouts(status=RolloutStatus.FAILED)  # its committed work survived
    reopened.close()


def test_integrity_check_passes_a_busy_store(sqlite_store: SqliteStore) -> None:
    rollouts = make_rollouts(4, max_attempts=2)
    sqlite_store.enqueue_rollouts(rollouts)
    for _ in range(4):  # rollout 0 fails once then succeeds, rollout 1 likewise
        rollout, attempt_no = claim(sqlite_store)
        sqlite_store.add_spans([span(rollout.rollout_id, attempt_no)])
        retry = attempt_no == 1
        sqlite_store.finish_attempt(rollout.rollout_id, attempt_no, RolloutStatus.FAILED, requeue=retry)
    claim(sqlite_store)  # rollout 2 stays running
    sqlite_store.cancel_rollouts([rollouts[3].rollout_id])
    assert sqlite_store.integrity_check() == []


@pytest.mark.parametrize(
    ("corruption", "problem"),
    [
        (
            (
                "INSERT INTO spans (rollout_id, attempt_no, sequence, span_id, kind, name, span) "
                "VALUES ('ro-gone', 1, 0, 'sp-orphan', 'log', 'x', '{}')"
            ),
            "span of an unknown rollout (span_id, rollout_id): sp-orphan, ro-gone",
        ),
        ("UPDATE attempts SET status = 'failed'", "running rollout without an open attempt"),
        ("UPDATE rollouts SET status = 'succeeded'", "open attempt that is not its running rollout's latest"),
        ("UPDATE rollouts SET attempt_count = 2", "attempt numbers not 1..attempt_count"),
        (
            "DROP INDEX spans_order; DROP INDEX spans_ids; INSERT INTO spans SELECT * FROM spans",
            "duplicate span sequence (rollout_id, attempt_no, sequence, count)",
        ),
    ],
)
def test_integrity_check_finds_broken_invariants(
    sqlite_store: SqliteStore, corruption: str, problem: str
) -> None:
    rollout = make_rollouts(1)[0]
    sqlite_store.enqueue_rollouts([rollout])
    claim(sqlite_store)
    sqlite_store.add_spans([span(rollout.rollout_id)])
    raw = sqlite3.connect(sqlite_store.path)
    raw.executescript(corruption)
    raw.close()
    problems = sqlite_store.integrity_check()
    assert any(p.startswith(problem) for p in problems), problems


def test_sqlite_store_refuses_what_it_cannot_store(sqlite_store: SqliteStore) -> None:
    rollout = make_rollouts(1)[0]
    sqlite_store.enqueue_rollouts([rollout])
    bad = Span(rollout_id=rollout.rollout_id, kind=SpanKind.TOOL, name="t", attributes={"result": object()})
    with pytest.raises(StoreError, match="not JSON-serialisable"):
        sqlite_store.add_spans([bad])
    assert bad.sequence is None and sqlite_store.get_spans(rollout.rollout_id) == []
    with pytest.raises(StoreError, match="not JSON-serialisable"):
        sqlite_store.enqueue_rollouts([Rollout(task=Task(id="t", payload={"x": object()}))])


def test_sqlite_store_refuses_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="is a directory"):
        SqliteStore(tmp_path)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="garbage.sqlite"):
        SqliteStore(garbage)
    future = tmp_path / "future.sqlite"
    raw = sqlite3.connect(future)
    raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(StoreError, match="schema version 99"):
        SqliteStore(future)


def test_open_store(tmp_path: Path) -> None:
    assert isinstance(open_store("memory", None), MemoryStore)
    sqlite_store = open_store("sqlite", tmp_path / "store.sqlite")
    assert isinstance(sqlite_store, SqliteStore)
    sqlite_store.close()
    with pytest.raises(StoreError, match="needs a path"):
        open_store("sqlite", None)
    with pytest.raises(StoreError, match="'postgres' is unknown"):
        open_store("postgres", tmp_path)  # type: ignore[arg-type]
