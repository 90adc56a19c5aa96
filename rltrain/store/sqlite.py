"""Durable store: one SQLite file in the run directory, shared by threads and processes.

Why it looks like this:

* **WAL + ``synchronous=NORMAL``**: readers never block the writer and a commit costs no fsync (only a
  checkpoint does). A killed process loses nothing it committed; a power cut may lose the last commits but
  never corrupts the file.
* **Every write is one ``BEGIN IMMEDIATE`` transaction**: the write lock is taken before the first read, so
  two processes can never both see the same queued rollout and claim it; the loser waits (``busy_timeout``)
  instead of failing. Batches (``enqueue_rollouts``, ``add_spans``) are one transaction and ``executemany``.
* **One connection per store object, guarded by a lock**: threads of one process are serialised by the lock
  (cheap) rather than by SQLite's file locks (which back off by sleeping). A process that inherits the
  object through ``fork`` opens its own connection.
* **A span is stored as its JSON** next to the columns that index it, appended in commit order so that a
  batch fills neighbouring pages (a table clustered by rollout wrote half again as many pages per commit).
  Reading spans back (the adapters' hot path) is served by a :class:`~rltrain.store.span_cache.SpanCache`
  of decoded spans, checked against the file by a ``COUNT``; on a miss, one index range scan and one
  pydantic ``validate_json`` of the joined array, several times faster than rebuilding models field by field.
* **Rows are never deleted**, so the ``INTEGER PRIMARY KEY`` of a rollout is its enqueue position: the claim
  order and the creation order.
* **Spans can be written behind**, for the rollouts this store object claimed and still runs: the gateway's
  ``add_spans_nowait`` only puts them in memory, and the next write transaction of this store (at the latest
  the ``finish_attempt`` of the rollout, whose transaction they join) numbers and writes them. A commit costs
  about 0.25 ms, half of what the gateway may add to a chat call; this way no chat call waits for one, and a
  finished rollout's spans are still durable before its finish is. A rollout claimed elsewhere (another
  process) gets its spans written at once, by ``add_spans``, since its finish is not this store's to delay.
* **No secrets**: resources are stored through :func:`rltrain.store.rules.public_resources`.

The ownership rule of :mod:`rltrain.store` applies: spans given to ``add_spans`` and spans returned by
``get_spans`` may be the cache's own objects.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from rltrain.store import rules
from rltrain.store.base import StoreError, UnknownRolloutError
from rltrain.store.span_cache import SpanCache
from rltrain.types import Attempt, Resources, Rollout, RolloutStatus, Span, Task

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
#: WAL pages between automatic checkpoints (SQLite's default is 1000). Each checkpoint fsyncs; a 16 MB WAL
#: makes them four times rarer and lets pages rewritten meanwhile (the queue's) be copied once.
WAL_CHECKPOINT_PAGES = 4000
#: spans that add_spans_nowait keeps in memory at most before it declines (and add_spans writes them all)
MAX_PENDING_SPANS = 4096

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    position INTEGER PRIMARY KEY,  -- enqueue order (rows are never deleted): creation and claim order
    rollout_id TEXT NOT NULL UNIQUE,
    task TEXT NOT NULL,                          -- JSON of Task
    status TEXT NOT NULL,
    resources_version INTEGER NOT NULL,
    mode TEXT NOT NULL,
    batch_id TEXT,
    group_id TEXT,
    attempt_count INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    reward REAL,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    ended_at REAL
);
CREATE INDEX IF NOT EXISTS rollouts_queued ON rollouts(position, mode, batch_id) WHERE status = 'queued';
CREATE TABLE IF NOT EXISTS attempts (
    rollout_id TEXT NOT NULL,
    attempt_no INTEGER NOT NULL,
    status TEXT NOT NULL,
    worker_id TEXT,
    started_at REAL NOT NULL,
    ended_at REAL,
    error TEXT,
    PRIMARY KEY (rollout_id, attempt_no)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spans (             -- appended in commit order: a batch fills neighbouring pages
    rollout_id TEXT NOT NULL,
    attempt_no INTEGER NOT NULL,
    sequence INTEGER NOT NULL,
    span_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    span TEXT NOT NULL                           -- JSON of the whole Span, attributes included
);
CREATE UNIQUE INDEX IF NOT EXISTS spans_order ON spans(rollout_id, attempt_no, sequence);
CREATE UNIQUE INDEX IF NOT EXISTS spans_ids ON spans(rollout_id, span_id);
CREATE TABLE IF NOT EXISTS resources (
    version INTEGER PRIMARY KEY,
    data TEXT NOT NULL,                          -- JSON of Resources, api key masked
    created_at REAL NOT NULL
);
"""


