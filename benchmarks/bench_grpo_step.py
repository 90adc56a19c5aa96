"""One GRPO step: rltrain (agents -> gateway -> engine -> store -> adapter -> TRL) vs TRL generating by itself.

Same model (SmolLM2-135M-Instruct, LoRA r=16 on all linear layers), same prompts, batch (2 prompts x 4
generations), completion length (8 tokens), sampling temperature and reward, in one process:

* TRL: ``trl.GRPOTrainer`` with a reward function, generating with ``model.generate`` itself;
* rltrain: ``Trainer.fit`` with an ``@rollout`` agent that sends the same chat messages through the stock
  ``openai`` client to the gateway and returns the same reward.

Both report TRL's own ``step_time`` metric (generation + scoring + optimiser step); the figure is the median over
steps after the first. Prints both and the ratio (rltrain's overhead). Run:
``.venv/bin/python benchmarks/bench_grpo_step.py [--steps 4]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import log, median

from rltrain.agent import rollout
from rltrain.envs import register_env
from rltrain.metrics import read_metrics
from rltrain.models import DEFAULT_MODEL, load_model_and_tokenizer
from rltrain.recipes import parse_recipe
from rltrain.trainer import Trainer
from rltrain.types import PromptTemplate, Resources, Span, Task

ROOMS = ["Orion", "Lyra", "Vega", "Nova", "Quark", "Atlas", "Pulse", "Mira"]
PROMPT = "Suggest a name for a meeting room like {room}. Answer with one word."
GENERATIONS, PROMPTS_PER_STEP, COMPLETION, TEMPERATURE = 4, 2, 8, 1.0


def reward_of(text: str) -> float:
    """Shared by both sides: a reward with spread, so both take real optimiser steps."""
    return 1.0 if len(text.strip()) % 2 == 0 else 0.0


@rollout
def bench_agent(task: dict, resources: Resources) -> float:
    with OpenAI(base_url=resources.llm.base_url, api_key=resources.llm.api_key) as client:
        reply = client.chat.completions.create(
            model=resources.llm.model,
            messages=[{"role": "user", "content": resources.prompts["user"].format(room=task["room"])}],
            temperature=resources.llm.sampling.temperature, max_tokens=resources.llm.sampling.max_tokens,
        )
    return reward_of(reply.choices[0].message.content or "")


class BenchEnv:
    """The prompts above as an rltrain environment."""

    name = "bench_prompts"

    def load_tasks(self, spec: str) -> list[Task]:
        return [Task(id=room, payload={"room": room}) for room in ROOMS]

    def agent(self, mode: str) -> Any:
        return bench_agent

    def reference_agent(self) -> Any:
        return bench_agent

    def default_prompts(self, mode: str) -> dict[str, PromptTemplate]:
        return {"user": PromptTemplate(template=PROMPT, placeholders=["room"])}

    def answer_space(self) -> None:
        return None

    def answer_of(self, spans: list[Span]) -> None:
        return None


def trl_step_times(steps: int, out: Path) -> list[float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    times: list[float] = []

    class Collect(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "step_time" in logs:
                times.append(float(logs["step_time"]))

    def reward(completions: list[Any], **_: Any) -> list[float]:
        return [reward_of(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    config = GRPOConfig(
        output_dir=str(out), use_cpu=True, bf16=False, max_steps=steps, num_generations=GENERATIONS,
        per_device_train_batch_size=GENERATIONS * PROMPTS_PER_STEP, max_completion_length=COMPLETION,
        temperature=TEMPERATURE, learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to=[],
        gradient_checkpointing=False, disable_tqdm=True, seed=0,
    )
    dataset = Dataset.from_dict(
        {"prompt": [[{"role": "user", "content": PROMPT.format(room=room)}] for room in ROOMS]}
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer,
                          peft_config=LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32,
                                                 target_modules="all-linear"),
                          callbacks=[Collect()])
    trainer.train()
    return times


def rltrain_step_times(steps: int, out: Path) -> list[float]:
    register_env("bench_prompts", BenchEnv)
    recipe = parse_recipe({
        "name": "bench-grpo", "output_dir": str(out), "model": {"name": DEFAULT_MODEL},
        "env": {"name": "bench_prompts"}, "data": {"train": "all", "val": "all"},
        "runner": {"concurrency": GENERATIONS * PROMPTS_PER_STEP},
        "sampling": {"train": {"temperature": TEMPERATURE, "max_tokens": COMPLETION},
                     "eval": {"temperature": 0.0, "max_tokens": COMPLETION}},
        "algorithm": {"name": "grpo", "max_steps": steps, "tasks_per_step": PROMPTS_PER_STEP,
                      "num_generations": GENERATIONS, "learning_rate": 1e-4, "eval_steps": steps + 1,
                      "save_steps": steps + 1, "max_completion_length": COMPLETION},
    })
    trainer = Trainer(recipe, progress=False)
    try:
        trainer.fit()
    finally:
        trainer.close()
    records = read_metrics(out / "bench-grpo" / "metrics.jsonl")
    return [float(r["step_time"]) for r in records if r.get("event") == "train" and "step_time" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log("TRL GRPOTrainer generating by itself ...")
        trl = trl_step_times(args.steps, Path(tmp) / "trl")
        log(f"  step times {[f'{t:.1f}' for t in trl]}")
        log("rltrain: agents through the gateway ...")
        ours = rltrain_step_times(args.steps, Path(tmp) / "rltrain")
        log(f"  step times {[f'{t:.1f}' for t in ours]}")
    t, o = median(trl[1:]), median(ours[1:])
    print(f"GRPO step, {PROMPTS_PER_STEP} prompts x {GENERATIONS} generations, {COMPLETION} tokens, SmolLM2 + LoRA")
    print(f"TRL GRPOTrainer (generates itself) : {t:6.2f} s/step")
    print(f"rltrain (agents -> gateway -> TRL) : {o:6.2f} s/step")
    print(f"ratio rltrain / TRL                : {o / t:6.2f}x (overhead {o - t:+.2f} s)")


if __name__ == "__main__":
    main()
