"""The embedded engine's prompt pass: a batch's shared prompt prefix computed once vs every prompt whole.

The workload is one batch of the room-selection agent's first chat call as the tool ladder validates it:
``--requests`` different requests (public and generated), each rendered by the gateway's chat format with the
``checks`` tool's schema in the system prompt (~530 SmolLM2 tokens, ~450 of them the same for every request),
sent together to one :class:`~rltrain.engines.transformers.TransformersEngine` on SmolLM2-135M-Instruct and
decoded greedily for ``--tokens`` tokens. ``--form inline`` runs the inline agent's prompts instead (its rooms
differ per request, so only the system prompt and the chat header are shared).

* rltrain: the engine as it is (the common prefix once, each prompt's own tokens after it);
* peer: the same engine with prefix sharing off (``SHARED_PREFIX_MIN_TOKENS`` out of reach), i.e. every prompt
  prefilled whole, as before the change and as ``model.generate`` does.

Both give the same tokens (checked). Time: medians of ``--repeats`` alternating trials in this process. Run:
``.venv/bin/python benchmarks/bench_prefix_share.py [--form tool|inline] [--requests 16] [--tokens 16]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, log, median, report

from rltrain.engines import transformers as embedded
from rltrain.engines.base import GenerationRequest
from rltrain.engines.transformers import TransformersEngine
from rltrain.envs.room_selection import RoomSelectionEnv, default_prompts
from rltrain.envs.room_selection.prompts import prompt_values
from rltrain.envs.room_selection.tasks import request_of
from rltrain.envs.room_selection.tools import tool_definitions
from rltrain.gateway.chat_format import ChatFormat
from rltrain.gateway.schemas import ChatMessage, ToolSpec
from rltrain.models import DEFAULT_MODEL


def first_call_prompts(tokenizer: Any, form: str, count: int) -> list[list[int]]:
    """The agent's first chat call for ``count`` requests, tokenised as the gateway renders it."""
    env = RoomSelectionEnv()
    tasks = (env.load_tasks("public:val") + env.load_tasks("generated:n=100,seed=99"))[:count]
    chat = ChatFormat(tokenizer)
    templates = default_prompts(form, tool_result="checks")
    tools = [ToolSpec.model_validate(tool) for tool in tool_definitions("checks")] if form == "tool" else None
    prompts = []
    for task in tasks:
        values = prompt_values(form, request_of(task.payload), env.catalog)
        messages = [ChatMessage(role="system", content=templates["system"].format(**values)),
                    ChatMessage(role="user", content=templates["user"].format(**values))]
        prompts.append(chat.tokenize(chat.render(messages, tools)))
    return prompts


def run_batch(engine: TransformersEngine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    async def batch() -> list[list[int]]:
        results = await asyncio.gather(*(
            engine.generate(GenerationRequest(prompt_ids=prompt, max_tokens=tokens, temperature=0.0))
            for prompt in prompts
        ))
        return [result.completions[0].completion_ids for result in results]

    return asyncio.run(batch())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--form", choices=["tool", "inline"], default="tool", help="which agent's prompts")
    parser.add_argument("--requests", type=int, default=16, help="requests in the batch (the engine's batch size)")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens decoded per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed trials per side")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (for run_all.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = TransformersEngine.from_pretrained(DEFAULT_MODEL, max_batch_size=args.requests, batch_window_ms=500)
    shared_setting = embedded.SHARED_PREFIX_MIN_TOKENS
    sides = {"rltrain": shared_setting, "peer": 10**9}
    try:
        prompts = first_call_prompts(engine.tokenizer, args.form, args.requests)
        shared = embedded._shared_prefix_length([tuple(prompt) for prompt in prompts])
        lengths = sorted(len(prompt) for prompt in prompts)
        log(f"{len(prompts)} {args.form} prompts of {lengths[0]}-{lengths[-1]} tokens, {shared} shared")
        times: dict[str, list[float]] = {side: [] for side in sides}
        outputs: dict[str, list[list[int]]] = {}
        for trial in range(args.repeats):
            for side, minimum in sides.items():
                embedded.SHARED_PREFIX_MIN_TOKENS = minimum
                start = time.perf_counter()
                outputs[side] = run_batch(engine, prompts, args.tokens)
                times[side].append(time.perf_counter() - start)
                log(f"trial {trial}: {side} {times[side][-1]:.2f} s")
        if outputs["rltrain"] != outputs["peer"]:
            raise SystemExit("the two sides decoded different tokens: the shared prefix changed the computation")
    finally:
        embedded.SHARED_PREFIX_MIN_TOKENS = shared_setting
        engine.close()
    label = f"{len(prompts)} {args.form}-mode first calls ({lengths[0]}-{lengths[-1]} tokens, {shared} shared)"
    report([
        Row("prefix_share", f"{label}, prefill + {args.tokens} greedy tokens", "s", median(times["rltrain"]),
            median(times["peer"]), higher_is_better=False, note="peer: the same engine prefilling every prompt whole"),
    ])


if __name__ == "__main__":
    main()
