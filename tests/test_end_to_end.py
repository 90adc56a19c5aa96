"""The whole stack: recipe -> trainer -> runner -> agent (stock openai client) -> gateway -> engine -> store.

Most tests use the tiny model (real SmolLM2 tokenizer, random weights); the ``slow`` ones load the real
SmolLM2-135M-Instruct weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rltrain.cli import main
from rltrain.recipes import parse_recipe
from rltrain.store import SqliteStore
from rltrain.trainer import Trainer
from rltrain.types import RolloutStatus, SpanKind


def recipe_for(tmp_path: Path, model: str, **extra):
    data = {
        "name": "e2e",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name": model},
        "env": {"name": "room_selection", "mode": "inline"},
        "data": {"val": "public:val", "limit": 4},
        "runner": {"concurrency": 4, "timeout_s": 120},
        "sampling": {"eval": {"temperature": 0.0, "max_tokens": 6}},
    }
    data.update(extra)
    return parse_recipe(data)


def test_evaluate_through_gateway_records_everything(tmp_path: Path, tiny_model_dir: Path) -> None:
    trainer = Trainer(recipe_for(tmp_path, str(tiny_model_dir)), progress=False)
    try:
        [summary] = trainer.run.evaluate(trainer.run.eval_sets())
        rollouts = trainer.store.list_rollouts(mode="eval")
    finally:
        trainer.close()
    assert summary.n == 4 and len(rollouts) == 4
    assert all(r.status is RolloutStatus.SUCCEEDED for r in rollouts)
    assert summary.llm_calls == 4 and summary.completion_tokens > 0
    # the store is a real file that another process could open: reopen it and read the spans back
    store = SqliteStore(tmp_path / "runs" / "e2e" / "store.sqlite")
    spans = store.get_spans(rollouts[0].rollout_id)
    store.close()
    kinds = [s.kind for s in spans]
    assert SpanKind.LLM in kinds and SpanKind.LOG in kinds and SpanKind.REWARD in kinds
    llm = next(s for s in spans if s.kind is SpanKind.LLM)
    assert len(llm.attributes["completion_ids"]) == len(llm.attributes["logprobs"]) >= 1
    assert llm.attributes["prompt_ids"], "the gateway records the exact prompt token ids"
    grade = next(s for s in spans if s.name == "grade")
    assert grade.attributes["expected"] == rollouts[0].task.payload["expected_choice"]
    saved = json.loads((tmp_path / "runs" / "e2e" / "eval" / "eval.json").read_text())
    assert saved[0]["n"] == 4


def test_cli_solver_scores_one_on_public_tasks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "recipes/room_selection_eval.yaml", "--agent", "solver", "--json", "--no-progress",
                 "--set", f"output_dir={tmp_path}"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    [summary] = out["summaries"]
    assert summary["n"] == 40 and summary["accuracy"] == 1.0 and summary["parseable"] == 1.0


def test_cli_solver_on_generated_tasks_and_other_catalog(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    catalog = {"rooms": [
        {"id": "Alpha", "capacity": 4, "equipment": ["tv"], "accessible": True, "distance_m": 5, "booked": [
            {"date": "2026-01-05", "time": "09:00", "duration_min": 60}]},
        {"id": "Beta", "capacity": 12, "equipment": ["tv", "projector"], "accessible": False, "distance_m": 9,
         "booked": [{"date": "2026-01-05", "time": "13:00", "duration_min": 30}]},
    ]}
    catalog_path = tmp_path / "catalog.json"
    catalog_path.write_text(json.dumps(catalog))
    tasks_path = tmp_path / "tasks.jsonl"
    assert main(["data", "room-selection", "--n", "25", "--seed", "3", "--catalog", str(catalog_path),
                 "--out", str(tasks_path)]) == 0
    assert len(tasks_path.read_text().splitlines()) == 25
    code = main(["eval", "recipes/room_selection_eval.yaml", "--agent", "solver", "--json", "--no-progress",
                 "--tasks", str(tasks_path), "--catalog", str(catalog_path), "--set", f"output_dir={tmp_path}"])
    assert code == 0
    [summary] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summaries"]
    assert summary["n"] == 25 and summary["accuracy"] == 1.0


def test_cli_solver_scores_one_on_random_catalogs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Every task answered against its own catalog: the reference agent gets them all, and the answer distribution
    counts places in the catalog, not names."""
    code = main(["eval", "recipes/room_selection_eval.yaml", "--agent", "solver", "--json", "--no-progress",
                 "--tasks", "generated:n=30,seed=99,catalogs=random", "--set", f"output_dir={tmp_path}"])
    assert code == 0
    [summary] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summaries"]
    assert summary["n"] == 30 and summary["accuracy"] == 1.0 and summary["parseable"] == 1.0
    assert set(summary["answer_distribution"]) <= {"No Room", *(f"room #{i}" for i in range(1, 12))}
    # the same set written to a file by `rltrain data` and read back: the same rows, the same score
    tasks_path = tmp_path / "unseen.jsonl"
    assert main(["data", "room-selection", "--n", "30", "--seed", "99", "--catalogs", "random",
                 "--out", str(tasks_path)]) == 0
    rows = [json.loads(line) for line in tasks_path.read_text().splitlines()]
    assert [row["id"] for row in rows] == [f"g99c-{i}" for i in range(30)] and all("catalog" in row for row in rows)
    capsys.readouterr()
    assert main(["eval", "recipes/room_selection_eval.yaml", "--agent", "solver", "--json", "--no-progress",
                 "--tasks", str(tasks_path), "--set", f"output_dir={tmp_path}"]) == 0
    [again] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["summaries"]
    assert (again["n"], again["accuracy"], again["answer_distribution"]) == (30, 1.0, summary["answer_distribution"])
    assert main(["data", "room-selection", "--n", "3", "--catalogs", "foo", "--out", str(tasks_path)]) == 2
    assert "catalogs must be 'random' (a catalog per task) or a count of catalogs from 1 to n=3, got 'foo'" in caplog.text


