"""Warm-start SFT steps on tool-mode demonstrations: TRL's ``SFTTrainer`` over whole rows vs rltrain's trainer that
runs the prefix the batch shares once.

The workload is the tool ladder's warm start (``recipes/room_selection_tool_ladder_cpu.yaml``): SmolLM2-135M-Instruct
with LoRA r=16 on all linear layers, batches of ``--batch`` demonstrations of the ``checks`` tool conversation as
the gateway renders it (system prompt with the tool's schema, the request, the teacher's tool call, the real tool
result, the solver's answer: ~780 tokens a row, ~510 of them the same in every row). Every token after the first
call's prompt is scored (the recipe's rows mask the tool result; on CPU TRL's head projects every position either
way, so the cost is the same).

* peer: ``trl.SFTTrainer`` itself (TRL 1.16), whole rows;
* rltrain: :class:`rltrain.algorithms.sft.SharedPrefixSFTTrainer` (the shared prefix once a batch, its KV cache
  repeated for the rows).

Both train from the same initial adapter on the same batches; the losses of every step are printed side by side
(they agree to float rounding). Time: each side's ``--steps`` optimiser steps, the first one not timed, run in
alternation ``--repeats`` times; medians per step. Run:
``.venv/bin/python benchmarks/bench_sft_prefix.py [--batch 4] [--steps 4] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, log, median, report

from rltrain.algorithms.sft import build_sft_trainer
from rltrain.envs.room_selection import RoomSelectionEnv, default_prompts
from rltrain.envs.room_selection.prompts import prompt_values
from rltrain.envs.room_selection.solver import solve
from rltrain.envs.room_selection.tasks import request_of
from rltrain.envs.room_selection.tools import (
    TOOL_NAME,
    SearchQuery,
    execute_tool_call,
    tool_definitions,
    tool_message_content,
)
from rltrain.gateway.chat_format import ChatFormat
from rltrain.gateway.schemas import ChatMessage, ToolSpec
from rltrain.gateway.tool_calls import format_tool_call
from rltrain.models import DEFAULT_MODEL, load_model_and_tokenizer
from rltrain.recipes import LoraConfig, WarmStartConfig
from rltrain.types import Trajectory


def demonstrations(tokenizer: Any, count: int) -> list[Trajectory]:
    """``count`` teacher conversations on generated requests, tokenised as the gateway renders them."""
    env = RoomSelectionEnv()
    chat = ChatFormat(tokenizer)
    templates = default_prompts("tool", tool_result="checks")
    tools = [ToolSpec.model_validate(tool) for tool in tool_definitions("checks")]
    rows = []
    for task in env.load_tasks(f"generated:n={count},seed=11"):
        request = request_of(task.payload)
        values = prompt_values("tool", request, env.catalog)
        opening = [ChatMessage(role="system", content=templates["system"].format(**values)),
                   ChatMessage(role="user", content=templates["user"].format(**values))]
        arguments = request.model_dump_json(include=set(SearchQuery.model_fields))
        result = tool_message_content(execute_tool_call(TOOL_NAME, arguments, env.catalog, "checks"))
        conversation = [*opening,
                        ChatMessage(role="assistant", content=format_tool_call(TOOL_NAME, request.model_dump(
                            include=set(SearchQuery.model_fields)))),
                        ChatMessage(role="tool", content=result, tool_call_id="call_0"),
                        ChatMessage(role="assistant", content=f"final_choice: {solve(request, env.catalog)}")]
        prompt = chat.tokenize(chat.render(opening, tools))
        whole = chat.tokenize(chat.render(conversation, tools, continue_final_message=True))
        assert whole[:len(prompt)] == prompt, "the conversation extends the first call's prompt"
        completion = whole[len(prompt):]
        rows.append(Trajectory(rollout_id=task.id, prompt_ids=prompt, completion_ids=completion,
                               logprobs=[0.0] * len(completion), env_mask=[1] * len(completion), reward=1.0,
                               group_id=task.id, policy_version=0))
    return rows


class _StepClock(TrainerCallback):
    """Seconds of each optimiser step."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def run_side(share: bool, rows: list[Trajectory], args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Step times (the first, warm-up step left out) and losses of ``args.steps`` steps of one side."""
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    config = WarmStartConfig(max_steps=args.steps, batch_size=args.batch, learning_rate=1e-3, max_length=2048,
                             share_prefix_forward=share)
    with tempfile.TemporaryDirectory() as out:
        trainer, _ = build_sft_trainer(model, tokenizer, rows, config, LoraConfig(r=16, alpha=32), Path(out),
                                       seed=0, progress=False)
        clock = _StepClock()
        trainer.add_callback(clock)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return clock.seconds[1:], losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="demonstrations per step (the recipe's batch_size)")
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps per side and trial (first untimed)")
    parser.add_argument("--repeats", type=int, default=2, help="trials per side, in alternation")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (for run_all.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    rows = demonstrations(tokenizer, args.batch * args.steps)
    lengths = [len(row.prompt_ids) + len(row.completion_ids) for row in rows]
    log(f"{len(rows)} demonstrations of {min(lengths)}-{max(lengths)} tokens")
    times: dict[str, list[float]] = {"rltrain": [], "trl": []}
    for trial in range(args.repeats):
        for side in times:
            seconds, losses = run_side(side == "rltrain", rows, args)
            times[side] += seconds
            log(f"trial {trial}: {side} {median(seconds):.2f} s a step; losses {[round(x, 4) for x in losses]}")
    report([Row("sft_prefix", f"warm-start SFT step, {args.batch} tool-mode demonstrations", "s",
                median(times["rltrain"]), median(times["trl"]), higher_is_better=False,
                note="peer: TRL 1.16 SFTTrainer over whole rows")])


if __name__ == "__main__":
    main()
