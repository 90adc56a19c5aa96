"""The examples run as users run them (their ``main``), on the tiny model so that they take seconds here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

from rltrain.store import open_store
from rltrain.types import SpanKind

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(relative: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(Path(relative).stem, EXAMPLES / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ported_room_selector_runs_apo_on_a_local_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    room = load("room_selector/room_selector.py")
    assert room.room_selection_grader("final_choice: Nova\nreason: fits", "Nova") == 1.0
    assert room.get_rooms_and_availability("2025-10-13", "10:00", 30)["rooms"][0]["free"] is False  # Orion booked
    [final] = room.main(["--model", str(tiny_model_dir), "--run-dir", str(tmp_path / "apo"), "--tasks", "2"])
    assert final.n == 2
    store = open_store("sqlite", tmp_path / "apo" / "store.sqlite")
    try:
        calls = [s for r in store.list_rollouts() for s in store.get_spans(r.rollout_id) if s.kind is SpanKind.LLM]
    finally:
        store.close()
    # the agent's own tool definitions and prompt template reached the model through the gateway
    assert calls and all(c.attributes["tools"] for c in calls if c.attributes["messages"][0]["role"] == "system")
    assert any("Find a room on 2025-10-13" in c.attributes["messages"][1]["content"] for c in calls)


def test_calculator_agent_trains_with_grpo_and_uses_its_tool(tmp_path: Path, tiny_model_dir: Path) -> None:
    calc = load("calculator/calculator_agent.py")
    assert calc.calculate("(3 + 4) * 2") == 14 and calc.first_number("it is 42.") == "42"
    with calc.tool_span("calculate", {}) as span:  # outside a rollout the agent's code runs as plain Python
        span.result = 1
    [final] = calc.main(["--model", str(tiny_model_dir), "--run-dir", str(tmp_path / "calc"), "--steps", "1"])
    assert final.n == 4
    metrics = [json.loads(line) for line in (tmp_path / "calc" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r.get("event") == "train" and "loss" in r] == [1]
    assert (tmp_path / "calc" / "final" / "adapter_config.json").exists()


def test_readme_example_is_short_and_runs(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    """The README's "Bring your own agent" example, as written but for the model (the tiny one here; the README
    says how long SmolLM2 takes), so the README cannot drift from the API."""
    import runpy

    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme[readme.index("## Bring your own agent"):]
    code = section[section.index("```python\n") + 10: section.index("```\n", section.index("```python\n") + 10)]
    assert len(code.splitlines()) < 30
    assert code.count('"SmolLM2-135M-Instruct"') == 1
    (tmp_path / "example.py").write_text(code.replace('"SmolLM2-135M-Instruct"', repr(str(tiny_model_dir))))
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tmp_path / "example.py"), run_name="__main__")
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "capitals" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics if r.get("event") == "train" and "loss" in r] == [1, 2]
    assert json.loads((tmp_path / "runs" / "capitals" / "eval" / "eval.json").read_text())[0]["n"] == 6
