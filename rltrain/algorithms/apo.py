"""APO: improve one prompt template of the agent without touching weights (ProTeGi-style beam search).

Each round, for every prompt in the beam: the agent runs on ``gradient_batch_size`` training tasks; a critic LLM
reads the transcripts (messages, tool calls, rewards, the grader's verdict) and writes a *textual gradient*, a
critique of the prompt; an editor LLM reads prompt + critique and writes ``branch_factor`` new templates. Every
new template is scored by the agent's mean reward on a fixed minibatch of ``val_batch_size`` validation tasks,
and the best ``beam_width`` of parents and children form the next beam. Because parents compete with their
children on the same minibatch, the leader's score never falls. At the end the leader is evaluated on the whole
validation sets, exactly as every other rung of the ladder is.

A template that drops or invents a ``{placeholder}`` (or repeats a known candidate) is rejected before any
rollout runs, kept in the history with the reason, and asked for again up to ``max_edit_attempts`` times.

The run directory's ``apo/`` folder holds ``history.jsonl`` (every candidate: parent, critique, template, score
or rejection reason), ``state.json`` (the beam after the last finished round and the tokens spent so far),
``best_prompt.txt`` and ``result.json``. An interrupted run resumes from the last finished round: candidates of
the unfinished round are dropped from the history and produced again, so none is counted twice.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from rltrain.adapters.transcripts import transcript_of
from rltrain.llm_client import ChatLLM, UsageLedger
from rltrain.metrics import EvalSummary
from rltrain.recipes import APOConfig
from rltrain.types import PromptTemplate, PromptTemplateError, Task

if TYPE_CHECKING:
    from rltrain.run_context import RunContext
    from rltrain.serving import ServingStack

logger = logging.getLogger(__name__)

AGENT_STAGE = "agent rollouts"
GRADIENT_STAGE = "gradient calls"
EDIT_STAGE = "edit calls"


class APOError(ValueError):
    """An APO configuration that cannot run (unknown prompt name, no tasks); the message names the field."""


class Candidate(BaseModel):
    """One prompt template APO considered: where it came from and how it did."""

    model_config = ConfigDict(extra="forbid")

    id: str
    round: int
    parent: str | None
    template: str
    status: Literal["scored", "rejected"]
    score: float | None = None
    reason: str | None = None
    critique: str | None = None


class APOState(BaseModel):
    """What a resumed APO run needs: the last finished round, its beam (best first) and the tokens spent."""

    model_config = ConfigDict(extra="forbid")

    round_done: int
    beam: list[str]
    usage: dict[str, dict[str, object]]


class APOResult(BaseModel):
    """The outcome: the best template, its score on the minibatch, and the full validation after APO."""

    model_config = ConfigDict(extra="forbid")

    prompt_name: str
    best: Candidate
    seed_score: float
    candidates_scored: int
    candidates_rejected: int
    summaries: list[EvalSummary]
    usage: dict[str, dict[str, object]]
    wall_s: float


def extract_template(reply: str) -> str:
    """The template in an editor's reply: between ``<template>`` tags when present (the closing tag may be
    missing when the reply was cut), else the whole reply; code fences are removed."""
    match = re.search(r"<template>(.*?)(?:</template>|$)", reply, flags=re.DOTALL | re.IGNORECASE)
    text = match.group(1) if match else reply
    text = re.sub(r"^\s*```[a-zA-Z]*\n|\n```\s*$", "", text.strip())
    return text.strip()


def gradient_messages(template: str, transcripts: list[str]) -> list[dict[str, str]]:
    """The critic's request: the template and what the agent did with it."""
    shown = "\n\n".join(f"### attempt {i + 1}\n{t}" for i, t in enumerate(transcripts))
    return [
        {"role": "system", "content": "You review the prompts given to an AI agent and explain its mistakes."},
        {"role": "user", "content": (
            "The agent was given this prompt template (words in braces are filled in for each request):\n"
            f"<template>\n{template}\n</template>\n\n"
            f"Here are {len(transcripts)} of its attempts, each with the reward it earned (1 = correct):\n\n"
            f"{shown}\n\n"
            "In a few sentences: why did the prompt lead to wrong answers, and what should it say instead?"
        )},
    ]


