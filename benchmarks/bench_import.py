"""Import time and memory: what a fresh process pays before doing anything.

* ``import rltrain`` vs ``import agentlightning``: seconds for the import statement in a fresh interpreter, and
  the process's peak resident memory (``ru_maxrss``) after it.
* ``rltrain --help`` vs ``agl --help``: wall seconds of the whole fresh CLI process, interpreter start included.

Each figure is the median of 3 fresh processes. Targets (issue 8): ``import rltrain`` <= 1 s, ``rltrain --help``
<= 1.5 s (heavy libraries are imported lazily). ``python benchmarks/bench_import.py`` (``--json`` for rows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPEATS, Row, log, median, report
from _peer import PEER_ENV, peer_python

PROBE = (
    "import resource, sys, time\n"
    "start = time.perf_counter()\n"
    "import {module}\n"
    "elapsed = time.perf_counter() - start\n"
    "rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
    'print(\'{{"import_s": %f, "rss_mb": %f}}\' % (elapsed, rss_mb))\n'
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PEER_ENV)
    return env


def import_figures(python: Path | str, module: str) -> dict[str, float]:
    """Median import seconds and peak RSS (MB) of ``import module`` over fresh processes."""
    runs = []
    for _ in range(REPEATS):
        done = subprocess.run(
            [str(python), "-c", PROBE.format(module=module)],
            env=_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {key: median([run[key] for run in runs]) for key in ("import_s", "rss_mb")}


def cli_seconds(command: list[str]) -> float:
    """Median wall seconds of a fresh ``command`` process (which must exit 0)."""
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        subprocess.run(command, env=_env(), capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return median(times)


def run() -> list[Row]:
    ours_python = Path(sys.executable)
    peer = peer_python()
    log("import: import rltrain / import agentlightning, fresh processes")
    ours = import_figures(ours_python, "rltrain")
    theirs = import_figures(peer, "agentlightning")
    log("import: rltrain --help / agl --help, fresh processes")
    ours_cli = cli_seconds([str(ours_python.parent / "rltrain"), "--help"])
    theirs_cli = cli_seconds([str(peer.parent / "agl"), "--help"])
    return [
        Row(
            "import",
            "import rltrain",
            "s",
            ours["import_s"],
            theirs["import_s"],
            higher_is_better=False,
            target_abs=1.0,
        ),
        Row(
            "import",
            "peak memory after import",
            "MB",
            ours["rss_mb"],
            theirs["rss_mb"],
            higher_is_better=False,
            note="information",
        ),
        Row(
            "import",
            "fresh `rltrain --help` process",
            "s",
            ours_cli,
            theirs_cli,
            higher_is_better=False,
            target_abs=1.5,
            note="peer: `agl --help`",
        ),
    ]


if __name__ == "__main__":
    report(run())
