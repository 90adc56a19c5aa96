"""``rltrain escalate`` on a tiny model: every rung runs and is evaluated the same way, the RL rung starts from
APO's best prompt, the report compares them, the climb stops at the target and continues where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from scripted_llm import ScriptedLLM

from rltrain.algorithms.sft import WarmStartError
from rltrain.cli import main
from rltrain.envs.room_selection.prompts import default_prompts
from rltrain.escalation import EscalationError, LadderResult, escalate
from rltrain.metrics import EvalSummary
from rltrain.recipes import parse_recipe

SEED = default_prompts("inline")["user"].template
BETTER = ("Request: {request}\n\nRooms and their checks:\n{rooms}\n\nOnly a room that PASSES may be chosen; among "
          "those take the best by the tie-breaks.\nAnswer with one of: {answers}.")
EDITS = {SEED: ["Pick a room for {request}.", BETTER], BETTER: [BETTER, SEED]}


def ladder_recipe(tmp_path: Path, model_dir: Path, url: str, **extra: object):
    return parse_recipe({
        "name": "ladder", "output_dir": str(tmp_path), "seed": 2, "model": {"name": str(model_dir)},
        "env": {"name": "room_selection", "mode": "inline"},
        "data": {"train": "public:train", "val": "public:val", "extra_eval": ["generated:n=3,seed=5"], "limit": 3},
        "runner": {"concurrency": 4},
        "sampling": {"train": {"temperature": 1.0, "max_tokens": 3}, "eval": {"temperature": 0.0, "max_tokens": 3}},
        "apo": {"prompt": "user", "val_tasks": "generated:n=6,seed=9", "val_batch_size": 2, "gradient_batch_size": 2,
                "beam_width": 1, "branch_factor": 1, "beam_rounds": 1,
                "gradient_model": {"base_url": url, "model": "critic"},
                "apply_edit_model": {"base_url": url, "model": "editor"}},
        "warm_start": {"sources": ["teacher"], "max_steps": 1, "batch_size": 2},
        "algorithm": {"name": "grpo", "max_steps": 1, "tasks_per_step": 1, "num_generations": 2,
                      "max_completion_length": 4, "eval_steps": 1, "save_steps": 1, "lora": {"r": 4, "alpha": 8}},
        "escalate": {"target": 1.0},
        **extra,
    })


def test_the_whole_ladder_runs_and_is_reported(tmp_path: Path, tiny_model_dir: Path) -> None:
    with ScriptedLLM("Say that only passing rooms count.", EDITS) as llm:
        recipe = ladder_recipe(tmp_path, tiny_model_dir, llm.url)
        result = escalate(recipe, progress=False)
        served = len(llm.requests)
        # running the command again continues: nothing is redone or counted twice
        again = escalate(ladder_recipe(tmp_path, tiny_model_dir, llm.url), progress=False)
        assert len(llm.requests) == served
    assert again == result
    run = tmp_path / "ladder"
    assert [r.name for r in result.rungs] == ["baseline", "apo", "warm_start", "grpo"]
    assert result.reached is None  # a random tiny model does not reach 1.0
    for rung in result.rungs:  # every rung evaluated on the same sets
        assert [s.task_set for s in rung.summaries] == ["public:val", "generated:n=3,seed=5"]
        assert [s.n for s in rung.summaries] == [3, 3]
        assert rung.agent_tokens > 0 and rung.wall_s > 0
    grpo = result.rung("grpo")
    assert grpo is not None and grpo.detail.startswith("validation during training (step 1: ")
    apo = result.rung("apo")
    assert apo is not None and apo.optimiser_tokens == 3 * 120  # one critique, two edits (one rejected)
    # the RL rung's agent was given APO's best prompt (a random tiny model scores 0 with both: the parent stays)
    best = (run / "apo" / "apo" / "best_prompt.txt").read_text()
    assert best == SEED
    assert yaml.safe_load((run / "rl" / "recipe.yaml").read_text())["prompts"]["user"] == best
    # the base model is scored once, by the baseline rung: the RL sub-run's warm start does not validate it again
    assert yaml.safe_load((run / "rl" / "recipe.yaml").read_text())["warm_start"]["validate_base"] is False
    events = [json.loads(line).get("event") for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert "baseline" not in events and "warm_start" in events
    assert LadderResult.model_validate_json((run / "ladder.json").read_text()) == result
    report = (run / "report.md").read_text()
    for name in ("baseline", "apo", "warm_start", "grpo", "random feasible room", "always No Room"):
        assert name in report
    assert (run / "report.png").stat().st_size > 0

    # a climb continues only with the recipe that started it
    changed = ladder_recipe(tmp_path, tiny_model_dir, "http://127.0.0.1:9/v1", escalate={"target": 0.5})
    with pytest.raises(EscalationError, match="different recipe"):
        escalate(changed, progress=False)


def test_the_rl_rung_reports_the_adapter_chosen_on_the_selection_set(tmp_path: Path, tiny_model_dir: Path) -> None:
    data = {"train": "public:train", "val": "public:val", "extra_eval": ["generated:n=3,seed=5"],
            "select": "generated:n=3,seed=6", "limit": 3}
    recipe = ladder_recipe(tmp_path, tiny_model_dir, "http://127.0.0.1:9/v1", data=data, apo=None)
    result = escalate(recipe, progress=False)
    assert [r.name for r in result.rungs] == ["baseline", "warm_start", "grpo"]
    for rung in result.rungs:
        assert [s.task_set for s in rung.summaries] == ["public:val", "generated:n=3,seed=5", "generated:n=3,seed=6"]
    run = tmp_path / "ladder"
    marker = json.loads((run / "rl" / "best" / "rltrain_best.json").read_text())
    assert marker["task_set"] == "generated:n=3,seed=6"
    grpo = result.rung("grpo")
    assert grpo is not None
    assert grpo.summaries == [EvalSummary.model_validate(s) for s in marker["summaries"]]
    assert grpo.detail.startswith(f"the adapter reported is the one chosen on `generated:n=3,seed=6`: step "
                                  f"{marker['step']} ")
    report = (run / "report.md").read_text()
    assert "accuracy `generated:n=3,seed=6` (selection)" in report
    assert result.selection_set == "generated:n=3,seed=6"


def test_climb_stops_at_the_first_rung_that_reaches_the_target(tmp_path: Path, tiny_model_dir: Path) -> None:
    recipe = tmp_path / "ladder.yaml"
    recipe.write_text(json.dumps({
        "name": "stop", "output_dir": str(tmp_path), "model": {"name": str(tiny_model_dir)},
        "env": {"name": "room_selection", "mode": "inline"}, "data": {"val": "public:val", "limit": 2},
        "sampling": {"eval": {"temperature": 0.0, "max_tokens": 2}},
        "apo": {"gradient_model": {"base_url": "http://127.0.0.1:9/v1"}}, "escalate": {"target": 0.0},
    }))
    assert main(["escalate", str(recipe), "--no-progress"]) == 0
    ladder = LadderResult.model_validate_json((tmp_path / "stop" / "ladder.json").read_text())
    assert [r.name for r in ladder.rungs] == ["baseline"] and ladder.reached == "baseline"
    assert "Reached at rung **baseline**" in (tmp_path / "stop" / "report.md").read_text()


def test_a_recipe_with_nothing_to_climb_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "flat.yaml"
    recipe.write_text("name: flat\noutput_dir: " + str(tmp_path) + "\n")
    assert main(["escalate", str(recipe), "--no-progress"]) == 2


def test_a_climb_whose_warm_start_was_refused_continues_with_the_fixed_section(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """A warm start refused for its recipe (demonstrations longer than ``max_length``) after the baseline: the same
    command with the fixed ``warm_start:`` keeps the baseline rung (not scored again), moves the failed RL attempt
    aside and finishes; a change outside the RL sections, or after the RL rungs finished, is still refused."""
    recipe = ladder_recipe(tmp_path, tiny_model_dir, "http://127.0.0.1:9/v1", apo=None,
                           warm_start={"sources": ["teacher"], "max_steps": 1, "batch_size": 2, "max_length": 8})
    with pytest.raises(WarmStartError, match="max_length=8"):
        escalate(recipe, progress=False)
    run = tmp_path / "ladder"
    (baseline,) = LadderResult.model_validate_json((run / "ladder.json").read_text()).rungs
    assert (run / "rl" / "metrics.jsonl").exists()

    fixed = ladder_recipe(tmp_path, tiny_model_dir, "http://127.0.0.1:9/v1", apo=None)
    result = escalate(fixed, progress=False)
    assert [r.name for r in result.rungs] == ["baseline", "warm_start", "grpo"]
    assert result.rungs[0] == baseline
    (aside,) = run.glob("rl.before-*")
    assert (aside / "metrics.jsonl").exists()
    events = [json.loads(line).get("event") for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert events.count("demonstrations") == 1  # the new RL stage's metrics alone

    finished = ladder_recipe(tmp_path, tiny_model_dir, "http://127.0.0.1:9/v1", apo=None,
                             warm_start={"sources": ["teacher"], "max_steps": 2, "batch_size": 2})
    with pytest.raises(EscalationError, match=r"changed after its RL rungs \(warm_start, grpo\) finished"):
        escalate(finished, progress=False)
    elsewhere = ladder_recipe(tmp_path, tiny_model_dir, "http://127.0.0.1:9/v1", apo=None, seed=3)
    with pytest.raises(EscalationError, match="changed outside algorithm and warm_start"):
        escalate(elsewhere, progress=False)