_ROLLOUT_FIELDS = (
    "rollout_id",
    "task",
    "status",
    "resources_version",
    "mode",
    "batch_id",
    "group_id",
    "attempt_count",
    "max_attempts",
    "reward",
    "error",
    "created_at",
    "started_at",
    "ended_at",
)
#: rollout_id and task come first; enqueue_tasks sets group_id per row, the rest is the batch's
_GROUP_COLUMN = _ROLLOUT_FIELDS.index("group_id")
_ATTEMPT_FIELDS = ("rollout_id", "attempt_no", "status", "worker_id", "started_at", "ended_at", "error")
_ROLLOUT_COLUMNS = ", ".join(_ROLLOUT_FIELDS)
_ATTEMPT_COLUMNS = ", ".join(_ATTEMPT_FIELDS)

_INSERT_ROLLOUT = (
    f"INSERT INTO rollouts ({_ROLLOUT_COLUMNS}) VALUES ({', '.join('?' * len(_ROLLOUT_FIELDS))})"
)
_UPDATE_ROLLOUT = (
    "UPDATE rollouts SET status = ?, attempt_count = ?, reward = ?, error = ?, started_at = ?, ended_at = ? "
    "WHERE rollout_id = ?"
)
_SELECT_ROLLOUT = f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE rollout_id = ?"
_UPSERT_ATTEMPT = (
    f"INSERT INTO attempts ({_ATTEMPT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (rollout_id, attempt_no) DO UPDATE SET "
    "status = excluded.status, ended_at = excluded.ended_at, error = excluded.error"
)
_SELECT_ATTEMPT = f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE rollout_id = ? AND attempt_no = ?"
_INSERT_SPAN = (
    "INSERT INTO spans (rollout_id, attempt_no, sequence, span_id, kind, name, span) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SPAN_STATE = (  # (1 if the rollout exists else 0, next free sequence, number of stored spans)
    "SELECT COUNT(DISTINCT r.rollout_id), COALESCE(MAX(s.sequence), -1) + 1, COUNT(s.sequence) "
    "FROM rollouts r LEFT JOIN spans s ON s.rollout_id = r.rollout_id WHERE r.rollout_id = ?"
)
_COUNT_SPANS = "SELECT COUNT(*) FROM spans WHERE rollout_id = ?"
_SELECT_SPANS = "SELECT span FROM spans WHERE rollout_id = ? ORDER BY attempt_no, sequence"

_SPAN_LIST = TypeAdapter(list[Span])
# The models' own pydantic-core serializers: the same JSON as ``model_dump_json()`` without its Python wrapper,
# which costs as much as the serialising itself (0.8 µs instead of 1.4 µs for a task). ``Task`` is a
# dataclass, whose serializer lives in a TypeAdapter: the same JSON as ``Rollout.task`` dumps and reads back.
_TASK_JSON = TypeAdapter(Task).serializer.to_json
_SPAN_JSON = Span.__pydantic_serializer__.to_json


@dataclass
class _Transaction:
    """A write transaction in progress: its connection, and what to do once it has committed (under the
    store's lock still) or has been rolled back."""

    conn: sqlite3.Connection
    committed: list[Callable[[], None]] = field(default_factory=list)
    rolled_back: list[Callable[[], None]] = field(default_factory=list)


