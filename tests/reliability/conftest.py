"""The fault-injection suite: every test here injects one fault (into an agent, the model's output, a process,
an input, a caller) and checks what rltrain guarantees under it; README's "What rltrain guarantees" table points
at them. The tiny random model of ``tests/conftest.py`` stands in for a real one: the faults are about the
plumbing, not the weights.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rltrain.engines.transformers import TransformersEngine


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    """One tiny engine per module, for the tests that leave it running."""
    engine = TransformersEngine.from_pretrained(str(tiny_model_dir), max_batch_size=16)
    yield engine
    engine.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MB tmpfs mounted for the test (real ENOSPC and EROFS); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=False, capture_output=True
    ).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs CAP_SYS_ADMIN)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
