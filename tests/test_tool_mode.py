"""The tool form of the room selector on a tiny model: tool-teacher demonstrations and multi-turn RL rows.

A tool-teacher rollout is the ``tool`` agent's conversation with every reply given (``rltrain_completion``): the
tool call in the gateway's tool-call format, the real tool's result, the solver's answer. It must become one row
per rollout whose tool-result tokens are masked, so the warm start trains both assistant turns and nothing else.

RL rows of multi-turn rollouts come from the real gateway path: a small agent (made here) that calls the tiny
model twice with the same ``tools=``, with an observation between the calls, so each rollout is one row with the
observation masked, whatever the random model writes. The shared-prompt pass gives TRL's log-probs on such rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from openai import OpenAI
from test_sft import room_recipe
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head
from weather_tool import WEATHER_TOOL

from rltrain import envs
from rltrain.agent import rollout
from rltrain.algorithms.grpo import CompletionTooLongError, RolloutDriver
from rltrain.algorithms.sft import WarmStartError, build_sft_trainer, collect_demonstrations, sft_dataset
from rltrain.algorithms.shared_prompt import shared_prompt_logps
from rltrain.envs.room_selection.catalog import Catalog
from rltrain.envs.room_selection.solver import solve
from rltrain.envs.room_selection.tasks import request_of
from rltrain.metrics import MetricsWriter
from rltrain.models import load_model_and_tokenizer
from rltrain.recipes import GRPOSection, LoraConfig, RunnerConfig, WarmStartConfig
from rltrain.serving import ServingStack
from rltrain.trainer import Trainer
from rltrain.types import LLMCallRecord, PromptTemplate, Resources, Span, SpanKind, Task

TOOL_SAMPLING = {"train": {"temperature": 1.0, "max_tokens": 80}, "eval": {"temperature": 0.0, "max_tokens": 80}}


def tool_recipe(tmp_path: Path, model_dir: Path, sampling: dict[str, Any] = TOOL_SAMPLING) -> Any:
    recipe = room_recipe(tmp_path, model_dir, sampling=sampling)
    return recipe.model_copy(update={"env": recipe.env.model_copy(update={"mode": "tool"})})


def llm_records(spans: list[Span]) -> list[LLMCallRecord]:
    return [LLMCallRecord.model_validate(s.attributes) for s in spans if s.kind is SpanKind.LLM]


def runs(mask: list[int]) -> list[tuple[int, int]]:
    """``mask`` as (value, length) runs."""
    out: list[tuple[int, int]] = []
    for value in mask:
        if out and out[-1][0] == value:
            out[-1] = (value, out[-1][1] + 1)
        else:
            out.append((value, 1))
    return out


TOOL_TEACHER = WarmStartConfig(teacher_mode="tool_teacher", batch_size=3, max_steps=1, max_length=2048)


@contextlib.contextmanager
def tool_demonstrations(
    recipe: Any, model_dir: Path
) -> Iterator[tuple[Trainer, list[Any], dict[str, Any], Any, Any]]:
    """The tool teacher's demonstrations of the recipe's training tasks through the gateway: the trainer (open
    until the block ends), the rows, the metrics, and the model and tokenizer that served them."""
    trainer = Trainer(recipe, progress=False)
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    try:
        with ServingStack(trainer.recipe, trainer.store, model=model, tokenizer=tokenizer) as stack:
            rows, metrics = collect_demonstrations(trainer.run, stack, TOOL_TEACHER)
        yield trainer, rows, metrics, model, tokenizer
    finally:
        trainer.close()


def test_tool_teacher_demonstrations_are_one_row_per_rollout_with_tool_results_masked(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with tool_demonstrations(tool_recipe(tmp_path, tiny_model_dir), tiny_model_dir) as (
        trainer, rows, metrics, model, tokenizer
    ):
        rollouts = trainer.store.list_rollouts(mode="warm_start")
        assert len(rollouts) == 3 == len(rows) == metrics["warm_start/teacher/rows"]
        catalog = trainer.run.env.catalog
        for rollout_, row in zip(rollouts, rows, strict=True):
            spans = trainer.store.get_spans(rollout_.rollout_id)
            call, answer = llm_records(spans)
            [tool] = [s for s in spans if s.kind is SpanKind.TOOL]
            assert rollout_.reward == 1.0 and call.teacher and answer.teacher
            assert call.finish_reason == "tool_calls" and call.tool_calls and tool.attributes["error"] is None
            assert answer.prefix_reused and answer.fork_cause is None and call.tools == answer.tools
            # one row: the first prompt, then [tool call] (trained), [tool result + template] (masked), [answer]
            assert row.prompt_ids == call.prompt_ids
            assert row.prompt_ids + row.completion_ids == answer.prompt_ids + answer.completion_ids
            (one, n_call), (zero, n_between), (one_again, n_answer) = runs(row.env_mask)
            assert (one, zero, one_again) == (1, 0, 1)
            assert (n_call, n_answer) == (len(call.completion_ids), len(answer.completion_ids))
            completion = row.completion_ids
            assert tokenizer.decode(completion[:n_call]).startswith('<tool_call>\n{"name": "get_rooms_and_availability"')
            between = tokenizer.decode(completion[n_call:n_call + n_between])
            assert "<tool_response>" in between and '"rooms"' in between
            expected = solve(request_of(rollout_.task.payload), catalog)
            assert tokenizer.decode(completion[n_call + n_between:]) == f"final_choice: {expected}<|im_end|>"

        sft, _ = build_sft_trainer(model, tokenizer, rows, TOOL_TEACHER, LoraConfig(r=4, alpha=8), tmp_path / "sft",
                                   seed=3, progress=False)
        for example, row in zip(sft.train_dataset, rows, strict=True):  # the loss sees both turns, no tool token
            policy = [t for t, m in zip(row.completion_ids, row.env_mask, strict=True) if m]
            assert [label for label in example["labels"] if label != -100] == policy
        longest = max(len(r.prompt_ids) + len(r.completion_ids) for r in rows)
        with pytest.raises(WarmStartError, match=rf"longer than max_length={longest - 1} .* at least {longest}$"):
            sft_dataset(rows, longest - 1)  # never cut: the cut would be the answer


@pytest.mark.parametrize("tool_result", ["brief", "checks"])
def test_tool_teacher_on_random_catalogs_gets_each_tasks_own_rooms(
    tmp_path: Path, tiny_model_dir: Path, tool_result: str
) -> None:
    """Through the gateway and the real tool: each task's tool result lists its own catalog's rooms, and the
    solver's answer on that catalog is the reward-1.0 demonstration; the ``checks`` tool's call carries the
    whole request and its result the verdict that makes the solver's answer the best passing room."""
    # the checks tool's call carries the whole request: ~80 tokens of the tiny tokenizer, more than TOOL_SAMPLING's
    sampling = {phase: {**params, "max_tokens": 160} for phase, params in TOOL_SAMPLING.items()}
    recipe = tool_recipe(tmp_path, tiny_model_dir, sampling)
    recipe = recipe.model_copy(update={
        "env": recipe.env.model_copy(update={"options": {"tool_result": tool_result}}),
        "data": recipe.data.model_copy(update={"train": "generated:n=3,seed=5,catalogs=random"}),
    })
    with tool_demonstrations(recipe, tiny_model_dir) as (trainer, rows, _, _, _):
        rollouts = trainer.store.list_rollouts(mode="warm_start")
        assert len(rows) == len(rollouts) == 3
        rooms_seen = []
        for rollout_ in rollouts:
            own = Catalog.model_validate(rollout_.task.payload["catalog"])
            [tool] = [s for s in trainer.store.get_spans(rollout_.rollout_id) if s.kind is SpanKind.TOOL]
            rooms = tool.attributes["result"]["rooms"]
            request = request_of(rollout_.task.payload)
            expected = rollout_.task.payload["expected_choice"]
            assert rollout_.reward == 1.0 and expected == solve(request, own)
            if tool_result == "checks":
                assert tool.attributes["arguments"] == request.model_dump() and list(rooms) == own.room_ids
                assert expected == "No Room" or rooms[expected].startswith("PASSES")
            else:
                assert [room["id"] for room in rooms] == own.room_ids
            rooms_seen.append(own.room_ids)
        assert len({tuple(ids) for ids in rooms_seen}) == 3


