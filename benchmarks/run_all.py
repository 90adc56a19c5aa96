"""Run every rltrain-vs-Agent-Lightning benchmark, each in a fresh process, and print one table.

``python benchmarks/run_all.py`` prints the table; ``--update-readme`` also rewrites the results table in
``benchmarks/README.md`` (between its ``<!-- results -->`` markers) with these figures, the date and the machine.
``--only store,adapter`` runs a subset. The whole set takes about 10 minutes on 2 cores, most of it the peer's
imports (~7 s per peer process) and its end-to-end runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Row, log, table

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = {
    "store": "bench_store.py",
    "adapter": "bench_adapter.py",
    "e2e": "bench_e2e.py",
    "gateway": "bench_gateway.py",
    "import": "bench_import.py",
}
README = BENCH_DIR / "README.md"
MARKERS = ("<!-- results -->", "<!-- /results -->")


def run_one(script: str) -> list[Row]:
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), "--json"],
        capture_output=True,
        check=False,
        text=True,
        cwd=BENCH_DIR.parent,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return [Row(**{k: v for k, v in row.items() if k not in ("ratio", "met")}) for row in rows]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def load() -> str:
    """The 1-minute load average: other work on the machine slows both sides, so it is kept with the figures."""
    return f"{os.getloadavg()[0]:.1f}"


def update_readme(rows: list[Row], context: str) -> None:
    text = README.read_text()
    start, end = MARKERS
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise RuntimeError(f"{README} has no {start} ... {end} block to replace")
    block = f"{start}\n{context}\n\n{table(rows, markdown=True)}\n{end}"
    README.write_text(pattern.sub(lambda _: block, text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ", ".join(BENCHMARKS)
    )
    parser.add_argument("--update-readme", action="store_true", help="rewrite the results table in README.md")
    args = parser.parse_args()
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(names) - BENCHMARKS.keys())
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    load_at_start = load()
    log(f"{machine()}, load average {load_at_start}")
    rows: list[Row] = []
    for name in names:
        log(f"== {name}")
        rows += run_one(BENCHMARKS[name])
    context = (
        f"Measured {datetime.date.today().isoformat()} on {machine()}; 1-minute load average {load_at_start} at "
        f"the start, {load()} at the end."
    )
    print(table(rows))
    if args.update_readme:
        update_readme(rows, context)
        log(f"updated {README}")


if __name__ == "__main__":
    main()
