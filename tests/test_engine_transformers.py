"""The embedded engine: batching correctness, sampling controls, logprobs, failure isolation, weight sharing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from rltrain.engines.base import ContextLengthError, Engine, EngineError, GenerationRequest, GenerationResult
from rltrain.engines.transformers import (
    SHARED_PREFIX_MIN_TOKENS,
    InvalidRequestError,
    TransformersEngine,
    _BufferLayer,
    _filter_top_k_top_p,
    _inverse_cdf_sample,
    _shared_prefix_length,
    _widened,
)
from rltrain.models import DEFAULT_MODEL, load_model_and_tokenizer

T = TypeVar("T")

QUESTIONS = [
    "Hi",
    "Which room fits 12 people on Tuesday from 10:00 to 11:30 with a projector?",
    "Name three colours.",
    "Summarise the plot of a long novel about a whale, a captain and his crew in two sentences, please.",
]


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def chat_prompt(tokenizer: Any, question: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
    )


#: a system prompt long enough that the prompts of an agent share a prefix worth computing once
SYSTEM = "You are a scheduling assistant. Pick the best room that passes every check, else No Room. " * 2


def agent_prompt(tokenizer: Any, question: str) -> list[int]:
    """``question`` after the shared :data:`SYSTEM` prompt, as an agent's chat calls start."""
    return tokenizer.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        add_generation_prompt=True, tokenize=True, return_dict=False,
    )


async def generate_all(
    engine: TransformersEngine, requests: list[GenerationRequest]
) -> list[GenerationResult]:
    return list(await asyncio.gather(*(engine.generate(request) for request in requests)))


@pytest.fixture
def make_engine(tiny_model_dir: Path) -> Iterator[Callable[..., TransformersEngine]]:
    """Engines with non-default options on the tiny model, all closed after the test."""
    engines: list[TransformersEngine] = []

    def make(**options: Any) -> TransformersEngine:
        engines.append(TransformersEngine.from_pretrained(str(tiny_model_dir), **options))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def greedy(prompt: list[int], max_tokens: int = 12, **fields: Any) -> GenerationRequest:
    return GenerationRequest(prompt_ids=prompt, max_tokens=max_tokens, temperature=0.0, **fields)


def test_engine_satisfies_the_protocol(tiny_engine: TransformersEngine) -> None:
    assert isinstance(tiny_engine, Engine)
    assert tiny_engine.max_context == 2048


def test_greedy_is_deterministic(tiny_engine: TransformersEngine) -> None:
    request = greedy(chat_prompt(tiny_engine.tokenizer, QUESTIONS[1]))
    first = run(tiny_engine.generate(request))
    second = run(tiny_engine.generate(request))
    assert first.completions == second.completions


def test_batched_greedy_equals_unbatched(make_engine: Callable[..., TransformersEngine]) -> None:
    engine = make_engine(batch_window_ms=200)
    requests = [greedy(chat_prompt(engine.tokenizer, question)) for question in QUESTIONS]
    assert len({len(request.prompt_ids) for request in requests}) == len(requests)  # padding really happens
    alone = [run(engine.generate(request)) for request in requests]
    # the last request repeats the first prompt with n=2: three rows share one prefill
    together = run(generate_all(engine, [*requests, greedy(requests[0].prompt_ids, n=2)]))
    assert engine.stats.largest_batch == len(requests) + 2
    expected = [*alone, GenerationResult(completions=alone[0].completions * 2)]
    for single, batched in zip(expected, together, strict=True):
        for want, got in zip(single.completions, batched.completions, strict=True):
            assert got.completion_ids == want.completion_ids
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


def test_a_prompt_prefix_shared_by_a_batch_is_computed_once_and_changes_nothing(
    make_engine: Callable[..., TransformersEngine],
) -> None:
    """An agent's requests share its system prompt: a batch computes that prefix once and each prompt only its own
    tokens, with the same tokens and logprobs as each prompt alone (greedy and seeded sampling alike)."""
    engine = make_engine(batch_window_ms=200)
    prompts = [agent_prompt(engine.tokenizer, question) for question in QUESTIONS]
    shared = _shared_prefix_length([tuple(p) for p in prompts])
    assert shared >= SHARED_PREFIX_MIN_TOKENS and len({len(p) for p in prompts}) == len(prompts)
    requests = [greedy(p) for p in prompts] + [
        GenerationRequest(prompt_ids=prompts[1], max_tokens=10, temperature=1.0, seed=5, n=2)
    ]
    alone = [run(engine.generate(request)) for request in requests]
    assert engine.stats.shared_prefix_tokens == 0  # one distinct prompt a batch: nothing to share
    together = run(generate_all(engine, requests))
    assert engine.stats.largest_batch == len(prompts) + 2
    assert engine.stats.shared_prefix_tokens == shared * (len(prompts) - 1)
    for single, batched in zip(alone, together, strict=True):
        for want, got in zip(single.completions, batched.completions, strict=True):
            assert got.completion_ids == want.completion_ids
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


