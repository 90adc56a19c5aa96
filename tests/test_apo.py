"""APO's beam search against a scripted critic/editor over HTTP and an agent whose reward depends only on its
prompt template (tests/keyword_env.py), so every choice of the search can be checked exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from keyword_env import SEED_TEMPLATE, KeywordEnv, template_score
from scripted_llm import ScriptedLLM

from rltrain import envs
from rltrain.algorithms.apo import Candidate, edit_messages, extract_template
from rltrain.llm_client import LLMEndpointError
from rltrain.metrics import read_metrics
from rltrain.recipes import parse_recipe
from rltrain.trainer import Trainer
from rltrain.types import SpanKind

CRITIQUE = "The prompt should tell the agent to check capacity carefully and to prefer accessible rooms."

CHECK = "Check the capacity, then pick a room for {topic}."  # 0.50
CAREFUL = "Pick a room for {topic} carefully."  # 0.25
BEST = "Carefully check capacity and accessible needs for {topic}."  # 1.00
EDITS = {
    SEED_TEMPLATE: ["Carefully pick a room for {place}.", CHECK, CAREFUL],
    # round 2: a copy of the parent, a copy of the seed, then the best one; then a worse one
    CHECK: [CHECK, SEED_TEMPLATE, BEST, "Pick {topic}."],
    CAREFUL: ["{topic}: pick anything.", "Pick a room for {topic} carefully and check it."],
}


@pytest.fixture(autouse=True)
def keyword_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(envs._REGISTRY, "keyword", KeywordEnv)


def apo_recipe(tmp_path: Path, model_dir: Path, url: str, **apo: object):
    return parse_recipe({
        "name": "apo", "output_dir": str(tmp_path), "seed": 1, "model": {"name": str(model_dir)},
        "env": {"name": "keyword", "mode": "any"}, "data": {"train": "train", "val": "val"},
        "runner": {"concurrency": 4},
        "algorithm": {
            "name": "apo", "prompt": "instruction", "val_batch_size": 3, "gradient_batch_size": 2,
            "beam_width": 2, "branch_factor": 2, "beam_rounds": 2, "max_edit_attempts": 3,
            "gradient_model": {"base_url": url, "model": "critic"},
            "apply_edit_model": {"base_url": url, "model": "editor"},
            **apo,
        },
        "pricing": {"critic": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
    })


def history(run_dir: Path) -> list[Candidate]:
    lines = (run_dir / "apo" / "history.jsonl").read_text().splitlines()
    return [Candidate.model_validate_json(line) for line in lines]


def test_beam_search_keeps_the_best_and_rejects_bad_placeholders(tmp_path: Path, tiny_model_dir: Path) -> None:
    with ScriptedLLM(CRITIQUE, EDITS) as llm:
        rl = Trainer(apo_recipe(tmp_path, tiny_model_dir, llm.url), progress=False)
        final = rl.fit()
        rl.close()
    run_dir = tmp_path / "apo"
    cands = history(run_dir)
    scored = {c.template: c for c in cands if c.status == "scored"}
    # every scored candidate's score is the agent's real reward for that template
    for template, cand in scored.items():
        assert cand.score == pytest.approx(template_score(template.format(topic="meeting 0")))
    assert set(scored) == {SEED_TEMPLATE, CHECK, CAREFUL, BEST, "Pick {topic}.", "{topic}: pick anything.",
                           "Pick a room for {topic} carefully and check it."}
    # rejected before running: an invented placeholder, a copy of the parent, a copy of the seed
    rejected = [c for c in cands if c.status == "rejected"]
    assert [c.template for c in rejected] == ["Carefully pick a room for {place}.", CHECK, SEED_TEMPLATE]
    assert "unknown placeholder" in rejected[0].reason and "place" in rejected[0].reason
    assert rejected[1].reason.startswith("identical to candidate")
    assert all(c.score is None for c in rejected)
    # parents are recorded: round-2 children descend from round-1 candidates
    by_id = {c.id: c for c in cands}
    assert by_id[scored[BEST].parent].template == CHECK
    assert by_id[scored[CHECK].parent].template == SEED_TEMPLATE
    # beam kept at beam_width, leader monotone
    state = json.loads((run_dir / "apo" / "state.json").read_text())
    assert state["round_done"] == 2
    assert [by_id[cid].template for cid in state["beam"]] == [BEST, CHECK]  # CHECK (older) beats its 0.5 rival
    leaders = [r["apo/leader_score"] for r in read_metrics(run_dir / "metrics.jsonl")
               if r.get("event") == "apo_round"]
    assert leaders == [0.5, 1.0]
    assert (run_dir / "apo" / "best_prompt.txt").read_text() == BEST
    # the best prompt is then evaluated on the whole validation set
    assert final[0].accuracy == 1.0 and final[0].n == 6
    result = json.loads((run_dir / "apo" / "result.json").read_text())
    assert result["candidates_rejected"] == 3 and result["candidates_scored"] == 7
    # usage: 3 critic calls (one per parent), 9 edit calls (3 + 4 + 2), priced from the recipe's table
    assert result["usage"]["gradient calls"]["calls"] == 3
    assert result["usage"]["edit calls"]["calls"] == 9
    assert result["usage"]["gradient calls"]["cost"] == pytest.approx((300 * 1.0 + 60 * 2.0) / 1e6)
    assert result["usage"]["edit calls"]["cost"] == 0.0


def test_rejected_templates_never_run_and_the_critic_reads_transcripts(tmp_path: Path, tiny_model_dir: Path) -> None:
    with ScriptedLLM(CRITIQUE, EDITS) as llm:
        rl = Trainer(apo_recipe(tmp_path, tiny_model_dir, llm.url, beam_rounds=1), progress=False)
        rl.fit()
        rendered = {s.attributes["result"] for r in rl.store.list_rollouts()
                    for s in rl.store.get_spans(r.rollout_id) if s.kind is SpanKind.TOOL}
        rl.close()
        critic_requests = [r for r in llm.requests if r["model"] == "critic"]
    scored = {c.template for c in history(tmp_path / "apo") if c.status == "scored"}
    assert rendered and rendered <= {t.format(topic=f"meeting {i}") for t in scored for i in range(6)}
    assert not any(text.startswith("Carefully pick") for text in rendered)  # the {place} edit never ran
    [request] = critic_requests
    content = request["messages"][-1]["content"]
    assert SEED_TEMPLATE in content and "reward: 0.0" in content and "Pick a room for meeting" in content


def test_leader_holds_when_every_edit_is_worse(tmp_path: Path, tiny_model_dir: Path) -> None:
    seed = "Carefully check the capacity for {topic}."  # 0.75
    worse = {seed: ["Pick {topic}.", "Rooms for {topic}.", "Check {topic}.", "A room for {topic}."]}
    with ScriptedLLM(CRITIQUE, worse) as llm:
        recipe = apo_recipe(tmp_path, tiny_model_dir, llm.url, beam_width=1, branch_factor=2, beam_rounds=2)
        recipe.prompts = {"instruction": seed}
        rl = Trainer(recipe, progress=False)
        rl.fit()
        rl.close()
    leaders = [r["apo/leader_score"] for r in read_metrics(tmp_path / "apo" / "metrics.jsonl")
               if r.get("event") == "apo_round"]
    assert leaders == [0.75, 0.75]
    assert (tmp_path / "apo" / "apo" / "best_prompt.txt").read_text() == seed


def test_resume_after_interruption_redoes_only_the_unfinished_round(tmp_path: Path, tiny_model_dir: Path) -> None:
    # the 5th edit call (round 2, after two of its candidates were written) fails: the process stops there
    with ScriptedLLM(CRITIQUE, EDITS, fail_on_edit=5) as llm:
        rl = Trainer(apo_recipe(tmp_path, tiny_model_dir, llm.url), progress=False)
        with pytest.raises(LLMEndpointError, match="editor"):
            rl.fit()
        rl.close()
    run_dir = tmp_path / "apo"
    assert any(c.round == 2 for c in history(run_dir))
    round1 = [c for c in history(run_dir) if c.round <= 1]
    with ScriptedLLM(CRITIQUE, EDITS) as llm:
        rl = Trainer(apo_recipe(tmp_path, tiny_model_dir, llm.url), progress=False)
        rl.fit(resume=True)
        rl.close()
        assert not any(r["model"] == "critic" and SEED_TEMPLATE in r["messages"][-1]["content"]
                       for r in llm.requests)  # round 1 was not redone
    cands = history(run_dir)
    assert cands[: len(round1)] == round1
    assert len({c.id for c in cands}) == len(cands)
    assert sorted(c.template for c in cands if c.round == 2) == sorted(
        [CHECK, SEED_TEMPLATE, BEST, "Pick {topic}.", "{topic}: pick anything.",
         "Pick a room for {topic} carefully and check it."])
    assert (run_dir / "apo" / "best_prompt.txt").read_text() == BEST


def test_extract_template_and_edit_request() -> None:
    assert extract_template("Sure!\n<template>\nA {x}\n</template> done") == "A {x}"
    assert extract_template("<template>cut off {x}") == "cut off {x}"
    assert extract_template("```\nplain {x}\n```") == "plain {x}"
    content = edit_messages("T {a} {b}", "be precise", ["a", "b"])[-1]["content"]
    assert "{a}, {b}" in content and "be precise" in content


def test_unknown_prompt_name_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    from rltrain.algorithms.apo import APOError

    with ScriptedLLM(CRITIQUE, EDITS) as llm:
        rl = Trainer(apo_recipe(tmp_path, tiny_model_dir, llm.url, prompt="system"), progress=False)
        with pytest.raises(APOError, match=r"apo.prompt.*'system'.*\['instruction'\]"):
            rl.fit()
        rl.close()
