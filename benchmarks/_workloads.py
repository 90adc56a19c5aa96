"""The inputs of the benchmarks, built from plain Python so that both sides get the very same data.

This module imports only the standard library: the peer's scripts import it from the peer venv and the rltrain
side from the project venv, and each side wraps the same dicts in its own record types.
"""

from __future__ import annotations

import json
import random
from typing import Any

WORDS = [
    "room",
    "guests",
    "budget",
    "floor",
    "view",
    "quiet",
    "early",
    "late",
    "breakfast",
    "parking",
    "accessible",
    "suite",
    "double",
    "twin",
    "window",
    "city",
    "garden",
    "pool",
    "gym",
    "spa",
    "wifi",
    "desk",
    "balcony",
    "ocean",
    "mountain",
    "smoking",
    "pets",
    "family",
    "business",
    "weekend",
    "checkin",
]


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


# -- store: 2000 rollouts x 10 spans ---------------------------------------------------------------------
STORE_ROLLOUTS = 2000
STORE_SPANS_PER_ROLLOUT = 10


def store_tasks(n: int = STORE_ROLLOUTS) -> list[dict[str, Any]]:
    """Task payloads like a room request: an id, a request text of ~40 words, a few constraints."""
    rng = random.Random(0)
    return [
        {
            "id": f"task-{i}",
            "request": _text(rng, 40),
            "guests": rng.randint(1, 4),
            "budget": rng.choice([80, 120, 200]),
            "date": "2025-06-01",
        }
        for i in range(n)
    ]


def store_span_attributes(
    n_rollouts: int = STORE_ROLLOUTS, per_rollout: int = STORE_SPANS_PER_ROLLOUT
) -> list[list[dict[str, Any]]]:
    """Per rollout, the attributes of its spans: tool calls with JSON arguments and a ~60-word result (flat
    string/number values, which OpenTelemetry-style attributes in the peer require)."""
    rng = random.Random(1)
    return [
        [
            {
                "tool.name": rng.choice(["search_rooms", "get_room", "check_availability"]),
                "tool.arguments": json.dumps({"query": _text(rng, 6), "limit": 5}),
                "tool.result": _text(rng, 60),
                "tool.index": j,
            }
            for j in range(per_rollout)
        ]
        for _ in range(n_rollouts)
    ]


# -- adapter: 1000 rollouts x 5 llm calls ----------------------------------------------------------------
ADAPTER_ROLLOUTS = 1000
ADAPTER_CALLS = 5
FIRST_PROMPT_TOKENS = 200
LAST_PROMPT_TOKENS = 800
COMPLETION_TOKENS = 50


def adapter_rollout(index: int) -> dict[str, Any]:
    """One multi-turn rollout as the gateway / the peer's tracer would have seen it.

    Call ``k``'s prompt is call ``k-1``'s prompt + its completion + new environment tokens (a tool result and
    the template), so prompts grow 200 -> 350 -> 500 -> 650 -> 800 tokens, each completion is 50 tokens with a
    logprob each, and the rollout ends with one reward. ``messages`` is the chat history of each call (about
    four characters per token), ``text`` the completion's text.
    """
    rng = random.Random(index)
    step = (LAST_PROMPT_TOKENS - FIRST_PROMPT_TOKENS) // (ADAPTER_CALLS - 1)
    env_tokens = step - COMPLETION_TOKENS
    prompt = [rng.randrange(3, 49000) for _ in range(FIRST_PROMPT_TOKENS)]
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": _text(rng, 60)},
        {"role": "user", "content": _text(rng, 90)},
    ]
    calls = []
    for k in range(ADAPTER_CALLS):
        completion = [rng.randrange(3, 49000) for _ in range(COMPLETION_TOKENS)]
        text = _text(rng, 38)
        calls.append(
            {
                "messages": [dict(m) for m in messages],
                "prompt_ids": list(prompt),
                "completion_ids": completion,
                "logprobs": [-rng.random() * 3 for _ in range(COMPLETION_TOKENS)],
                "text": text,
                "response_id": f"chatcmpl-{index}-{k}",
            }
        )
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": _text(rng, 75)}]
        prompt = prompt + completion + [rng.randrange(3, 49000) for _ in range(env_tokens)]
    return {"rollout_id": f"ro-{index}", "task_id": f"task-{index}", "calls": calls, "reward": 1.0}


def adapter_rollouts(n: int = ADAPTER_ROLLOUTS) -> list[dict[str, Any]]:
    return [adapter_rollout(i) for i in range(n)]


# -- end to end ------------------------------------------------------------------------------------------
E2E_TASKS = 500


def e2e_tasks(n: int = E2E_TASKS) -> list[dict[str, Any]]:
    rng = random.Random(2)
    return [{"id": f"task-{i}", "request": _text(rng, 20)} for i in range(n)]


# -- gateway ---------------------------------------------------------------------------------------------
def gateway_messages() -> list[dict[str, str]]:
    """An agent's first request: a system prompt and a user request, about 200 tokens together."""
    rng = random.Random(3)
    return [
        {"role": "system", "content": "You help guests choose a hotel room. " + _text(rng, 50)},
        {"role": "user", "content": "I need a room for two. " + _text(rng, 90)},
    ]