def test_tool_demonstrations_that_max_tokens_would_cut_are_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The issue's trap: a 12-token reply budget cannot hold a tool call, so training on such demonstrations would
    leave every greedy reply cut before ``</tool_call>``."""
    sampling = {**TOOL_SAMPLING, "eval": {"temperature": 0.0, "max_tokens": 12}}
    trainer = Trainer(tool_recipe(tmp_path, tiny_model_dir, sampling), progress=False)
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    try:
        with ServingStack(trainer.recipe, trainer.store, model=model, tokenizer=tokenizer) as stack, \
                pytest.raises(WarmStartError, match=r"sampling\.eval\.max_tokens=12 .* at least \d\d"):
            collect_demonstrations(trainer.run, stack, WarmStartConfig(teacher_mode="tool_teacher"))
    finally:
        trainer.close()


@rollout(name="two_turn")
def two_turn_agent(task: dict[str, Any], resources: Resources) -> float:
    """Ask, read an observation, answer: two calls with the same tools; reward 1 for an even-length answer."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": resources.prompts["ask"].format(**task)}]
    with OpenAI(base_url=resources.llm.base_url, api_key=resources.llm.api_key) as client:
        for observation in ("Observation: it is 18 C in Paris. Now answer.", None):
            response = client.chat.completions.create(
                model=resources.llm.model, messages=messages, tools=[WEATHER_TOOL],  # type: ignore[arg-type, list-item]
                max_tokens=resources.llm.sampling.max_tokens, temperature=resources.llm.sampling.temperature,
            )
            message = response.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if observation is not None:
                messages.append({"role": "user", "content": observation})
    return float(len(message.content or "") % 2 == 0)


