"""The escalation report: one markdown table and one plot comparing every rung the ladder climbed.

Accuracy alone hides majority-class collapse (CALIBRATION.md), so each rung also shows its top answers, and the
environment's trivial policies (always ``No Room``, a random feasible room, ...) are drawn as reference lines:
a rung below the random-feasible policy has not learnt the task, whatever its accuracy says.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rltrain.escalation import LadderResult
from rltrain.metrics import EvalSummary

logger = logging.getLogger(__name__)


def _top_answers(summary: EvalSummary, k: int = 3) -> str:
    dist = summary.answer_distribution
    return ", ".join(f"{answer} {share:.0%}" for answer, share in list(dist.items())[:k]) or "-"


def _answers_table(ladder: LadderResult, sets: list[str]) -> list[str]:
    """Per rung and set: the top answers. A set of other requests (or other catalogs, whose answers are places in
    the catalog, ``room #1`` ...) can collapse onto an answer where the first set does not."""
    lines = ["", "Top answers per set:", "",
             "| rung | " + " | ".join(f"`{s}`" for s in sets) + " |",
             "| --- | " + " | ".join("---" for _ in sets) + " |"]
    for rung in ladder.rungs:
        lines.append(f"| {rung.name} | " + " | ".join(_top_answers(s) for s in rung.summaries) + " |")
    return lines


def _tool_table(ladder: LadderResult, sets: list[str]) -> list[str]:
    """Per rung and set: the share of llm calls that called the tool and the share of tool calls it accepted
    (a tool agent that never calls, or calls badly, answers blind)."""
    lines = ["", "Tool use per set: llm calls that called the tool / tool calls the tool accepted:", "",
             "| rung | " + " | ".join(f"`{s}`" for s in sets) + " |",
             "| --- | " + " | ".join("---" for _ in sets) + " |"]
    for rung in ladder.rungs:
        cells = []
        for s in rung.summaries:
            valid = "-" if s.valid_call_rate is None else f"{s.valid_call_rate:.0%}"
            cells.append(f"{s.tool_call_rate:.0%} / {valid}")
        lines.append(f"| {rung.name} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(ladder: LadderResult) -> str:
    sets = [s.task_set for s in ladder.rungs[0].summaries] if ladder.rungs else []
    lines = [
        f"# Escalation report: {ladder.recipe}",
        "",
        f"Target: accuracy >= {ladder.target:.3f} on `{sets[0] if sets else '?'}`. "
        + (f"Reached at rung **{ladder.reached}**." if ladder.reached else "Not reached by any rung."),
        "",
        ("Every rung is evaluated greedily on the same sets, which no rung trains on. Agent tokens count the "
         "rung's training and evaluation rollouts; cost prices tokens with the recipe's `pricing` table "
         "(a local model's tokens are free: its cost is the wall time)."
         + (f" The RL rung's adapter is chosen on `{ladder.selection_set}` (selection), a set of its own: the "
            "other sets' accuracies are not chosen on." if ladder.selection_set else "")),
        "",
        "| rung | " + " | ".join(f"accuracy `{s}`" + (" (selection)" if s == ladder.selection_set else "")
                                 for s in sets)
        + " | top answers (first set) | agent tokens | optimiser tokens | cost | wall |",
        "| --- | " + " | ".join("---" for _ in sets) + " | --- | --- | --- | --- | --- |",
    ]
    for rung in ladder.rungs:
        accs = " | ".join(f"{s.accuracy:.3f}" for s in rung.summaries)
        lines.append(f"| {rung.name} | {accs} | {_top_answers(rung.summaries[0])} | {rung.agent_tokens:,} | "
                     f"{rung.optimiser_tokens:,} | ${rung.cost:.4f} | {rung.wall_s / 60:.1f} min |")
    if len(sets) > 1 and any(s.answer_distribution for rung in ladder.rungs for s in rung.summaries):
        lines += _answers_table(ladder, sets)
    if any(s.llm_calls and s.tool_spans for rung in ladder.rungs for s in rung.summaries):
        lines += _tool_table(ladder, sets)
    if ladder.reference_policies:
        policies = list(next(iter(ladder.reference_policies.values())))
        lines += ["", "Trivial policies on the same sets (no model):", "",
                  "| policy | " + " | ".join(f"`{s}`" for s in ladder.reference_policies) + " |",
                  "| --- | " + " | ".join("---" for _ in ladder.reference_policies) + " |"]
        for policy in policies:
            lines.append(f"| {policy} | " + " | ".join(
                f"{values.get(policy, float('nan')):.3f}" for values in ladder.reference_policies.values()) + " |")
    details = [f"- **{r.name}**: {r.detail}" for r in ladder.rungs if r.detail]
    if details:
        lines += ["", *details]
    lines += ["", "![accuracy per rung](report.png)", ""]
    return "\n".join(lines)


def plot_ladder(ladder: LadderResult, out: Path) -> Path | None:
    """Grouped bars: accuracy per rung per evaluation set, trivial policies of the first set as lines."""
    if not ladder.rungs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [s.task_set for s in ladder.rungs[0].summaries]
    width = 0.8 / len(sets)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, task_set in enumerate(sets):
        xs = [j + i * width for j in range(len(ladder.rungs))]
        ys = [next((s.accuracy for s in r.summaries if s.task_set == task_set), 0.0) for r in ladder.rungs]
        ax.bar(xs, ys, width=width, label=task_set)
    first = ladder.reference_policies.get(sets[0], {})
    for (policy, value), style in zip(first.items(), ["--", ":", "-."], strict=False):
        ax.axhline(value, linestyle=style, color="grey", linewidth=1)
        ax.text(len(ladder.rungs) - 0.5, value, f" {policy}", va="bottom", ha="right", fontsize=7, color="grey")
    ax.axhline(ladder.target, color="green", linewidth=1, alpha=0.6)
    ax.set_xticks([j + width * (len(sets) - 1) / 2 for j in range(len(ladder.rungs))])
    ax.set_xticklabels([r.name for r in ladder.rungs])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (greedy)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(ladder: LadderResult, run_dir: Path) -> Path:
    """``report.md`` and ``report.png`` in ``run_dir``; returns the markdown's path."""
    plot_ladder(ladder, run_dir / "report.png")
    path = run_dir / "report.md"
    path.write_text(render_markdown(ladder))
    logger.info("escalation report: %s", path)
    return path