class SqliteStore:
    """The :class:`~rltrain.store.base.Store` protocol on one SQLite file (``path``; parents are created)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(
                f"sqlite store path {self.path} is a directory; expected a file such as "
                f"{self.path / 'store.sqlite'}"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._span_cache = SpanCache()
        # Spans written behind (add_spans_nowait) and the rollouts that allows. Guarded by _held_lock, which is
        # never held during I/O, so an event loop may take it; whoever holds _lock may take it too, never the
        # other way round.
        self._held_lock = threading.Lock()
        self._held: dict[str, Rollout] = {}  # claimed through this object and not finished through it
        self._pending: list[Span] = []
        self._conn: sqlite3.Connection | None = self._open()
        try:
            self._create_schema()
        except StoreError:
            self.close()
            raise
        logger.debug("opened sqlite store %s (schema version %d)", self.path, SCHEMA_VERSION)

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open sqlite store {self.path}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot open sqlite store {self.path}: {exc}") from exc
        if mode != "wal":
            conn.close()
            raise StoreError(
                f"sqlite store {self.path}: journal_mode is {mode!r}, not 'wal'; the file system does not "
                "support SQLite's WAL (a network share?), put the run directory on a local disk"
            )
        return conn

    def _create_schema(self) -> None:
        with self._write() as tx:
            version = tx.conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise StoreError(
                    f"sqlite store {self.path} has schema version {version}; this rltrain reads version "
                    f"{SCHEMA_VERSION}"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    tx.conn.execute(statement)
            tx.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- connection and transactions ------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[_Transaction]:
        """One write transaction holding SQLite's write lock from its first statement (``BEGIN IMMEDIATE``);
        rolled back on any exception, undoing in memory whatever the transaction registered. SQLite's own
        errors surface as StoreError naming the file."""
        with self._lock:
            tx = _Transaction(self._connection())
            try:
                tx.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield tx
                    tx.conn.execute("COMMIT")
                except BaseException:
                    if tx.conn.in_transaction:
                        tx.conn.execute("ROLLBACK")
                    for undo in tx.rolled_back:
                        undo()
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            for done in tx.committed:
                done()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The connection for reads. Reads need no transaction: rows are never deleted, so a rollout seen once
        stays, and every single statement already sees one consistent snapshot."""
        with self._lock:
            try:
                yield self._connection()
            except sqlite3.Error as exc:
                raise self._error(exc) from exc

    def _error(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(f"sqlite store {self.path}: {type(exc).__name__}: {exc}")

    def _connection(self) -> sqlite3.Connection:
        """The connection of this process. A store object inherited through ``fork`` opens its own: SQLite
        connections must never cross a fork (the parent's is left alone, not closed, in the child), and the
        spans the parent writes behind stay the parent's to write."""
        if self._conn is None:
            raise StoreError(f"sqlite store {self.path} is closed")
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._held_lock = threading.Lock()  # another parent thread may have held the inherited one
            self._held, self._pending = {}, []
            self._conn = self._open()
        return self._conn

    def close(self) -> None:
        """Write the spans still waiting (see :meth:`add_spans_nowait`), then release the file."""
        try:
            if self._pending and self._conn is not None and self._pid == os.getpid():
                with self._write() as tx:
                    self._write_pending(tx)
        finally:
            with self._lock:
                if self._conn is not None and self._pid == os.getpid():  # never close a parent's connection
                    self._conn.close()
                self._conn = None
                with self._held_lock:
                    self._held = {}

    # -- rollouts -------------------------------------------------------------------------------------
    def enqueue_rollouts(self, rollouts: list[Rollout]) -> None:
        for rollout in rollouts:
            rules.check_enqueueable(rollout)
        self._insert_rollouts(
            [rollout.rollout_id for rollout in rollouts],
            [_rollout_insert_row(rollout, _task_json(rollout.task)) for rollout in rollouts],
        )

    def enqueue_tasks(
        self,
        tasks: Sequence[Task],
        *,
        mode: str = "train",
        resources_version: int = 0,
        batch_id: str | None = None,
        group_size: int = 1,
        max_attempts: int = 1,
    ) -> list[str]:
        """Writes the rows straight from the batch's validated template, with no record per rollout; a group's
        rollouts share their task's JSON."""
        batch = rules.new_batch(
            tasks,
            mode=mode,
            resources_version=resources_version,
            batch_id=batch_id,
            group_size=group_size,
            max_attempts=max_attempts,
        )
        if batch is None:
            return []
        tasks_json = {id(task): _task_json(task) for task in tasks}
        shared = _rollout_insert_row(batch.template, "")
        head, tail = shared[2:_GROUP_COLUMN], shared[_GROUP_COLUMN + 1 :]  # around the group_id column
        rows = [
            (rid, tasks_json[id(task)], *head, group_id, *tail)
            for rid, task, group_id in zip(batch.ids, batch.tasks, batch.group_ids)
        ]
        self._insert_rollouts(batch.ids, rows)
        return batch.ids

    def _insert_rollouts(self, ids: list[str], rows: list[tuple[Any, ...]]) -> None:
        with self._write() as tx:
            try:
                tx.conn.executemany(_INSERT_ROLLOUT, rows)
            except sqlite3.IntegrityError as exc:
                raise StoreError(
                    f"rollout_id {_first_duplicate(tx.conn, ids)!r} is already in the store; "
                    "rollout ids must be unique"
                ) from exc

    def claim_rollout(
        self, worker_id: str, mode: str | None = None, batch_id: str | None = None
    ) -> tuple[Rollout, Attempt] | None:
        # The literal status = 'queued' lets SQLite walk the partial index rollouts_queued in claim order.
        where, values = _where({"mode": mode, "batch_id": batch_id}, "status = 'queued'")
        with self._write() as tx:
            row = tx.conn.execute(
                f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE {where} ORDER BY position LIMIT 1", values
            ).fetchone()
            if row is None:
                return None
            rollout, attempt = rules.claim(_rollout_from_row(row), worker_id, time.time())
            _save(tx.conn, rollout, attempt)
            tx.committed.append(lambda: self._hold(rollout))
            return rollout, attempt

    def _hold(self, rollout: Rollout) -> None:
        with self._held_lock:
            self._held[rollout.rollout_id] = rollout

    def finish_attempt(
        self,
        rollout_id: str,
        attempt_no: int,
        status: RolloutStatus,
        reward: float | None = None,
        error: str | None = None,
        requeue: bool = False,
    ) -> Rollout:
        """Also the durability point of spans written behind: every span taken by :meth:`add_spans_nowait`
        before this call (the rollout's own ones included) is written in the same transaction, so **a finished
        rollout's spans are all durable when this returns**; later ones for this rollout are refused there."""
        with self._write() as tx:
            rollout = _load_rollout(tx.conn, rollout_id)
            attempt = _load_attempt(tx.conn, rollout_id, attempt_no)
            rollout, closed = rules.finish(
                rollout, attempt, attempt_no, status, reward, error, requeue, time.time()
            )
            self._write_pending(tx, release=(rollout_id,))
            _save(tx.conn, rollout, closed)
            return rollout

    def cancel_rollouts(self, rollout_ids: list[str]) -> None:
        with self._write() as tx:
            now = time.time()
            for rollout_id in rollout_ids:
                rollout = _load_rollout(tx.conn, rollout_id)
                attempt = _load_attempt(tx.conn, rollout_id, rollout.attempt_count)
                cancelled, closed = rules.cancel(rollout, attempt, now)
                if cancelled is not None:
                    _save(tx.conn, cancelled, closed)
            self._write_pending(tx, release=rollout_ids)

    def get_rollout(self, rollout_id: str) -> Rollout:
        with self._read() as conn:
            return _load_rollout(conn, rollout_id)

    def get_rollout_nowait(self, rollout_id: str) -> Rollout | None:
        if self._pid != os.getpid():
            return None
        return self._held.get(rollout_id)

    def list_rollouts(
        self,
        status: RolloutStatus | None = None,
        mode: str | None = None,
        resources_version: int | None = None,
    ) -> list[Rollout]:
        where, values = _where(
            {
                "status": None if status is None else RolloutStatus(status).value,
                "mode": mode,
                "resources_version": resources_version,
            }
        )
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE {where} ORDER BY position", values
            ).fetchall()
        return [_rollout_from_row(row) for row in rows]

    def get_attempts(self, rollout_id: str) -> list[Attempt]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_ATTEMPT_COLUMNS} FROM attempts WHERE rollout_id = ? ORDER BY attempt_no",
                (rollout_id,),
            ).fetchall()
            if not rows:
                _check_rollout(conn, rollout_id)
        return [_attempt_from_row(row) for row in rows]

    # -- spans ----------------------------------------------------------------------------------------
    def add_spans(self, spans: list[Span]) -> list[Span]:
        with self._write() as tx:
            self._write_pending(tx)  # first, so that sequences follow the order the spans came in
            self._write_spans(tx, spans)
        return spans

    def add_spans_nowait(self, spans: list[Span]) -> bool:
        """Takes the spans into memory only; they are numbered and written at the next durability point (see
        the protocol), so that the gateway's answer never waits for a commit. At most
        ``MAX_PENDING_SPANS`` wait: past that the answer is ``False``, and the caller's ``add_spans`` writes
        them all. A store object inherited through ``fork`` takes nothing."""
        if self._pid != os.getpid():
            return False
        with self._held_lock:
            if len(self._pending) + len(spans) > MAX_PENDING_SPANS:
                return False
            for span in spans:
                held = self._held.get(span.rollout_id)
                if held is None or held.attempt_count != span.attempt_no or span.sequence is not None:
                    return False
            self._pending.extend(spans)
        return True

    def get_spans(self, rollout_id: str, attempt_no: int | None = None) -> list[Span]:
        if self._pending:
            with self._write() as tx:
                self._write_pending(tx)
        with self._read() as conn:
            stored = conn.execute(_COUNT_SPANS, (rollout_id,)).fetchone()[0]
            if stored == 0:
                _check_rollout(conn, rollout_id)
                return []
            spans = self._span_cache.get(rollout_id, stored)
            if spans is None:
                rows = conn.execute(_SELECT_SPANS, (rollout_id,)).fetchall()
                spans = _SPAN_LIST.validate_json("[" + ",".join(row[0] for row in rows) + "]")
                self._span_cache.put(rollout_id, spans, sum(len(row[0]) for row in rows))
        if attempt_no is None:
            return list(spans)
        return [span for span in spans if span.attempt_no == attempt_no]

    def _write_pending(self, tx: _Transaction, release: Sequence[str] = ()) -> None:
        """Write the spans waiting in memory within ``tx``, and stop writing behind for the rollouts in
        ``release`` (they finish in ``tx``). Both happen under one hold of ``_held_lock``: a span is either
        taken before and written here, or refused after. A rollback puts everything back as it was."""
        with self._held_lock:
            pending, self._pending = self._pending, []
            released = {rid: self._held.pop(rid) for rid in release if rid in self._held}
        if not pending and not released:
            return

        def undo() -> None:  # (the spans' sequences are undone by _write_spans)
            with self._held_lock:
                self._pending[:0] = pending
                self._held.update(released)

        tx.rolled_back.append(undo)
        if pending:
            self._write_spans(tx, pending, strict=False)

    def _write_spans(self, tx: _Transaction, spans: list[Span], strict: bool = True) -> None:
        """Number ``spans`` after what the file holds and insert them in ``tx``.

        ``strict`` (``add_spans``): any problem raises and the caller's spans come back as they were.
        Otherwise (spans written behind, whose callers are long gone) a span that cannot be stored is logged
        as an error and left out, so that one bad span never blocks the others nor the finish they ride on.
        """
        given = [span.sequence for span in spans]

        def undo() -> None:
            for span, number in zip(spans, given):
                span.sequence = number

        tx.rolled_back.append(undo)
        next_free: dict[str, int] = {}
        stored_before: dict[str, int] = {}
        for rid in dict.fromkeys(span.rollout_id for span in spans):
            exists, next_free[rid], stored_before[rid] = tx.conn.execute(_SPAN_STATE, (rid,)).fetchone()
            if not exists:
                raise UnknownRolloutError(f"unknown rollout_id {rid!r}")
        for span, number in zip(spans, rules.assign_sequences(spans, next_free)):
            span.sequence = number
        if strict:
            rows = [_span_row(span) for span in spans]
            try:
                tx.conn.executemany(_INSERT_SPAN, rows)
            except sqlite3.IntegrityError as exc:
                raise StoreError(
                    f"add_spans: {exc}; span ids must be unique within a rollout, and so must "
                    "(attempt_no, sequence)"
                ) from exc
            written = spans
        else:
            written, rows = _insert_what_fits(tx.conn, spans)
        # Only committed spans may enter the cache. Whatever other writers add from here on makes the cached
        # count fall short of the file's, and the cache then reloads.
        tx.committed.append(lambda: self._cache_written(stored_before, written, rows))

    def _cache_written(
        self, stored_before: dict[str, int], spans: list[Span], rows: list[tuple[Any, ...]]
    ) -> None:
        per_rollout: dict[str, list[Span]] = {rid: [] for rid in stored_before}
        sizes = dict.fromkeys(stored_before, 0)
        for span, row in zip(spans, rows):
            per_rollout[span.rollout_id].append(span)
            sizes[span.rollout_id] += len(row[-1])
        for rid, before in stored_before.items():
            self._span_cache.added(rid, before, per_rollout[rid], sizes[rid])

    # -- resources ------------------------------------------------------------------------------------
    def add_resources(self, resources: Resources) -> None:
        public = rules.public_resources(resources)
        with self._write() as tx:
            try:
                tx.conn.execute(
                    "INSERT INTO resources (version, data, created_at) VALUES (?, ?, ?)",
                    (public.version, public.model_dump_json(), time.time()),
                )
            except sqlite3.IntegrityError as exc:
                raise StoreError(
                    f"resources version {public.version} is already published; versions are unique"
                ) from exc

    def get_resources(self, version: int | None = None) -> Resources:
        with self._read() as conn:
            if version is None:
                row = conn.execute("SELECT data FROM resources ORDER BY version DESC LIMIT 1").fetchone()
                if row is None:
                    raise StoreError("no resources have been published yet")
            else:
                row = conn.execute("SELECT data FROM resources WHERE version = ?", (version,)).fetchone()
                if row is None:
                    known = [v for (v,) in conn.execute("SELECT version FROM resources ORDER BY version")]
                    raise StoreError(f"resources version {version} is not published; known: {known}")
        return Resources.model_validate_json(row[0])

    # -- checks ---------------------------------------------------------------------------------------
    def integrity_check(self) -> list[str]:
        """Problems found in the file, empty when it is sound: SQLite's own ``PRAGMA integrity_check`` plus
        the store's invariants (no orphan spans or attempts, a running rollout has its open attempt and no
        other rollout has one, attempt numbers run 1..attempt_count, span sequences are unique per attempt).
        Meant for after a crash: it reads every row (after writing the spans waiting in memory)."""
        if self._pending:
            with self._write() as tx:
                self._write_pending(tx)
        problems: list[str] = []
        with self._read() as conn:
            conn.execute("BEGIN")  # one snapshot for all the checks
            try:
                for (message,) in conn.execute("PRAGMA integrity_check"):
                    if message != "ok":
                        problems.append(f"sqlite integrity_check: {message}")
                for name, query in _CONSISTENCY_QUERIES.items():
                    problems.extend(f"{name}: {', '.join(map(str, row))}" for row in conn.execute(query))
            finally:
                conn.execute("COMMIT")
        return problems