class TwoTurnEnv:
    name = "two_turn"

    def load_tasks(self, spec: str) -> list[Task]:
        return [Task(id=f"city-{i}", payload={"city": city}) for i, city in enumerate(("Paris", "Oslo", "Rome"))]

    def agent(self, mode: str) -> Any:
        return two_turn_agent

    def reference_agent(self) -> Any:
        return two_turn_agent

    def default_prompts(self, mode: str) -> dict[str, PromptTemplate]:
        return {"ask": PromptTemplate(template="Weather in {city}?", placeholders=["city"])}

    def answer_space(self) -> None:
        return None

    def answer_of(self, spans: list[Span]) -> None:
        return None


@pytest.fixture
def two_turn_trainer(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(envs._REGISTRY, "two_turn", TwoTurnEnv)
    recipe = room_recipe(tmp_path, tiny_model_dir, sampling={"train": {"temperature": 1.0, "max_tokens": 6}})
    recipe = recipe.model_copy(update={"env": recipe.env.model_copy(update={"name": "two_turn", "mode": "any"})})
    trainer = Trainer(recipe, progress=False)
    yield trainer
    trainer.close()


def sample_step(trainer: Trainer, model: Any, tokenizer: Any, max_completion_length: int) -> Any:
    """One step's rollouts of 2 tasks x 4 through the real gateway and runner, as GRPO's rollout_func runs them."""
    section = GRPOSection(tasks_per_step=2, num_generations=4, max_completion_length=max_completion_length)
    tasks = trainer.run.load_tasks("all")
    driver = RolloutDriver(agent=two_turn_agent, env=trainer.run.env, store=trainer.store, tasks=tasks, section=section,
                           runner_config=RunnerConfig(concurrency=8), metrics=MetricsWriter(trainer.run_dir / "m.jsonl"),
                           progress=False)
    with ServingStack(trainer.recipe, trainer.store, model=model, tokenizer=tokenizer) as stack:
        driver.bind(stack.url, lambda v: trainer.run.resources(stack.model_name, trainer.recipe.sampling.train, v),
                    lambda v: None, stack.release)
        return driver.sample([(tasks[0], 4), (tasks[1], 4)], driver.resources_for(0), 0)


def test_multi_turn_rollouts_are_one_rl_row_each_with_the_observation_masked(
    two_turn_trainer: Trainer, tiny_model_dir: Path
) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    samples = sample_step(two_turn_trainer, model, tokenizer, max_completion_length=256)
    assert len(samples.rows) == 8 and samples.metrics["adapter/forked_rows"] == 0
    for rollout_, row in zip(samples.rollouts, samples.rows, strict=True):
        first, second = llm_records(samples.spans[rollout_.rollout_id])
        assert row is not None and row.rollout_id == rollout_.rollout_id and row.reward == rollout_.reward
        assert second.prefix_reused and row.prompt_ids == first.prompt_ids
        assert row.prompt_ids + row.completion_ids == second.prompt_ids + second.completion_ids
        (_, n_first), (zero, n_between), (_, n_second) = runs(row.env_mask)
        assert zero == 0 and (n_first, n_second) == (len(first.completion_ids), len(second.completion_ids))
        assert "Observation" in tokenizer.decode(row.completion_ids[n_first:n_first + n_between])
        assert row.logprobs[:n_first] == first.logprobs and row.logprobs[-n_second:] == second.logprobs

    # The shared-prompt pass on these rows (a group's rows share their first prompt, not their later turns)
    # gives TRL's whole-row log-probs.
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs", "entropy"))
    rows = [row for row in samples.rows if row is not None]
    prompt_width = max(len(r.prompt_ids) for r in rows)
    completion_width = max(len(r.completion_ids) for r in rows)
    ids = torch.zeros(len(rows), prompt_width + completion_width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):  # as TRL pads them: prompts on the left, completions on the right
        ids[i, prompt_width - len(row.prompt_ids):prompt_width] = torch.tensor(row.prompt_ids)
        ids[i, prompt_width:prompt_width + len(row.completion_ids)] = torch.tensor(row.completion_ids)
        mask[i, prompt_width - len(row.prompt_ids):prompt_width + len(row.completion_ids)] = 1
    with torch.no_grad():
        shared = shared_prompt_logps(model, ids, mask, completion_width, False, contextlib.nullcontext)
        trainer = SimpleNamespace(accelerator=SimpleNamespace(autocast=contextlib.nullcontext))
        whole, _, _ = GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__(
            trainer, model, ids, mask, completion_width, compute_entropy=False)
    assert shared is not None and shared.rows_per_prompt == 4.0
    scored = mask[:, prompt_width:].bool()
    torch.testing.assert_close(shared.logps[scored], whole[scored], atol=2e-4, rtol=0)


def test_a_row_longer_than_max_completion_length_stops_with_the_length_it_needs(
    two_turn_trainer: Trainer, tiny_model_dir: Path
) -> None:
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    with pytest.raises(CompletionTooLongError, match=r"algorithm\.max_completion_length=8 .* at least \d+") as caught:
        sample_step(two_turn_trainer, model, tokenizer, max_completion_length=8)
    assert "of them the model's" in str(caught.value)
