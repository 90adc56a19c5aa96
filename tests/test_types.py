"""``new_id``: ids keep their shape and stay unique across threads and forked processes."""

from __future__ import annotations

import os
import re
import threading

import pytest

from rltrain.types import new_id

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