# Each query returns one row per violation, at most 20, so a badly broken file still gives a readable report.
_CONSISTENCY_QUERIES = {
    "span of an unknown rollout (span_id, rollout_id)": (
        "SELECT span_id, rollout_id FROM spans "
        "WHERE rollout_id NOT IN (SELECT rollout_id FROM rollouts) LIMIT 20"
    ),
    "attempt of an unknown rollout (rollout_id, attempt_no)": (
        "SELECT rollout_id, attempt_no FROM attempts "
        "WHERE rollout_id NOT IN (SELECT rollout_id FROM rollouts) LIMIT 20"
    ),
    "running rollout without an open attempt (rollout_id, attempt_count)": (
        "SELECT r.rollout_id, r.attempt_count FROM rollouts r WHERE r.status = 'running' AND NOT EXISTS ("
        "SELECT 1 FROM attempts a WHERE a.rollout_id = r.rollout_id AND a.attempt_no = r.attempt_count "
        "AND a.status = 'running') LIMIT 20"
    ),
    "open attempt that is not its running rollout's latest (rollout_id, attempt_no, rollout status)": (
        "SELECT a.rollout_id, a.attempt_no, r.status FROM attempts a JOIN rollouts r USING (rollout_id) "
        "WHERE a.status = 'running' AND (r.status != 'running' OR a.attempt_no != r.attempt_count) LIMIT 20"
    ),
    "attempt numbers not 1..attempt_count (rollout_id, attempt_count, attempts, min, max)": (
        "SELECT r.rollout_id, r.attempt_count, COUNT(a.attempt_no), MIN(a.attempt_no), MAX(a.attempt_no) "
        "FROM rollouts r LEFT JOIN attempts a USING (rollout_id) GROUP BY r.rollout_id "
        "HAVING COUNT(a.attempt_no) != r.attempt_count "
        "OR (r.attempt_count > 0 AND (MIN(a.attempt_no) != 1 OR MAX(a.attempt_no) != r.attempt_count)) "
        "LIMIT 20"
    ),
    "duplicate span sequence (rollout_id, attempt_no, sequence, count)": (
        "SELECT rollout_id, attempt_no, sequence, COUNT(*) FROM spans "
        "GROUP BY rollout_id, attempt_no, sequence HAVING COUNT(*) > 1 LIMIT 20"
    ),
}


