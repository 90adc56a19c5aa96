"""Gateway + dynamic batching vs raw batched ``generate``: 8 concurrent chat requests on the real SmolLM2.

Both sides run the same model object, the same 8 room-selection prompts (the inline agent's, ~550 tokens, asking
for an explanation), greedy decoding
and the same number of new tokens, in this one process:

* raw: the 8 prompts templated, left-padded and passed to ``model.generate`` as one batch;
* rltrain: 8 threads each sending one chat request through the stock ``openai`` client to the gateway, which
  templates, tokenises, batches them dynamically in the engine and records an llm span per call in a store.

Prints generated tokens/s of each (median of 3) and the ratio rltrain / raw.
Run: ``.venv/bin/python benchmarks/bench_gateway_throughput.py [--max-tokens 32]``
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPEATS, log, median

from rltrain.engines.transformers import TransformersEngine
from rltrain.envs import get_env
from rltrain.envs.room_selection.prompts import prompt_values
from rltrain.envs.room_selection.tasks import request_of
from rltrain.gateway.app import create_app
from rltrain.gateway.server import GatewayServer
from rltrain.models import DEFAULT_MODEL, load_model_and_tokenizer
from rltrain.store import MemoryStore
from rltrain.types import Rollout

BATCH = 8


def chat_prompts() -> list[list[dict[str, str]]]:
    """The inline room agent's opening messages for the first 8 public requests, asking for an explanation so
    that decoding (not only prefill) is measured: the answer alone is two tokens."""
    env = get_env("room_selection")
    templates = env.default_prompts("inline")
    prompts = []
    for task in env.load_tasks("public")[:BATCH]:
        values = prompt_values("inline", request_of(task.payload), env.catalog)
        prompts.append([
            {"role": "system", "content": templates["system"].format()},
            {"role": "user", "content": templates["user"].format(**values) + "\nExplain your reasoning first."},
        ])
    return prompts


def raw_generate(model, tokenizer, prompts, max_tokens: int) -> tuple[float, int]:
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    wall = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1]:]
    generated = 0
    for row in new.tolist():
        generated += next((i + 1 for i, t in enumerate(row) if t == tokenizer.eos_token_id), len(row))
    return wall, generated


def through_gateway(url: str, store: MemoryStore, prompts, max_tokens: int) -> tuple[float, int]:
    rollouts = [Rollout.model_validate({"task": {"id": f"t{i}", "payload": {}}}) for i in range(len(prompts))]
    store.enqueue_rollouts(rollouts)
    for _ in rollouts:
        store.claim_rollout("bench")
    clients = [OpenAI(base_url=f"{url}/rollouts/{r.rollout_id}/v1", api_key="x") for r in rollouts]

    def call(i: int) -> int:
        reply = clients[i].chat.completions.create(model=DEFAULT_MODEL, messages=prompts[i], temperature=0.0,
                                                   max_tokens=max_tokens)
        return reply.usage.completion_tokens

    with ThreadPoolExecutor(len(prompts)) as pool:
        start = time.perf_counter()
        generated = sum(pool.map(call, range(len(prompts))))
        wall = time.perf_counter() - start
    for client in clients:
        client.close()
    return wall, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    log("loading SmolLM2-135M-Instruct ...")
    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    prompts = chat_prompts()
    store = MemoryStore()
    engine = TransformersEngine(model, tokenizer, model_name=DEFAULT_MODEL, max_batch_size=BATCH,
                                batch_window_ms=20.0)
    server = GatewayServer(create_app(engine, store))
    url = server.start()
    try:
        through_gateway(url, store, prompts[:2], 4)  # warm-up both paths
        raw_generate(model, tokenizer, prompts[:2], 4)
        raw, ours = [], []
        for trial in range(REPEATS):
            wall, n = raw_generate(model, tokenizer, prompts, args.max_tokens)
            raw.append(n / wall)
            wall, n = through_gateway(url, store, prompts, args.max_tokens)
            ours.append(n / wall)
            log(f"trial {trial + 1}: raw {raw[-1]:.1f} tok/s, gateway {ours[-1]:.1f} tok/s "
                f"(engine batches so far: {engine.stats.batches}, largest {engine.stats.largest_batch})")
    finally:
        server.stop()
        engine.close()
    r, o = median(raw), median(ours)
    print(f"8 concurrent requests, {args.max_tokens} new tokens, greedy, torch threads {torch.get_num_threads()}")
    print(f"raw batched model.generate : {r:8.1f} generated tokens/s")
    print(f"rltrain gateway + engine   : {o:8.1f} generated tokens/s")
    print(f"ratio rltrain / raw        : {o / r:8.2f}x")


if __name__ == "__main__":
    main()
