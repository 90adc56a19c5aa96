"""The embedded engine's batching: rows joining the running batch between decode steps vs one batch at a time.

Workload: ``--agents`` tool-mode agents on SmolLM2-135M-Instruct, all started together, each making two chat calls
as the room-selection tool agent does: the first call (the gateway's rendering of a request with the ``checks``
tool's schema, ~530 tokens) for a seeded random 40-100 greedy tokens, then a second call that continues it with a
tool-result block for a seeded random 20-200 tokens. The engine holds at most ``--batch`` rows: with more agents than
rows (the default, as a tool-ladder validation runs 32 agents on 16 rows) calls queue for room; with as many agents
as rows (``--agents 16``) every first call fits the first batch and static batching wastes little (measured 0.9x).

* rltrain: the engine as it is: a call that arrives while a batch decodes joins it at the next step (starting from
  the system-prompt prefix the batch already computed), and is answered as soon as its own rows finish;
* peer: the same engine serving one batch at a time (rows join only an idle engine: a batch runs until its longest
  row finishes, as before the change and as a ``model.generate`` loop does).

A second row times one decode step of 16 rows at ~700 cached tokens with the KV cache kept in preallocated
buffers (rltrain) vs grown by ``torch.cat`` (transformers' ``DynamicLayer``, the peer), the other half of the
change. Both sides give the same tokens / logits (checked). Time: medians of ``--repeats`` alternating trials in
this process. Run: ``.venv/bin/python benchmarks/bench_engine_batching.py [--agents 32] [--batch 16] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, log, median, report
from bench_prefix_share import first_call_prompts
from transformers.cache_utils import DynamicCache

from rltrain.engines.base import GenerationRequest
from rltrain.engines.transformers import TransformersEngine, _BufferLayer, _widened
from rltrain.models import DEFAULT_MODEL, load_model_and_tokenizer

TOOL_RESULT = (
    "<|im_end|>\n<|im_start|>tool\nPASSES: Lyra (slack 2, extra 1, 8 m, 1 bookings)\nFAILS: Vega (busy)\n"
    "PASSES: Orion (slack 4, extra 0, 3 m, 2 bookings)\nFAILS: Nova (capacity 6 < 9)\n<|im_end|>\n"
    "<|im_start|>assistant\n"
)


class OneBatchAtATime(TransformersEngine):
    """The peer: the same engine, but rows join only an idle engine (static batching)."""

    def _admit(self) -> None:
        if self._running is None:
            super()._admit()


def run_agents(engine: TransformersEngine, prompts: list[list[int]], lengths: list[tuple[int, int]]) -> list[Any]:
    """Every agent's two calls, all agents at once; returns each agent's two completions."""
    tool_ids = engine.tokenizer.encode(TOOL_RESULT, add_special_tokens=False)

    async def agent(prompt: list[int], first: int, second: int) -> tuple[list[int], list[int]]:
        call = await engine.generate(GenerationRequest(prompt_ids=prompt, max_tokens=first, temperature=0.0))
        ids = call.completions[0].completion_ids
        answer = await engine.generate(
            GenerationRequest(prompt_ids=[*prompt, *ids, *tool_ids], max_tokens=second, temperature=0.0)
        )
        return ids, answer.completions[0].completion_ids

    async def everyone() -> list[Any]:
        return list(await asyncio.gather(*(agent(p, *n) for p, n in zip(prompts, lengths, strict=True))))

    return asyncio.run(everyone())


def decode_step_times(steps: int, rows: int, context: int) -> tuple[float, float]:
    """Seconds per decode step (rows x one token) with buffered vs concatenated KV layers, same logits checked."""
    model, _ = load_model_and_tokenizer(DEFAULT_MODEL)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (rows, context), generator=generator)
    with torch.no_grad():
        prefix = model(input_ids=ids, use_cache=True, logits_to_keep=1).cache
        seconds, logits = {}, {}
        for side in ("buffered", "concatenated"):
            cache = DynamicCache(ddp_cache_data=[(layer.keys.clone(), layer.values.clone()) for layer in prefix.layers])
            if side == "buffered":
                cache.layers = [_BufferLayer(_widened(layer.keys, context, context + steps),
                                             _widened(layer.values, context, context + steps), context)
                                for layer in cache.layers]
            mask = torch.ones((rows, context), dtype=torch.long)
            token = ids[:, -1:]
            start = time.perf_counter()
            for step in range(steps):
                mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
                out = model(input_ids=token, attention_mask=mask, position_ids=torch.full((rows, 1), context + step),
                            cache=cache, use_cache=True)
            seconds[side] = (time.perf_counter() - start) / steps
            logits[side] = out.logits
    if not torch.equal(logits["buffered"], logits["concatenated"]):
        raise SystemExit("buffered and concatenated KV caches gave different logits")
    return seconds["buffered"], seconds["concatenated"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=32, help="agents started together (two calls each)")
    parser.add_argument("--batch", type=int, default=16, help="the engine's max_batch_size")
    parser.add_argument("--repeats", type=int, default=3, help="timed trials per side")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (for run_all.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    engines = {
        "rltrain": TransformersEngine(model, tokenizer, model_name="rltrain", max_batch_size=args.batch),
        "peer": OneBatchAtATime(model, tokenizer, model_name="peer", max_batch_size=args.batch),
    }
    draw = random.Random(0)
    lengths = [(draw.randint(40, 100), draw.randint(20, 200)) for _ in range(args.agents)]
    try:
        prompts = first_call_prompts(tokenizer, "tool", args.agents)
        log(f"{len(prompts)} agents, calls of {sum(a + b for a, b in lengths)} greedy tokens in all")
        times: dict[str, list[float]] = {side: [] for side in engines}
        outputs: dict[str, list[Any]] = {}
        for trial in range(args.repeats):
            for side, engine in engines.items():
                start = time.perf_counter()
                outputs[side] = run_agents(engine, prompts, lengths)
                times[side].append(time.perf_counter() - start)
                log(f"trial {trial}: {side} {times[side][-1]:.1f} s ({engine.stats.batches} batches so far)")
        if outputs["rltrain"] != outputs["peer"]:
            raise SystemExit("the two sides decoded different tokens")
    finally:
        for engine in engines.values():
            engine.close()
    buffered, concatenated = decode_step_times(steps=32, rows=16, context=700)
    tokens = sum(len(first) + len(second) for first, second in outputs["rltrain"])
    report([
        Row("engine_batching", f"{args.agents} two-call tool agents, {tokens} greedy tokens, batch {args.batch}",
            "s", median(times["rltrain"]), median(times["peer"]), higher_is_better=False,
            note="peer: the same engine serving one batch at a time"),
        Row("engine_batching", "one decode step, 16 rows at ~700 cached tokens", "ms", buffered * 1000,
            concatenated * 1000, higher_is_better=False, note="peer: KV grown by torch.cat (DynamicLayer)"),
    ])


if __name__ == "__main__":
    main()