# -- queries and rows <-> records ---------------------------------------------------------------------
def _where(filters: dict[str, Any], *conditions: str) -> tuple[str, tuple[Any, ...]]:
    """A WHERE clause and its parameters: the fixed ``conditions`` and ``column = ?`` per filter given."""
    given = {column: value for column, value in filters.items() if value is not None}
    clause = " AND ".join([*conditions, *(f"{column} = ?" for column in given)]) or "1"
    return clause, tuple(given.values())


def _check_rollout(conn: sqlite3.Connection, rollout_id: str) -> None:
    if conn.execute("SELECT 1 FROM rollouts WHERE rollout_id = ?", (rollout_id,)).fetchone() is None:
        raise UnknownRolloutError(f"unknown rollout_id {rollout_id!r}")


def _first_duplicate(conn: sqlite3.Connection, ids: list[str]) -> str | None:
    """The first rollout id of a refused batch that is stored already or repeated in the batch, for the
    message (the failed statement has been undone, so what is stored is what was there before)."""
    seen: set[str] = set()
    for rid in ids:
        if rid in seen or conn.execute("SELECT 1 FROM rollouts WHERE rollout_id = ?", (rid,)).fetchone():
            return rid
        seen.add(rid)
    return None


def _load_rollout(conn: sqlite3.Connection, rollout_id: str) -> Rollout:
    row = conn.execute(_SELECT_ROLLOUT, (rollout_id,)).fetchone()
    if row is None:
        raise UnknownRolloutError(f"unknown rollout_id {rollout_id!r}")
    return _rollout_from_row(row)