def test_a_request_joins_the_running_batch_and_is_answered_before_it_ends(
    make_engine: Callable[..., TransformersEngine],
) -> None:
    """Continuous batching: a request that arrives while a batch decodes joins it at the next step (no second
    batch), starts from the system-prompt prefix the batch already computed, and is answered as soon as its own
    rows finish, with the tokens and logprobs it gets alone."""
    engine = make_engine(batch_window_ms=0)
    early = [greedy(agent_prompt(engine.tokenizer, QUESTIONS[0]), max_tokens=40),
             greedy(agent_prompt(engine.tokenizer, QUESTIONS[3]), max_tokens=40)]
    late = GenerationRequest(prompt_ids=agent_prompt(engine.tokenizer, QUESTIONS[1]), max_tokens=4, temperature=1.0, seed=3, n=2)
    alone = [run(engine.generate(request)) for request in [*early, late]]
    batches_before = engine.stats.batches
    prefix_before = engine.stats.shared_prefix_tokens
    shared = _shared_prefix_length([tuple(request.prompt_ids) for request in [*early, late]])

    async def scenario() -> tuple[list[GenerationResult], GenerationResult, bool]:
        started = asyncio.Event()

        def on_token(index: int, token: int, logprob: float) -> None:
            started.set()

        running = [asyncio.create_task(engine.generate(request, on_token)) for request in early]
        await started.wait()  # the early batch decodes
        joined = await engine.generate(late)
        still_running = not any(task.done() for task in running)
        return list(await asyncio.gather(*running)), joined, still_running

    early_results, late_result, early_still_running = run(scenario())
    assert early_still_running  # answered while its batch mates were still decoding
    assert engine.stats.batches == batches_before + 1  # it joined; no second batch
    assert engine.stats.largest_batch == 4
    # the early pair shares the prefix once; the late request reuses it instead of running it again
    assert shared >= SHARED_PREFIX_MIN_TOKENS
    assert engine.stats.shared_prefix_tokens - prefix_before == shared + shared
    for single, batched in zip(alone, [*early_results, late_result], strict=True):
        for want, got in zip(single.completions, batched.completions, strict=True):
            assert got.completion_ids == want.completion_ids
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


def test_the_kv_buffer_grows_when_a_row_outlives_its_room() -> None:
    """Appending past the planned room doubles the buffer and keeps every earlier column."""
    keys = torch.randn(2, 3, 4, 8)
    layer = _BufferLayer(_widened(keys, 4, 5), _widened(keys.clone(), 4, 5), length=4)
    extra = torch.randn(2, 3, 3, 8)
    all_keys, _ = layer.update(extra, extra.clone())
    assert layer.key_buffer.shape[2] == 14
    assert torch.equal(all_keys, torch.cat([keys, extra], dim=2))
    layer.batch_select_indices(torch.tensor([1]))
    layer.drop_leading(2)
    assert torch.equal(layer.keys, torch.cat([keys, extra], dim=2)[1:, :, 2:])


def test_the_shared_prefix_is_long_enough_and_leaves_every_prompt_a_token() -> None:
    long = tuple(range(40))
    assert _shared_prefix_length([long]) == 0  # alone: nothing shared
    assert _shared_prefix_length([long, long[:30] + (99,)]) == 30
    assert _shared_prefix_length([long, long]) == 39  # identical prompts keep their last token to read logits at
    assert _shared_prefix_length([long, long[:SHARED_PREFIX_MIN_TOKENS - 1] + (99,)]) == 0  # too short to pay