def test_cli_bad_inputs_exit_2_with_clear_message(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text("runner:\n  concurency: 2\n")
    assert main(["eval", str(bad_recipe), "--agent", "solver"]) == 2
    assert "runner.concurency" in caplog.text and "did you mean 'concurrency'" in caplog.text

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": "a", "task_input": {"date": "2025-10-13", "time": "09:00", "duration_min": 30, '
                    '"attendees": 2, "needs": [], "accessible_required": false}, "expected_choice": "Orion"}\n'
                    '{"id": "b", "task_input": {"date": "2025-10-13", "time": "9 o\'clock"}}\n')
    caplog.clear()
    assert main(["eval", "recipes/room_selection_eval.yaml", "--agent", "solver", "--tasks", str(rows),
                 "--set", f"output_dir={tmp_path}"]) == 2
    assert f"{rows}:2" in caplog.text


@pytest.mark.slow
def test_real_smollm2_eval_through_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "recipes/room_selection_eval.yaml", "--json", "--no-progress", "--limit", "6",
                 "--set", f"output_dir={tmp_path}"])
    assert code == 0
    [summary] = json.loads(capsys.readouterr().out)["summaries"]
    assert summary["n"] == 6 and summary["failed"] == 0 and summary["timed_out"] == 0
    assert summary["llm_calls"] == 6 and summary["parseable"] > 0.5
    assert 0.0 <= summary["accuracy"] <= 1.0


def test_every_named_user_error_exists() -> None:
    """The CLI names its user-facing exceptions as strings (to report a bad recipe without importing torch);
    a renamed or moved class would silently become a traceback, so each name must resolve to itself."""
    import importlib

    from rltrain.cli import USER_ERRORS, is_user_error

    for name in USER_ERRORS:
        module, _, cls_name = name.rpartition(".")
        cls = getattr(importlib.import_module(module), cls_name)
        assert f"{cls.__module__}.{cls.__qualname__}" == name
    from rltrain.envs.room_selection.tasks import TaskSpecError

    assert is_user_error(TaskSpecError("x")) and not is_user_error(RuntimeError("x"))