def _load_attempt(conn: sqlite3.Connection, rollout_id: str, attempt_no: int) -> Attempt | None:
    row = conn.execute(_SELECT_ATTEMPT, (rollout_id, attempt_no)).fetchone()
    return None if row is None else _attempt_from_row(row)


def _save(conn: sqlite3.Connection, rollout: Rollout, attempt: Attempt | None) -> None:
    """Write back what a state change touched: the rollout's mutable columns and the attempt."""
    conn.execute(
        _UPDATE_ROLLOUT,
        (
            rollout.status.value,
            rollout.attempt_count,
            rollout.reward,
            rollout.error,
            rollout.started_at,
            rollout.ended_at,
            rollout.rollout_id,
        ),
    )
    if attempt is not None:
        conn.execute(
            _UPSERT_ATTEMPT,
            (
                attempt.rollout_id,
                attempt.attempt_no,
                attempt.status.value,
                attempt.worker_id,
                attempt.started_at,
                attempt.ended_at,
                attempt.error,
            ),
        )


def _task_json(task: Task) -> str:
    try:
        return _TASK_JSON(task).decode()
    except ValueError as exc:  # pydantic's serialisation error
        raise StoreError(f"task {task.id!r}: payload is not JSON-serialisable: {exc}") from exc


def _rollout_insert_row(rollout: Rollout, task_json: str) -> tuple[Any, ...]:
    """All columns of a new rollout, in ``_ROLLOUT_FIELDS`` order (``task_json``: its task as JSON)."""
    return (
        rollout.rollout_id,
        task_json,
        rollout.status.value,
        rollout.resources_version,
        rollout.mode,
        rollout.batch_id,
        rollout.group_id,
        rollout.attempt_count,
        rollout.max_attempts,
        rollout.reward,
        rollout.error,
        rollout.created_at,
        rollout.started_at,
        rollout.ended_at,
    )


