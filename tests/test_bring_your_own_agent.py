"""The Python API with a user's own agent and no Environment class: datasets in every form, GRPO steps on a bare
``@rollout`` function, a plain teacher agent for SFT, an adapter evaluated as is, and the recipe reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset
from openai import OpenAI

from rltrain import GRPO, SFT, PromptTemplate, Resources, Trainer, emit_answer, reply_with, rollout
from rltrain.cli import main
from rltrain.export import export_merged
from rltrain.recipe_schema import ALGORITHMS
from rltrain.recipes import Recipe
from rltrain.task_data import TaskDataError, load_task_data
from rltrain.types import SpanKind

ROWS = [{"id": f"w{i}", "word": f"word{i}"} for i in range(4)]
PROMPTS = {"user": PromptTemplate(template="Repeat {word}.", placeholders=["word"])}


@rollout
def parity_agent(task: dict, resources: Resources) -> float:
    """Rewarded when the reply has an even number of characters; reports "even"/"odd" as its answer."""
    with OpenAI(base_url=resources.llm.base_url, api_key=resources.llm.api_key) as client:
        reply = client.chat.completions.create(
            model=resources.llm.model,
            messages=[{"role": "user", "content": resources.prompts["user"].format(word=task["word"])}],
            temperature=resources.llm.sampling.temperature,
            max_tokens=resources.llm.sampling.max_tokens,
        )
    even = len(reply.choices[0].message.content or "") % 2 == 0
    emit_answer("even" if even else "odd")
    return 1.0 if even else 0.0


@rollout
def parity_teacher(task: dict, resources: Resources) -> float:
    """Demonstrates an even-length reply, sent through the gateway as if the model had written it."""
    messages = [{"role": "user", "content": resources.prompts["user"].format(word=task["word"])}]
    reply = reply_with(resources, messages, "okay")
    return 1.0 if len(reply.choices[0].message.content) % 2 == 0 else 0.0


def small(tmp_path: Path, model: str | dict, algorithm=None, **sections) -> Trainer:
    return Trainer(algorithm=algorithm, model=model, run_dir=tmp_path, initial_resources=PROMPTS, n_runners=4,
                   progress=False, sampling={"train": {"temperature": 1.0, "max_tokens": 6},
                                             "eval": {"temperature": 0.0, "max_tokens": 6}}, **sections)


# -- datasets ---------------------------------------------------------------------------------------------------
def test_every_dataset_form_gives_the_same_tasks(tmp_path: Path) -> None:
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    forms = [ROWS, Dataset.from_list(ROWS), path, str(path)]
    loaded = [load_task_data(form, name="train") for form in forms]
    for tasks in loaded:
        assert [(t.id, t.payload) for t in tasks] == [(r["id"], r) for r in ROWS]
    unnamed = load_task_data([{"q": "1+1"}, {"q": "2+2"}], name="calc")
    assert [t.id for t in unnamed] == ["calc-1", "calc-2"]


def test_a_bad_row_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b",\n')
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_task_data(path)
    path.write_text('{"id": "a"}\n[1, 2]\n')
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:2: row 2: a task must be a JSON object"):
        load_task_data(path)
    with pytest.raises(TaskDataError, match=r"val: row 2: duplicate task id 'a'"):
        load_task_data([{"id": "a"}, {"id": "a"}], name="val")
    with pytest.raises(TaskDataError, match="task file not found"):
        load_task_data(tmp_path / "missing.jsonl")
    with pytest.raises(TaskDataError, match="not a .jsonl file"):
        load_task_data("tasks.csv")


def test_cli_reports_a_bad_task_file_in_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "bad.jsonl").write_text('{"id": "a"}\nnot json\n')
    (tmp_path / "my_agents.py").write_text("from rltrain import rollout\n\n@rollout\ndef agent(task, resources):\n"
                                           "    return 1.0\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"agent: my_agents:agent\noutput_dir: {tmp_path}/runs\ndata: {{val: bad.jsonl}}\n")
    assert main(["eval", str(recipe), "--no-progress"]) == 2
    [error] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error.startswith(f"{tmp_path / 'bad.jsonl'}:2: not valid JSON")  # read next to the recipe


# -- training and evaluation through the Python API ------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, list]:
    """A bare @rollout function trained 2 GRPO steps on the tiny model, no Environment class anywhere."""
    run_dir = tmp_path_factory.mktemp("byoa") / "grpo"
    trainer = small(run_dir, str(tiny_model_dir), GRPO(max_steps=2, tasks_per_step=2, num_generations=4,
                                                       learning_rate=0.05, resample_zero_std=2, eval_steps=10,
                                                       save_steps=10))
    try:
        final = trainer.fit(parity_agent, train_dataset=ROWS, val_dataset=Dataset.from_list(ROWS[:2]))
    finally:
        trainer.close()
    return run_dir, final


def test_a_bare_agent_trains_two_grpo_steps_and_evaluates(trained: tuple[Path, list], tiny_model_dir: Path) -> None:
    run_dir, [final] = trained
    assert final.n == 2 and set(final.answer_distribution) <= {"even", "odd"} and final.parseable == 1.0
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("event") == "train" and "loss" in r] == [1, 2]
    assert (run_dir / "final" / "adapter_config.json").exists()
    recorded = (run_dir / "recipe.yaml").read_text()
    assert f"agent: {parity_agent.fn.__module__}:parity_agent" in recorded
    assert str(run_dir / "tasks" / "train.jsonl") in recorded  # in-memory datasets are kept with the run

    trainer = small(run_dir.parent / "eval", str(tiny_model_dir))
    try:
        [summary] = trainer.evaluate(parity_agent, ROWS)
        rollouts = trainer.store.list_rollouts(mode="eval")
    finally:
        trainer.close()
    assert summary.n == 4 == len(rollouts) and summary.parseable == 1.0


def _completions(run_dir: Path) -> dict[str, str]:
    from rltrain.store import open_store

    store = open_store("sqlite", run_dir / "store.sqlite")
    try:
        return {r.task.id: next(s.attributes["text"] for s in store.get_spans(r.rollout_id) if s.kind is SpanKind.LLM)
                for r in store.list_rollouts(mode="eval")}
    finally:
        store.close()


def test_adapter_evaluation_equals_the_merged_exports(trained: tuple[Path, list], tiny_model_dir: Path) -> None:
    run_dir, _ = trained
    merged = export_merged(run_dir, "final", run_dir.parent / "merged")
    results = {}
    for label, model in (("adapter", {"name": str(tiny_model_dir), "adapter": str(run_dir / "final")}),
                         ("merged", str(merged)), ("base", str(tiny_model_dir))):
        trainer = small(run_dir.parent / label, model)
        try:
            [summary] = trainer.evaluate(parity_agent, ROWS)
        finally:
            trainer.close()
        results[label] = (summary.accuracy, _completions(run_dir.parent / label))
    assert results["adapter"] == results["merged"]
    assert results["adapter"][1] != results["base"][1]  # the adapter changed what the model writes


def test_adapter_on_vllm_is_loaded_and_routed_like_the_embedded_engines(
    trained: tuple[Path, list], tiny_model_dir: Path
) -> None:
    from fake_vllm import FakeVLLM

    from rltrain.gateway.server import GatewayServer

    run_dir, _ = trained
    server = FakeVLLM(tiny_model_dir, str(tiny_model_dir), max_lora_rank=16)
    results = {}
    with GatewayServer(server.app) as http:
        for label, engine in (("vllm", {"kind": "vllm", "vllm": {"url": http.base_url}}), ("embedded", {})):
            trainer = small(run_dir.parent / f"{label}-adapter", {"name": str(tiny_model_dir),
                                                                   "adapter": str(run_dir / "final")}, engine=engine)
            try:
                [summary] = trainer.evaluate(parity_agent, ROWS)
            finally:
                trainer.close()
            results[label] = (summary.accuracy, _completions(run_dir.parent / f"{label}-adapter"))
    assert server.lora_calls[0] == ("load", "policy-v0")
    assert {r["model"] for r in server.requests} == {"policy-v0"}
    assert results["vllm"] == results["embedded"]


def test_cli_trains_a_recipe_that_names_its_agent(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "byoa_cli_agent.py").write_text(
        "from rltrain import emit_answer, rollout, reply_with\n\n"
        "@rollout\ndef teacher(task, resources):\n"
        "    messages = [{'role': 'user', 'content': resources.prompts['user'].format(word=task['word'])}]\n"
        "    return 1.0 if reply_with(resources, messages, 'okay').choices[0].message.content == 'okay' else 0.0\n"
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: cli\noutput_dir: {tmp_path}/runs\nagent: tests.test_bring_your_own_agent:parity_agent\n"
        f"model: {{name: {tiny_model_dir}}}\nprompts: {{user: 'Repeat {{word}}.'}}\n"
        "data: {train: tasks.jsonl, val: tasks.jsonl}\nsampling: {eval: {max_tokens: 4}}\n"
        "algorithm: {name: sft, teacher: byoa_cli_agent:teacher, max_steps: 1, batch_size: 2}\n"
    )
    assert main(["train", str(recipe), "--no-progress"]) == 0
    recorded = (tmp_path / "runs" / "cli" / "recipe.yaml").read_text()
    assert f"train: {tmp_path / 'tasks.jsonl'}" in recorded  # read next to the recipe, recorded absolute
    assert (tmp_path / "runs" / "cli" / "final" / "adapter_config.json").exists()


def test_a_plain_agent_is_the_sft_teacher(tmp_path: Path, tiny_model_dir: Path) -> None:
    trainer = small(tmp_path, str(tiny_model_dir), SFT(teacher=parity_teacher, max_steps=2, batch_size=2))
    try:
        trainer.fit(parity_agent, train_dataset=ROWS, val_dataset=ROWS[:2])
        demos = trainer.store.list_rollouts(mode="warm_start")
        records = [s.attributes for r in demos for s in trainer.store.get_spans(r.rollout_id) if s.kind is SpanKind.LLM]
    finally:
        trainer.close()
    assert len(demos) == 4 and all(r.reward == 1.0 for r in demos)
    assert all(rec["teacher"] and rec["text"] == "okay" for rec in records)
    assert (tmp_path / "final" / "adapter_config.json").exists()
    assert f"teacher: {parity_teacher.fn.__module__}:parity_teacher" in (tmp_path / "recipe.yaml").read_text()


def test_no_teacher_is_a_clear_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    from rltrain.envs.agent_env import MissingAgentError

    trainer = small(tmp_path, str(tiny_model_dir), SFT(max_steps=1))
    try:
        with pytest.raises(MissingAgentError, match="SFT\\(teacher=my_teacher\\)"):
            trainer.fit(parity_agent, train_dataset=ROWS, val_dataset=ROWS[:2])
    finally:
        trainer.close()


# -- the recipe reference ---------------------------------------------------------------------------------------
def _paths(model: type, prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        if path == "algorithm":
            paths.append(path)
            for section in ALGORITHMS:
                paths += _paths(section, "algorithm.")
            continue
        paths.append(path)
        nested = [a for a in (info.annotation, *getattr(info.annotation, "__args__", ()))
                  if isinstance(a, type) and hasattr(a, "model_fields")]
        if nested:
            paths += _paths(nested[0], f"{path}.")
    return paths


def test_recipe_schema_lists_every_field_with_type_default_and_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipe", "schema"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    heads = {line.split(":", 1)[0]: (line, lines[i + 1]) for i, line in enumerate(lines) if not line.startswith(" ")}
    expected = _paths(Recipe)
    assert len(expected) > 150
    for path in expected:
        assert path in heads, path
        head, description = heads[path]
        assert ": " in head and description.startswith("    ") and description.strip(), f"{path}: {head!r}"
    assert "algorithm.report_to" in heads and "model.adapter" in heads and "algorithm.teacher" in heads
    for section in ALGORITHMS:  # report_to for every algorithm
        assert "report_to" in section.model_fields


def test_nothing_below_the_trainer_imports_it() -> None:
    """Imports run one way: the Trainer holds the algorithm and calls it; algorithms (and what they use) get a
    RunContext and never import the Trainer, the CLI or the escalation ladder above it."""
    import ast

    root = Path(__file__).resolve().parents[1] / "rltrain"
    above = {"rltrain.trainer", "rltrain.cli", "rltrain.escalation", "rltrain.report"}
    below = [*root.glob("algorithms/*.py"), *root.glob("adapters/*.py"), *root.glob("gateway/*.py"),
             *root.glob("store/*.py"), *root.glob("envs/**/*.py"),
             *(root / name for name in ("run_context.py", "runner.py", "serving.py", "recipes.py", "task_data.py",
                                         "agent.py", "metrics.py", "models.py"))]
    offenders = []
    for path in below:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n in above]
    assert len(below) > 30 and offenders == []