def test_seeded_sampling_does_not_depend_on_batch_mates(
    make_engine: Callable[..., TransformersEngine],
) -> None:
    engine = make_engine(batch_window_ms=200)
    prompts = [chat_prompt(engine.tokenizer, question) for question in QUESTIONS]
    seeded = GenerationRequest(prompt_ids=prompts[0], max_tokens=10, temperature=1.0, seed=7)
    alone = run(engine.generate(seeded))
    mates = [GenerationRequest(prompt_ids=p, max_tokens=10, temperature=1.0) for p in prompts[1:]]
    together = run(generate_all(engine, [*mates, seeded]))[-1]
    other_seed = run(engine.generate(GenerationRequest(prompt_ids=prompts[0], max_tokens=10, seed=8)))
    assert engine.stats.largest_batch == len(prompts)
    assert together.completions[0].completion_ids == alone.completions[0].completion_ids
    assert together.completions[0].logprobs == pytest.approx(alone.completions[0].logprobs, abs=1e-4)
    assert other_seed.completions[0].completion_ids != alone.completions[0].completion_ids


def test_n_completions_are_independent_rows(tiny_engine: TransformersEngine) -> None:
    request = GenerationRequest(
        prompt_ids=chat_prompt(tiny_engine.tokenizer, QUESTIONS[2]), max_tokens=6, n=3, seed=0
    )
    result = run(tiny_engine.generate(request))
    assert len(result.completions) == 3
    assert all(len(c.completion_ids) == 6 and c.finish_reason == "length" for c in result.completions)
    assert len({tuple(c.completion_ids) for c in result.completions}) == 3
    assert run(tiny_engine.generate(request)).completions == result.completions


def test_stop_token_ends_the_completion_and_is_included(tiny_engine: TransformersEngine) -> None:
    prompt = chat_prompt(tiny_engine.tokenizer, QUESTIONS[3])
    full = run(tiny_engine.generate(greedy(prompt, max_tokens=10))).completions[0]
    assert full.finish_reason == "length" and len(full.completion_ids) == 10
    stop = full.completion_ids[4]
    expected = full.completion_ids[: full.completion_ids.index(stop) + 1]
    stopped = run(tiny_engine.generate(greedy(prompt, max_tokens=10, stop_token_ids=(stop,)))).completions[0]
    assert stopped.finish_reason == "stop"
    assert stopped.completion_ids == expected
    assert stopped.logprobs == pytest.approx(full.logprobs[: len(expected)], abs=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_match_a_separate_forward_pass(tiny_engine: TransformersEngine, temperature: float) -> None:
    prompt = chat_prompt(tiny_engine.tokenizer, QUESTIONS[1])
    request = GenerationRequest(prompt_ids=prompt, max_tokens=8, temperature=temperature, top_p=0.9, seed=3)
    completion = run(tiny_engine.generate(request)).completions[0]
    logprobs = torch.tensor(completion.logprobs)
    assert torch.isfinite(logprobs).all() and (logprobs <= 0).all()

    with torch.no_grad():
        logits = tiny_engine.model(torch.tensor([prompt + completion.completion_ids])).logits[0]
    positions = logits[len(prompt) - 1 : -1] / (temperature or 1.0)
    expected = torch.log_softmax(positions, dim=-1).gather(
        1, torch.tensor(completion.completion_ids)[:, None]
    )
    assert completion.logprobs == pytest.approx(expected.squeeze(1).tolist(), abs=1e-4)


def test_top_k_one_is_greedy(tiny_engine: TransformersEngine) -> None:
    prompt = chat_prompt(tiny_engine.tokenizer, QUESTIONS[0])
    sampled = GenerationRequest(prompt_ids=prompt, max_tokens=8, temperature=1.5, top_k=1)
    assert (
        run(tiny_engine.generate(sampled)).completions[0].completion_ids
        == run(tiny_engine.generate(greedy(prompt, max_tokens=8))).completions[0].completion_ids
    )


def test_prompt_longer_than_the_context_is_refused(tiny_engine: TransformersEngine) -> None:
    with pytest.raises(ContextLengthError, match="2040 tokens \\+ max_tokens 16 exceeds the context of 2048"):
        run(tiny_engine.generate(GenerationRequest(prompt_ids=[100] * 2040, max_tokens=16)))
    assert tiny_engine.stats.requests == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompt_ids": []}, "prompt_ids is empty"),
        ({"prompt_ids": [5, 49152]}, "must lie in \\[0, 49152\\)"),
        ({"top_p": 0.0}, "top_p must be in \\(0, 1\\]"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"n": 0}, "n must be >= 1"),
    ],
)
def test_invalid_requests_are_refused(
    tiny_engine: TransformersEngine, fields: dict[str, Any], message: str
) -> None:
    request = GenerationRequest(**{"prompt_ids": [1, 2, 3], **fields})
    with pytest.raises(InvalidRequestError, match=message):
        run(tiny_engine.generate(request))