def _rollout_from_row(row: tuple[Any, ...]) -> Rollout:
    fields = dict(zip(_ROLLOUT_FIELDS, row))
    fields["task"] = json.loads(fields["task"])
    return Rollout.model_validate(fields)


def _attempt_from_row(row: tuple[Any, ...]) -> Attempt:
    return Attempt.model_validate(dict(zip(_ATTEMPT_FIELDS, row)))


def _span_row(span: Span) -> tuple[Any, ...]:
    try:
        data = _SPAN_JSON(span).decode()
    except ValueError as exc:  # pydantic's serialisation error
        raise StoreError(
            f"span {span.span_id} ({span.name}): attributes are not JSON-serialisable: {exc}"
        ) from exc
    return (span.rollout_id, span.attempt_no, span.sequence, span.span_id, span.kind.value, span.name, data)


def _insert_what_fits(
    conn: sqlite3.Connection, spans: list[Span]
) -> tuple[list[Span], list[tuple[Any, ...]]]:
    """Insert spans written behind, leaving out (an error in the log) any that cannot be stored: attributes
    that are not JSON, or a span id that its rollout already has. Returns the spans inserted and their rows.
    One ``executemany`` when all fit, the usual case; row by row only after a refusal."""
    written: list[Span] = []
    rows: list[tuple[Any, ...]] = []
    for span in spans:
        try:
            rows.append(_span_row(span))
        except StoreError as exc:
            logger.error("%s; it was written behind (add_spans_nowait) and is left out", exc)
            continue
        written.append(span)
    conn.execute("SAVEPOINT behind")
    try:
        conn.executemany(_INSERT_SPAN, rows)
        return written, rows
    except sqlite3.IntegrityError:
        conn.execute("ROLLBACK TO behind")
    finally:
        conn.execute("RELEASE behind")
    kept = []
    for span, row in zip(written, rows):
        try:
            conn.execute(_INSERT_SPAN, row)
        except sqlite3.IntegrityError as exc:
            logger.error(
                "span %s (%s) of rollout %s: %s; it was written behind (add_spans_nowait) and is left out",
                span.span_id,
                span.name,
                span.rollout_id,
                exc,
            )
            continue
        kept.append((span, row))
    return [span for span, _ in kept], [row for _, row in kept]
