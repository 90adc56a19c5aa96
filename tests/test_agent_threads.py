"""Sync agents run in reusable daemon threads: reused when idle, never capped by a hung agent."""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from typing import Any

from rltrain.agent import _DaemonWorkers, _in_daemon_thread

_marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="unset")


def test_an_idle_thread_is_reused() -> None:
    workers = _DaemonWorkers()  # a pool of its own: other tests' idle threads would take jobs too
    delivered: queue.SimpleQueue[tuple[Any, BaseException | None]] = queue.SimpleQueue()
    used = set()
    for _ in range(20):
        workers.submit(threading.get_ident, lambda result, error: delivered.put((result, error)))
        thread, error = delivered.get(timeout=10)
        assert error is None
        used.add(thread)
    assert len(used) == 1
    assert threading.main_thread().ident not in used


def test_the_agent_sees_the_callers_contextvars() -> None:
    async def main() -> list[str]:
        seen = []
        for value in ("first", "second"):
            _marker.set(value)
            seen.append(await _in_daemon_thread(_marker.get))
        return seen

    assert asyncio.run(main()) == ["first", "second"]


def test_a_hung_agent_does_not_hold_up_the_next_one_and_errors_reach_the_caller() -> None:
    release = threading.Event()

    def fail() -> None:
        raise KeyError("agent bug")

    async def main() -> tuple[bool, str]:
        hung = _in_daemon_thread(release.wait)
        with_timeout = asyncio.wait_for(asyncio.shield(hung), timeout=0.05)
        try:
            await with_timeout
        except TimeoutError:
            pass
        answer = await asyncio.wait_for(_in_daemon_thread(lambda: "served"), timeout=10)
        try:
            await asyncio.wait_for(_in_daemon_thread(fail), timeout=10)
        except KeyError as exc:
            return hung.done(), f"{answer}, {exc}"
        return hung.done(), answer

    try:
        hung_done, result = asyncio.run(main())
    finally:
        release.set()
    assert not hung_done
    assert result == "served, 'agent bug'"
