"""Timing, medians and the one table format every benchmark prints.

A benchmark produces :class:`Row` s: one figure for rltrain, one for the peer (Agent Lightning 0.3.0 unless the
row's note names another), both measured on this machine in the same run, the ratio between them and the target
the issue set for that ratio. The ratio is always oriented so that > 1 means rltrain is better (throughputs: ours /
peer; times, latencies and memory: peer / ours), except where a row has an absolute target instead (``target_abs``).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

REPEATS = 3


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes (``perf_counter``)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def phase_start() -> float:
    """``perf_counter`` after a full garbage collection, to start a timed phase from a collected heap: a
    collection owed to earlier garbage then never lands in the phase (both sides of a benchmark use it)."""
    gc.collect()
    return time.perf_counter()


def per_phase_medians(trials: list[dict[str, float]]) -> dict[str, float]:
    """Median over trials of every key (each trial maps a phase name to a figure)."""
    return {key: median([trial[key] for trial in trials]) for key in trials[0]}


@dataclass
class Row:
    """One line of a benchmark's table.

    ``higher_is_better`` orients the ratio. ``target_ratio`` is the issue's target for that ratio (``None`` when
    the row is judged by ``target_abs``, an absolute bound on rltrain's figure in ``unit``, lower is better).
    """

    benchmark: str
    metric: str
    unit: str
    ours: float
    peer: float | None
    higher_is_better: bool = True
    target_ratio: float | None = None
    target_abs: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.peer is None or self.peer == 0 or self.ours == 0:
            return None
        return self.ours / self.peer if self.higher_is_better else self.peer / self.ours

    @property
    def met(self) -> bool | None:
        if self.target_abs is not None:
            return self.ours <= self.target_abs
        if self.target_ratio is not None and self.ratio is not None:
            return self.ratio >= self.target_ratio
        return None

    def target_text(self) -> str:
        if self.target_abs is not None:
            return f"<= {_fmt(self.target_abs)} {self.unit}"
        if self.target_ratio is not None:
            return f">= {self.target_ratio:g}x"
        return ""

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _verdict(row: Row) -> str:
    return {True: "met", False: "MISSED", None: ""}[row.met]


def table(rows: list[Row], markdown: bool = False) -> str:
    """The rows as a plain-text (or markdown) table."""
    header = ["benchmark", "metric", "rltrain", "peer", "ratio", "target", ""]
    body = [
        [
            row.benchmark,
            f"{row.metric} ({row.unit})",
            _fmt(row.ours),
            _fmt(row.peer),
            "-" if row.ratio is None else f"{row.ratio:.1f}x",
            row.target_text(),
            _verdict(row) + (f" ({row.note})" if row.note else ""),
        ]
        for row in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    render = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([render(header), render(["-" * w for w in widths]), *map(render, body)])


def report(rows: list[Row], argv: list[str] | None = None) -> None:
    """Print the table; with ``--json`` print the rows as JSON instead (what ``run_all.py`` reads)."""
    args = sys.argv[1:] if argv is None else argv
    if "--json" in args:
        print(json.dumps([row.as_dict() for row in rows]))
    else:
        print(table(rows))


def log(message: str) -> None:
    """Progress on stderr, so that stdout carries only the table (or the JSON)."""
    print(message, file=sys.stderr, flush=True)
