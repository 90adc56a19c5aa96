"""The peer, Agent Lightning, in a virtual environment of its own: created on first use, never the project's.

Each benchmark runs the peer's side as a small script embedded in the benchmark file, executed by the peer
venv's python. The script receives one JSON object (the workload spec) on stdin and prints one JSON object as
its last stdout line; everything else it prints (the peer logs generously) is kept for the error message.

Why a separate venv: ``agentlightning`` pins its own versions of openai, litellm, pydantic and
opentelemetry, and pulls in ~800 MB of dependencies; none of that may leak into rltrain's environment.
``LITELLM_LOCAL_MODEL_COST_MAP=True`` keeps litellm's import from fetching its model cost map over the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import venv
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PEER_VENV = BENCH_DIR / ".peer-venv"
PEER_REQUIREMENT = "agentlightning==0.3.0"
PEER_ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "AGENTOPS_LOGGING_TO_FILE": "False"}


class PeerError(RuntimeError):
    """The peer venv could not be built, or a peer script failed or printed no JSON result."""


def peer_python() -> Path:
    """The peer venv's interpreter, building the venv (``pip install agentlightning==0.3.0``) if needed."""
    python = PEER_VENV / "bin" / "python"
    if python.exists() and _has_peer(python):
        return python
    print(f"[peer] building {PEER_VENV} with {PEER_REQUIREMENT} (one time, a few minutes)", file=sys.stderr)
    venv.EnvBuilder(with_pip=True, clear=not python.exists()).create(PEER_VENV)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", PEER_REQUIREMENT],
        env=_env(),
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not _has_peer(python):
        raise PeerError(
            f"pip install {PEER_REQUIREMENT} into {PEER_VENV} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return python


def _has_peer(python: Path) -> bool:
    probe = "import importlib.metadata as m; print(m.version('agentlightning'))"
    done = subprocess.run([str(python), "-c", probe], env=_env(), check=False, capture_output=True, text=True)
    return done.returncode == 0 and done.stdout.strip() == PEER_REQUIREMENT.split("==")[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PEER_ENV)
    return env


def _script_env() -> dict[str, str]:
    """The peer venv's environment with the benchmarks directory on ``sys.path``, so that the script can import
    the stdlib-only workload builders (:mod:`_workloads`) that the rltrain side uses too: both sides get
    byte-identical inputs."""
    env = _env()
    env["PYTHONPATH"] = str(BENCH_DIR)
    return env


def run_peer(script: str, spec: dict[str, Any], timeout_s: float = 600.0) -> dict[str, Any]:
    """Run ``script`` with the peer's python, ``spec`` as JSON on stdin; returns the JSON of its last line."""
    done = subprocess.run(
        [str(peer_python()), "-c", script],
        input=json.dumps(spec),
        env=_script_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=BENCH_DIR,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise PeerError(
            f"peer script failed (exit {done.returncode}):\nstdout tail:\n{done.stdout[-2000:]}\n"
            f"stderr tail:\n{done.stderr[-4000:]}"
        )
    return json.loads(lines[-1])



@contextmanager
def peer_session(
    script: str, spec: dict[str, Any], timeout_s: float = 600.0
) -> Iterator[Callable[[dict[str, Any]], dict[str, Any]]]:
    """A peer script kept running between trials; yields ``request(message) -> answer``. With it a benchmark
    alternates the two systems' trials, so that a change of load on a shared machine slows both alike instead
    of whichever side ran later.

    The script reads the workload spec as its first stdin line, then answers each further line (one JSON
    request) with one JSON line on stdout, and ends at end of input. Other stdout lines are skipped; stderr is
    kept in a temporary file for the error message. The whole session is killed after ``timeout_s``.
    """
    with (
        tempfile.TemporaryFile(mode="w+") as stderr,
        subprocess.Popen(
            [str(peer_python()), "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=_script_env(),
            cwd=BENCH_DIR,
            text=True,
        ) as process,
    ):
        assert process.stdin is not None and process.stdout is not None
        stdin, stdout = process.stdin, process.stdout
        deadline = threading.Timer(timeout_s, process.kill)
        deadline.start()

        def request(message: dict[str, Any]) -> dict[str, Any]:
            try:
                stdin.write(json.dumps(message) + "\n")
                stdin.flush()
            except BrokenPipeError:
                pass  # the script died: reported below, with its stderr
            for line in stdout:
                if line.startswith("{"):
                    return json.loads(line)
            process.wait()
            stderr.seek(0)
            raise PeerError(
                f"peer script ended (exit {process.returncode}) before answering {message}:\n"
                f"stderr tail:\n{stderr.read()[-4000:]}"
            )

        try:
            stdin.write(json.dumps(spec) + "\n")
            yield request
        finally:
            try:
                stdin.close()  # the script's end of input: it exits
            except BrokenPipeError:
                pass
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            deadline.cancel()