def test_a_failing_batch_fails_only_its_requests(tiny_engine: TransformersEngine) -> None:
    prompt = chat_prompt(tiny_engine.tokenizer, QUESTIONS[0])

    def explode(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        raise RuntimeError("simulated device fault")

    handle = tiny_engine.model.register_forward_pre_hook(explode, with_kwargs=True)
    with pytest.raises(EngineError, match="simulated device fault") as info:
        run(tiny_engine.generate(greedy(prompt)))
    assert isinstance(info.value.__cause__, RuntimeError)
    handle.remove()

    result = run(tiny_engine.generate(greedy(prompt)))
    assert len(result.completions[0].completion_ids) == 12
    assert tiny_engine.stats.failed_batches == 1


def test_concurrent_requests_are_batched_up_to_the_row_limit(
    make_engine: Callable[..., TransformersEngine],
) -> None:
    engine = make_engine(batch_window_ms=200, max_batch_size=4)
    prompt = chat_prompt(engine.tokenizer, QUESTIONS[2])
    requests = [GenerationRequest(prompt_ids=prompt, max_tokens=3, n=n, seed=n) for n in (1, 1, 2, 3, 1, 6)]
    results = run(generate_all(engine, requests))
    assert [len(result.completions) for result in results] == [1, 1, 2, 3, 1, 6]
    stats = engine.stats
    assert stats.requests == 6 and stats.rows == 14
    assert stats.largest_batch == 4
    assert stats.batches < stats.requests
    assert stats.generated_tokens == 14 * 3


def test_shared_model_object_and_policy_version(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    engine = TransformersEngine(model, tokenizer, model_name="policy")
    try:
        prompt = chat_prompt(engine.tokenizer, QUESTIONS[1])
        before = run(engine.generate(greedy(prompt))).completions[0]
        assert before.finish_reason == "length"

        first_token = before.completion_ids[0]
        with engine.weights_lock:  # as a trainer would: change the weights, then bump the version
            with torch.no_grad():
                model.lm_head.weight[tokenizer.eos_token_id] = 10 * model.lm_head.weight[first_token]
            engine.set_policy_version(1)
        after = run(engine.generate(greedy(prompt)))
        assert after.policy_version == 1
        assert after.completions[0].completion_ids == [tokenizer.eos_token_id]
        assert after.completions[0].finish_reason == "stop"
    finally:
        engine.close()


def test_samples_with_the_current_weights_of_a_peft_wrapped_model(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    prompt = chat_prompt(tokenizer, QUESTIONS[2])
    base_engine = TransformersEngine(model, tokenizer, model_name="base")
    base = run(base_engine.generate(greedy(prompt)))
    base_engine.close()
    policy = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    engine = TransformersEngine(policy, tokenizer, model_name="policy")
    try:
        untrained = run(engine.generate(greedy(prompt)))  # LoRA B starts at zero: same function as the base
        assert untrained.completions[0].completion_ids == base.completions[0].completion_ids
        with engine.weights_lock, torch.no_grad():
            for name, parameter in policy.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
            engine.set_policy_version(3)
        trained = run(engine.generate(greedy(prompt)))
        assert trained.policy_version == 3
        assert trained.completions[0].completion_ids != base.completions[0].completion_ids
    finally:
        engine.close()


def test_generation_runs_in_eval_mode_and_restores_train_mode(tiny_engine: TransformersEngine) -> None:
    modes: list[bool] = []
    tiny_engine.model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    tiny_engine.model.train()
    run(tiny_engine.generate(greedy(chat_prompt(tiny_engine.tokenizer, QUESTIONS[0]), max_tokens=3)))
    assert modes == [False, False, False]
    assert tiny_engine.model.training


def test_close_while_a_batch_decodes_stops_it_and_fails_its_requests(
    make_engine: Callable[..., TransformersEngine],
) -> None:
    """close() during a running batch (a run stopped by SIGTERM mid-rollouts): the batch stops at its next step,
    its requests and the queued ones fail with "is closed", and the worker thread ends (close() returns)."""
    engine = make_engine(max_batch_size=2)
    prompt = chat_prompt(engine.tokenizer, QUESTIONS[1])

    async def scenario() -> list[BaseException | GenerationResult]:
        started = asyncio.Event()
        calls = [asyncio.create_task(engine.generate(greedy(prompt, max_tokens=500), lambda *_: started.set()))
                 for _ in range(3)]  # two decode, one waits for room
        await started.wait()
        closing = threading.Thread(target=engine.close)
        closing.start()
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        await asyncio.to_thread(closing.join, 60)
        assert not closing.is_alive(), "close() did not return: the worker thread is still waiting"
        return outcomes

    outcomes = run(scenario())
    assert all(isinstance(outcome, EngineError) and "is closed" in str(outcome) for outcome in outcomes)


def test_closed_engine_refuses_requests(tiny_engine: TransformersEngine) -> None:
    tiny_engine.close()
    tiny_engine.close()
    with pytest.raises(EngineError, match="is closed"):
        run(tiny_engine.generate(greedy([1, 2, 3])))


@pytest.mark.slow
def test_real_smollm2_answers_and_batches_consistently() -> None:
    engine = TransformersEngine.from_pretrained(DEFAULT_MODEL, batch_window_ms=200)
    try:
        questions = ["What is the capital of France?", "What is 2+2?", "Name a fruit."]
        requests = [greedy(chat_prompt(engine.tokenizer, question), max_tokens=16) for question in questions]
        alone = [run(engine.generate(request)) for request in requests]
        together = run(generate_all(engine, requests))
        paris = alone[0].completions[0]
        assert "Paris" in engine.tokenizer.decode(paris.completion_ids)
        assert paris.finish_reason == "stop" and paris.completion_ids[-1] == engine.tokenizer.eos_token_id
        for single, batched in zip(alone, together, strict=True):
            assert single.completions[0].completion_ids == batched.completions[0].completion_ids
    finally:
        engine.close()


def test_inverse_cdf_sampling_follows_the_distribution_and_skips_filtered_tokens() -> None:
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(4000, 1)
    generators = [torch.Generator().manual_seed(seed) for seed in range(4000)]
    counts = torch.bincount(_inverse_cdf_sample(probs, generators), minlength=5) / 4000
    assert counts[1] == 0 and counts[4] == 0
    assert counts.tolist() == pytest.approx([0.5, 0.0, 0.3, 0.2, 0.0], abs=0.03)


def test_top_k_and_top_p_filters() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.25, 0.15]])).repeat(5, 1)
    top_k = torch.tensor([2, 0, 0, 3, 0])
    top_p = torch.tensor([1.0, 0.6, 0.5, 0.8, 1.0])
    kept = _filter_top_k_top_p(logits, top_k, top_p).isfinite()
    assert kept.tolist() == [
        [False, True, True, False],  # top-k 2: the two largest
        [False, True, True, False],  # top-p 0.6: 0.5 alone is not enough, 0.5 + 0.25 is
        [False, True, False, False],  # top-p 0.5: 0.5 alone is enough
        [False, True, True, False],  # top-p 0.8 within the top 3, renormalised: 0.56 + 0.28 suffices
        [True, True, True, True],  # no limit
    ]


@pytest.mark.gpu
def test_on_cuda_batched_greedy_equals_unbatched_and_seeds_reproduce(
    make_engine: Callable[..., TransformersEngine],
) -> None:
    engine = make_engine(device="cuda", batch_window_ms=200)
    requests = [greedy(chat_prompt(engine.tokenizer, question)) for question in QUESTIONS]
    alone = [run(engine.generate(request)) for request in requests]
    together = run(generate_all(engine, requests))
    for single, batched in zip(alone, together, strict=True):
        assert single.completions[0].completion_ids == batched.completions[0].completion_ids
    seeded = GenerationRequest(prompt_ids=requests[0].prompt_ids, max_tokens=8, n=2, top_p=0.9, seed=5)
    assert run(engine.generate(seeded)).completions == run(engine.generate(seeded)).completions