def edit_messages(template: str, critique: str, placeholders: list[str]) -> list[dict[str, str]]:
    """The editor's request: rewrite the template following the critique, placeholders kept."""
    if placeholders:
        names = ", ".join("{" + p + "}" for p in placeholders)
        keep = (f"Keep the placeholders {names} exactly as written, each once, and put no other words in braces.")
    else:
        keep = "Put no words in braces."
    return [
        {"role": "system", "content": "You improve prompts for an AI agent."},
        {"role": "user", "content": (
            f"Current prompt template:\n<template>\n{template}\n</template>\n\n"
            f"Feedback on it:\n{critique.strip()}\n\n"
            f"Write an improved version of the template that follows the feedback. {keep} "
            "Reply with only the new template between <template> and </template>."
        )},
    ]


class BeamSearch:
    """The APO loop for one recipe; ``run`` returns the best candidate (resuming from ``apo/`` if present)."""

    def __init__(self, rl: RunContext, config: APOConfig, stack: ServingStack) -> None:
        self.rl = rl
        self.config = config
        self.stack = stack
        self.dir = rl.run_dir / "apo"
        self.dir.mkdir(parents=True, exist_ok=True)
        prompts = rl.prompts()
        if config.prompt not in prompts:
            raise APOError(f"apo.prompt: the {rl.recipe.env.mode} agent has no prompt {config.prompt!r}; "
                           f"its prompts are {sorted(prompts)}")
        self.prompts = prompts
        self.placeholders = prompts[config.prompt].placeholders
        self.train_tasks = self._tasks(rl.recipe.data.train, "data.train")
        val_spec = config.val_tasks or rl.recipe.data.val
        val_tasks = self._tasks(val_spec, "apo.val_tasks" if config.val_tasks else "data.val")
        self.val_batch = random.Random(rl.recipe.seed).sample(val_tasks, min(config.val_batch_size, len(val_tasks)))
        self.candidates: dict[str, Candidate] = {}
        self.critic = ChatLLM(config.gradient_model, stack.url, stack.model_name)
        self.editor = ChatLLM(config.apply_edit_model, stack.url, stack.model_name)
        self._charge_to(UsageLedger())

    def _charge_to(self, ledger: UsageLedger) -> None:
        """Count the critic's and editor's tokens in ``ledger`` (a fresh one, or one restored from disk)."""
        self.ledger = ledger
        self.critic.usage = ledger.stage(GRADIENT_STAGE, self.critic.model)
        self.editor.usage = ledger.stage(EDIT_STAGE, self.editor.model)

    def _tasks(self, spec: str | None, field: str) -> list[Task]:
        if spec is None:
            raise APOError(f"{field} is not set: APO needs tasks there")
        tasks = self.rl.load_tasks(spec)
        if not tasks:
            raise APOError(f"{field}={spec!r} names no tasks")
        return tasks

    # -- persistence -----------------------------------------------------------------------------------------
    def _append(self, candidate: Candidate) -> None:
        self.candidates[candidate.id] = candidate
        with (self.dir / "history.jsonl").open("a") as fh:
            fh.write(candidate.model_dump_json() + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _save_state(self, round_done: int, beam: list[str]) -> None:
        state = APOState(round_done=round_done, beam=beam, usage=self.ledger.as_dict(self.rl.recipe.pricing))
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(state.model_dump_json(indent=2))
        tmp.replace(self.dir / "state.json")

    def _restore(self) -> APOState | None:
        """Load the last finished round; drop history lines of the round that was interrupted."""
        state_path, history = self.dir / "state.json", self.dir / "history.jsonl"
        if not state_path.exists():
            history.unlink(missing_ok=True)
            return None
        state = APOState.model_validate_json(state_path.read_text())
        lines = [line for line in (history.read_text().splitlines() if history.exists() else []) if line.strip()]
        kept = []
        for line in lines:
            try:
                candidate = Candidate.model_validate_json(line)
            except ValueError:
                continue  # a torn last line of a killed process
            if candidate.round <= state.round_done:
                kept.append(candidate)
        dropped = len(lines) - len(kept)
        history.write_text("".join(c.model_dump_json() + "\n" for c in kept))
        self.candidates = {c.id: c for c in kept}
        self._charge_to(UsageLedger.from_dict(state.usage))  # type: ignore[arg-type]
        logger.info("APO: resuming after round %d (%d candidates kept, %d lines of the unfinished round dropped)",
                    state.round_done, len(kept), dropped)
        return state

    # -- the loop ---------------------------------------------------------------------------------------------
    def with_template(self, template: str) -> dict[str, PromptTemplate]:
        """The agent's prompts with the optimised one replaced."""
        prompts = dict(self.prompts)
        prompts[self.config.prompt] = PromptTemplate(template=template, placeholders=self.placeholders)
        return prompts

    def _agent_run(self, tasks: list[Task], template: str, desc: str) -> tuple[EvalSummary, list[str]]:
        summary, runs = self.rl.run_set(desc, tasks, self.stack, prompts=self.with_template(template), desc=desc)
        self.ledger.stage(AGENT_STAGE, self.stack.model_name).add(
            summary.prompt_tokens, summary.completion_tokens, summary.llm_calls
        )
        transcripts = [transcript_of(r, spans).render(self.config.transcript_chars) for r, spans in runs]
        return summary, transcripts

    def _score(self, candidate_id: str, template: str) -> float:
        summary, _ = self._agent_run(self.val_batch, template, f"APO score {candidate_id}")
        return summary.mean_reward

    def _new_id(self, round_no: int) -> str:
        return f"r{round_no}-c{len(self.candidates)}"

    def _edit(self, parent: Candidate, critique: str, round_no: int) -> Candidate | None:
        """One child of ``parent``: edits are asked for until one passes the checks (or attempts run out)."""
        for _ in range(self.config.max_edit_attempts):
            template = extract_template(self.editor.complete(
                edit_messages(parent.template, critique, self.placeholders)))
            reason = self._rejection(template)
            cid = self._new_id(round_no)
            if reason is not None:
                self._append(Candidate(id=cid, round=round_no, parent=parent.id, template=template,
                                       status="rejected", reason=reason, critique=critique))
                logger.info("APO %s rejected: %s", cid, reason)
                continue
            child = Candidate(id=cid, round=round_no, parent=parent.id, template=template, status="scored",
                              score=self._score(cid, template), critique=critique)
            self._append(child)
            logger.info("APO %s (from %s) scored %.3f", cid, parent.id, child.score)
            return child
        return None

    def _rejection(self, template: str) -> str | None:
        """Why a template may not run, or None: broken or changed placeholders, empty, or already tried."""
        if not template.strip():
            return "empty template"
        try:
            PromptTemplate(template=template, placeholders=self.placeholders)
        except PromptTemplateError as exc:
            return str(exc)
        except ValidationError as exc:  # pydantic wraps the validator's PromptTemplateError
            return "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        for other in self.candidates.values():
            if other.status == "scored" and other.template.strip() == template.strip():
                return f"identical to candidate {other.id}"
        return None

    def _ranked(self, ids: list[str]) -> list[str]:
        """Best first; ties keep the older candidate first (a parent beats an equal child)."""
        order = {cid: i for i, cid in enumerate(self.candidates)}
        return sorted(ids, key=lambda cid: (-(self.candidates[cid].score or 0.0), order[cid]))

    def run(self) -> Candidate:
        state = self._restore()
        if state is None:
            template = self.prompts[self.config.prompt].template
            seed = Candidate(id="r0-c0", round=0, parent=None, template=template, status="scored",
                             score=self._score("r0-c0", template))
            self._append(seed)
            logger.info("APO seed prompt scored %.3f on %d validation tasks", seed.score, len(self.val_batch))
            state = APOState(round_done=0, beam=[seed.id], usage={})
            self._save_state(0, state.beam)
        beam = state.beam
        for round_no in range(state.round_done + 1, self.config.beam_rounds + 1):
            children: list[str] = []
            for index, parent_id in enumerate(beam):
                parent = self.candidates[parent_id]
                rng = random.Random(f"{self.rl.recipe.seed}-{round_no}-{index}")
                batch = rng.sample(self.train_tasks, min(self.config.gradient_batch_size, len(self.train_tasks)))
                _, transcripts = self._agent_run(batch, parent.template, f"APO round {round_no} {parent_id}")
                critique = self.critic.complete(gradient_messages(parent.template, transcripts))
                for _ in range(self.config.branch_factor):
                    child = self._edit(parent, critique, round_no)
                    if child is not None:
                        children.append(child.id)
            beam = self._ranked(beam + children)[: self.config.beam_width]
            self._save_state(round_no, beam)
            self.rl.metrics.write({"event": "apo_round", "apo/round": round_no,
                                   "apo/leader_score": self.candidates[beam[0]].score,
                                   "apo/children": len(children)}, step=round_no)
            logger.info("APO round %d: leader %s scores %.3f (%d new candidates)", round_no, beam[0],
                        self.candidates[beam[0]].score, len(children))
        return self.candidates[beam[0]]


def optimise_prompt(rl: RunContext, config: APOConfig, stack: ServingStack) -> APOResult:
    """Run (or resume) APO, write ``apo/best_prompt.txt`` and ``apo/result.json``, and evaluate the best prompt
    on the recipe's validation sets (label ``apo``)."""
    started = time.perf_counter()
    search = BeamSearch(rl, config, stack)
    best = search.run()
    (search.dir / "best_prompt.txt").write_text(best.template)
    summaries = rl.evaluate(rl.eval_sets(), stack=stack, label="apo", prompts=search.with_template(best.template))
    for summary in summaries:
        search.ledger.stage(AGENT_STAGE, stack.model_name).add(
            summary.prompt_tokens, summary.completion_tokens, summary.llm_calls)
    scored = [c for c in search.candidates.values() if c.status == "scored"]
    result = APOResult(
        prompt_name=config.prompt, best=best, seed_score=search.candidates["r0-c0"].score or 0.0,
        candidates_scored=len(scored), candidates_rejected=len(search.candidates) - len(scored),
        summaries=summaries, usage=search.ledger.as_dict(rl.recipe.pricing), wall_s=time.perf_counter() - started,
    )
    (search.dir / "result.json").write_text(result.model_dump_json(indent=2))
    return result


def best_prompts(overrides: dict[str, str], apo_run_dir: Path, prompt_name: str) -> dict[str, str]:
    """A recipe's prompt ``overrides`` plus the best template of the APO run in ``apo_run_dir``: the
    ``prompts`` a later rung's recipe is given."""
    return {**overrides, prompt_name: (apo_run_dir / "apo" / "best_prompt.txt").read_text()}


def train_apo(rl: RunContext, resume: bool = False) -> list[EvalSummary]:
    """``algorithm: apo`` as a run of its own: baseline validation, APO, validation of the best prompt."""
    from rltrain.algorithms.run_state import accuracies
    from rltrain.serving import ServingStack

    config = rl.recipe.algorithm
    assert isinstance(config, APOConfig)
    if not resume:
        for stale in ("history.jsonl", "state.json"):
            (rl.run_dir / "apo" / stale).unlink(missing_ok=True)
    with ServingStack(rl.recipe, rl.store) as stack:
        if not (rl.run_dir / "eval" / "baseline.json").exists():
            logger.info("baseline: %s", accuracies(rl.evaluate(rl.eval_sets(), stack=stack, label="baseline")))
        result = optimise_prompt(rl, config, stack)
    logger.info("after APO (%s): %s; %d candidates scored, %d rejected", config.prompt,
                accuracies(result.summaries), result.candidates_scored, result.candidates_rejected)
    return result.summaries
