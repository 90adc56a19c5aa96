"""``rltrain escalate``: climb the ladder baseline -> APO -> warm start -> RL, cheapest rung first.

Every rung is evaluated the same way (greedy, on ``data.val`` and ``data.extra_eval``, sets no rung trains on),
and the climb stops at the first rung whose accuracy on ``data.val`` reaches ``escalate.target``. Each rung's
cost is recorded next to its accuracy: the agent's tokens (training and evaluation rollouts), the optimiser
LLM's tokens (APO), their estimated price, and wall time.

The run directory holds one sub-run per stage: ``apo/`` (baseline and prompt optimisation, sharing one serving
stack) and ``rl/`` (warm start and GRPO/PPO, with APO's best prompt as the agent's template), plus
``ladder.json``, ``report.md`` and ``report.png`` at the top. Running the same command again continues: rungs
already in ``ladder.json`` are kept, APO resumes from its last round and RL from its newest checkpoint. A recipe
changed only in its ``warm_start:`` or ``algorithm:`` section (say, a warm start refused for a too-short
``max_length`` after a long baseline) continues too, while neither RL rung has finished: the baseline and APO
rungs, which never read those sections, are kept, and the RL stage starts over (the earlier attempt's ``rl/`` is
moved aside, not deleted). Any other change is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from rltrain.metrics import EvalSummary, read_metrics
from rltrain.recipes import Recipe
from rltrain.store.base import Store
from rltrain.types import SpanKind

logger = logging.getLogger(__name__)


class EscalationError(ValueError):
    """A recipe that gives the ladder nothing to climb; the message names the missing section."""


class RungResult(BaseModel):
    """One rung: how the agent did after it, and what it cost."""

    model_config = ConfigDict(extra="forbid")

    name: str
    summaries: list[EvalSummary]
    agent_tokens: int = Field(description="Prompt + completion tokens of the agent's rollouts in this rung.")
    optimiser_tokens: int = Field(default=0, description="Tokens of APO's critic and editor calls.")
    cost: float = Field(default=0.0, description="Estimated price of those tokens (recipe `pricing`).")
    wall_s: float
    detail: str = ""

    @property
    def accuracy(self) -> float:
        return self.summaries[0].accuracy


class LadderResult(BaseModel):
    """The whole climb, as ``ladder.json`` stores it and the report renders it."""

    model_config = ConfigDict(extra="forbid")

    recipe: str
    fingerprint: str = Field(
        default="", description="Hash of the resolved recipe, so a changed recipe never continues a climb."
    )
    prompt_fingerprint: str = Field(
        default="", description="Hash of the recipe without its RL sections (`warm_start`, `algorithm`): what the "
        "baseline and APO rungs read, so that a change to the RL sections alone keeps them."
    )
    target: float
    rungs: list[RungResult] = Field(default_factory=list)
    reached: str | None = Field(default=None, description="The rung that reached the target, if one did.")
    reference_policies: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="Trivial policies' accuracy per evaluation set (when the env has them)."
    )
    selection_set: str | None = Field(
        default=None, description="The recipe's `data.select`: the set the RL rung's adapter was chosen on."
    )

    def rung(self, name: str) -> RungResult | None:
        return next((r for r in self.rungs if r.name == name), None)


#: the recipe sections only the RL stage reads (the warm start and GRPO/PPO)
RL_SECTIONS = frozenset({"warm_start", "algorithm"})


def recipe_fingerprint(recipe: Recipe, exclude: frozenset[str] = frozenset()) -> str:
    """Hash of the recipe's fields that differ from their defaults, without the ``exclude`` sections. Defaults are
    left out so that a schema that gains a field (with a default) still continues a climb an older version
    started; any value the recipe sets still counts."""
    dumped = recipe.model_dump_json(exclude_defaults=True, exclude=set(exclude))
    return hashlib.sha256(dumped.encode()).hexdigest()[:16]


def _tokens_between(store: Store, start: float, end: float) -> int:
    """Agent tokens of the rollouts created in ``[start, end)``: what one rung of a sub-run spent."""
    total = 0
    for rollout in store.list_rollouts():
        if start <= rollout.created_at < end:
            for span in store.get_spans(rollout.rollout_id):
                if span.kind is SpanKind.LLM:
                    usage = span.attributes.get("usage", {})
                    total += int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
    return total


def _first_time(run_dir: Path) -> float | None:
    """When the sub-run wrote its first metric line (the start of its first stage)."""
    times = [r["time"] for r in read_metrics(run_dir / "metrics.jsonl") if "time" in r]
    return min(times) if times else None


def _event_time(run_dir: Path, event: str) -> float | None:
    """When the last metric line of ``event`` was written (the end of that stage)."""
    times = [r["time"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == event and "time" in r]
    return times[-1] if times else None


def validation_trail(run_dir: Path) -> str:
    """The RL rung's validations step by step (``eval/val-step<N>.json``), for the report: the rung records only
    the final one, and a gain that training gives and takes back again is worth seeing."""
    steps = sorted((int(path.stem.removeprefix("val-step")), path) for path in (run_dir / "eval").glob("val-step*.json"))
    parts = []
    for step, path in steps:
        summaries = [EvalSummary.model_validate(s) for s in json.loads(path.read_text())]
        parts.append(f"step {step}: " + " / ".join(f"{s.accuracy:.3f}" for s in summaries))
    return "validation during training (" + ", ".join(parts) + ")" if parts else ""


class Ladder:
    """Runs the rungs a recipe names, recording each in ``ladder.json`` as soon as it is done."""

    def __init__(self, recipe: Recipe, progress: bool = True) -> None:
        if recipe.apo is None and recipe.algorithm is None:
            raise EscalationError("the recipe has neither an `apo:` section nor an `algorithm:` (grpo/ppo) "
                                  "section: there is no rung to climb above the baseline")
        if recipe.algorithm is not None and recipe.algorithm.name not in ("grpo", "ppo"):
            raise EscalationError(f"algorithm.name is {recipe.algorithm.name!r}; the ladder's RL rung runs "
                                  "`grpo` or `ppo` (APO goes in the `apo:` section, a warm start in `warm_start:`)")
        self.recipe = recipe
        self.progress = progress
        self.root = recipe.run_dir
        self.root.mkdir(parents=True, exist_ok=True)
        self.target = recipe.escalate.target if recipe.escalate is not None else 1.0
        path = self.root / "ladder.json"
        fingerprint = recipe_fingerprint(recipe)
        prompt_fingerprint = recipe_fingerprint(recipe, RL_SECTIONS)
        self.result = (LadderResult.model_validate_json(path.read_text()) if path.exists()
                       else LadderResult(recipe=recipe.name, fingerprint=fingerprint,
                                         prompt_fingerprint=prompt_fingerprint, target=self.target,
                                         selection_set=recipe.data.select))
        if self.result.fingerprint != fingerprint:
            self._continue_changed_rl_sections(path, fingerprint, prompt_fingerprint)

    def _continue_changed_rl_sections(self, path: Path, fingerprint: str, prompt_fingerprint: str) -> None:
        """Continue a climb whose recipe changed in its RL sections alone before an RL rung finished: keep the
        prompt rungs, move the earlier RL attempt aside (its demonstrations, metrics and any checkpoint were made
        with the old sections, and a resumed sub-run would mix them in). Refuse any other change."""
        rl_finished = [rung.name for rung in self.result.rungs if rung.name not in ("baseline", "apo")]
        reason = None
        if self.result.prompt_fingerprint != prompt_fingerprint:
            reason = f"changed outside {' and '.join(sorted(RL_SECTIONS))}"
        elif rl_finished:
            reason = f"changed after its RL rungs ({', '.join(rl_finished)}) finished"
        if reason is not None:
            raise EscalationError(
                f"{path} was written by a different recipe ({reason}); a climb continues only with the recipe "
                "that started it. Give this one another name (--name) or remove that run directory"
            )
        rl_dir = self.root / "rl"
        if rl_dir.exists():
            aside = self.root / f"rl.before-{datetime.now():%Y%m%d-%H%M%S}"
            rl_dir.rename(aside)
            logger.warning("the recipe's %s changed since this climb started: the RL stage starts over (the "
                           "earlier attempt is in %s)", " / ".join(sorted(RL_SECTIONS)), aside)
        kept = ", ".join(rung.name for rung in self.result.rungs) or "none"
        logger.info("continuing the climb in %s with the changed RL sections; rungs kept: %s", self.root, kept)
        self.result.fingerprint = fingerprint
        self.save()

    def _sub_recipe(self, stage: str, **update: object) -> Recipe:
        return self.recipe.model_copy(update={"name": stage, "output_dir": str(self.root), **update})

    def _record(self, rung: RungResult) -> bool:
        """Add a finished rung; True when it reached the target (the climb stops)."""
        self.result.rungs.append(rung)
        reached = rung.accuracy >= self.target
        if reached:
            self.result.reached = rung.name
        self.save()
        logger.info("rung %s: %s (target %.3f%s)", rung.name,
                    ", ".join(f"{s.task_set} {s.accuracy:.3f}" for s in rung.summaries), self.target,
                    ", reached" if reached else "")
        return reached

    def save(self) -> None:
        tmp = self.root / "ladder.json.tmp"
        tmp.write_text(self.result.model_dump_json(indent=2))
        tmp.replace(self.root / "ladder.json")

    def climb(self) -> LadderResult:
        if self.result.reached is None and not self._prompt_rungs() and self.recipe.algorithm is not None:
            self._rl_rungs()
        from rltrain.report import write_report

        write_report(self.result, self.root)
        return self.result

    def _prompt_rungs(self) -> bool:
        """Baseline and APO in the ``apo`` sub-run (one serving stack); True when the target was reached."""
        from rltrain.algorithms.apo import AGENT_STAGE, optimise_prompt
        from rltrain.serving import ServingStack
        from rltrain.trainer import Trainer

        if self.result.rung("baseline") and (self.recipe.apo is None or self.result.rung("apo")):
            return self.result.reached is not None
        rl = Trainer(self._sub_recipe("apo", algorithm=None, warm_start=None), progress=self.progress)
        try:
            sets = rl.run.eval_sets()
            policies = getattr(rl.run.env, "reference_policies", None)
            if policies is not None:
                self.result.reference_policies = {name: policies(tasks) for name, tasks in sets.items()}
            with ServingStack(rl.recipe, rl.store) as stack:
                if self.result.rung("baseline") is None:
                    started = time.perf_counter()
                    summaries = rl.run.evaluate(sets, stack=stack, label="baseline")
                    rung = RungResult(name="baseline", summaries=summaries, wall_s=time.perf_counter() - started,
                                      agent_tokens=sum(s.prompt_tokens + s.completion_tokens for s in summaries))
                    if self._record(rung):
                        return True
                if self.recipe.apo is None:
                    return False
                result = optimise_prompt(rl.run, self.recipe.apo, stack)
        finally:
            rl.close()
        agent = result.usage.get(AGENT_STAGE, {})
        optimiser = [u for name, u in result.usage.items() if name != AGENT_STAGE]
        rung = RungResult(
            name="apo", summaries=result.summaries, wall_s=result.wall_s,
            agent_tokens=int(agent.get("prompt_tokens", 0)) + int(agent.get("completion_tokens", 0)),  # type: ignore[call-overload]
            optimiser_tokens=sum(int(u["prompt_tokens"]) + int(u["completion_tokens"]) for u in optimiser),  # type: ignore[call-overload]
            cost=sum(float(u["cost"]) for u in result.usage.values()),  # type: ignore[arg-type]
            detail=f"prompt `{result.prompt_name}`: {result.candidates_scored} candidates scored, "
                   f"{result.candidates_rejected} rejected; minibatch score {result.seed_score:.2f} -> "
                   f"{result.best.score:.2f}",
        )
        return self._record(rung)

    def _rl_rungs(self) -> None:
        """Warm start (when the recipe has one) and GRPO/PPO in the ``rl`` sub-run, from APO's best prompt."""
        from rltrain.algorithms.apo import best_prompts
        from rltrain.trainer import Trainer

        section = self.recipe.algorithm
        assert section is not None
        if self.result.rung(section.name) is not None:
            return
        prompts = self.recipe.prompts
        if self.recipe.apo is not None:
            prompts = best_prompts(self.recipe.prompts, self.root / "apo", self.recipe.apo.prompt)
        rl_dir = self.root / "rl"
        resume = (rl_dir / "checkpoints").exists() or (rl_dir / "warm_start").exists()
        # The baseline / APO rung already scored the base model with these prompts: not again before the warm start.
        warm = self.recipe.warm_start
        warm = warm.model_copy(update={"validate_base": False}) if warm is not None else None
        rl = Trainer(self._sub_recipe("rl", apo=None, prompts=prompts, warm_start=warm), progress=self.progress)
        try:
            final = rl.fit(resume=resume, stop_at=self.target)
            ended = time.time()
            # Rung boundaries come from the sub-run's metrics and the store, not from this process's clock, so a
            # climb resumed after a crash still counts the tokens and time of the stages done before it.
            started = _first_time(rl_dir) or ended
            boundary = _event_time(rl_dir, "warm_start") if self.recipe.warm_start is not None else None
            if boundary is not None and self.result.rung("warm_start") is None:
                warm = [EvalSummary.model_validate(s)
                        for s in json.loads((rl_dir / "eval" / "warm_start.json").read_text())]
                rung = RungResult(name="warm_start", summaries=warm, wall_s=boundary - started,
                                  agent_tokens=_tokens_between(rl.store, started, boundary))
                if self._record(rung):
                    return
            begin = boundary if boundary is not None else started
            self._record(RungResult(name=section.name, summaries=final, wall_s=ended - begin,
                                    agent_tokens=_tokens_between(rl.store, begin, ended + 1),
                                    detail=self._rl_detail(rl_dir)))
        finally:
            rl.close()

    def _rl_detail(self, rl_dir: Path) -> str:
        """The RL rung's validation trail, and which adapter it reports when one was chosen on ``data.select``."""
        from rltrain.algorithms.run_state import best_summaries

        trail = validation_trail(rl_dir)
        best = best_summaries(rl_dir) if self.recipe.data.select else None
        if best is None:
            return trail
        return (f"the adapter reported is the one chosen on `{self.recipe.data.select}`: step {best[0]} "
                f"(step 0 = the warm start); {trail}")


def escalate(recipe: Recipe, progress: bool = True) -> LadderResult:
    """Climb the ladder the recipe describes (see the module docstring); returns what ``ladder.json`` holds."""
    return Ladder(recipe, progress).climb()
