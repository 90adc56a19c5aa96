"""Shared-prompt log-probs against TRL's own pass over whole rows, on a tiny LoRA model with TRL's fused head."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from rltrain.algorithms.shared_prompt import (
    IGNORE_INDEX,
    SharedLogps,
    prompt_groups,
    shared_prefix_inputs,
    shared_prefix_length,
    shared_prompt_logps,
)

PROMPT_COLUMNS, COMPLETION_LENGTH = 12, 5


@pytest.fixture
def lora_model() -> torch.nn.Module:
    """A 2-layer Llama (grouped-query attention) with TRL's fused head at temperature 0.7 and a LoRA adapter whose
    B matrices are non-zero, so the adapter changes the log-probs and receives gradients."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128)
    model = LlamaForCausalLM(config)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.1)
    return model.train()


def batch(prompts_of_rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows as TRL builds them: prompts left-padded to PROMPT_COLUMNS, completions (1 to 5 tokens) right-padded."""
    generator = torch.Generator().manual_seed(1)
    rows = len(prompts_of_rows)
    ids = torch.zeros(rows, PROMPT_COLUMNS + COMPLETION_LENGTH, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts_of_rows):
        ids[row, PROMPT_COLUMNS - len(prompt):PROMPT_COLUMNS] = torch.tensor(prompt)
        mask[row, PROMPT_COLUMNS - len(prompt):PROMPT_COLUMNS] = 1
        length = int(torch.randint(1, COMPLETION_LENGTH + 1, (), generator=generator))
        ids[row, PROMPT_COLUMNS:PROMPT_COLUMNS + length] = torch.randint(5, 300, (length,), generator=generator)
        mask[row, PROMPT_COLUMNS:PROMPT_COLUMNS + length] = 1
    return ids, mask


def trl_pass(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's own ``GRPOTrainer._get_per_token_logps_and_entropies`` (whole rows through the fused head), without its
    profiling wrapper; of its trainer the method reads only ``accelerator.autocast``."""
    trainer = SimpleNamespace(accelerator=SimpleNamespace(autocast=contextlib.nullcontext))
    logps, entropies, _aux = GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__(
        trainer, model, ids, mask, COMPLETION_LENGTH, compute_entropy=True)
    return logps, entropies


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


A, B, C, D = [7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [20, 21, 22, 23, 24, 25, 26], [40], [7, 8, 9, 10, 11, 12, 13, 15]


def same_start(ids: torch.Tensor, mask: torch.Tensor, rows: list[int], tokens: int) -> None:
    """Give ``rows`` (of one prompt) the same first ``tokens`` completion tokens, as rollouts that made the same tool
    call and got the same result, and (unless that is the whole completion) a token of their own after them."""
    start = PROMPT_COLUMNS
    for row in rows:
        mask[row, start:start + tokens] = 1
        ids[row, start:start + tokens] = torch.arange(50, 50 + tokens)
        if tokens < COMPLETION_LENGTH:
            mask[row, start + tokens] = 1
            ids[row, start + tokens] = 100 + row


def check_against_trl(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> SharedLogps:
    """Log-probs, entropies and LoRA gradients of the shared pass equal TRL's whole-row pass."""
    weights = torch.randn(ids.size(0), COMPLETION_LENGTH, generator=torch.Generator().manual_seed(2))

    logps, entropies = trl_pass(model, ids, mask)
    (logps * weights).sum().backward()
    expected_grads = lora_grads(model)

    shared = shared_prompt_logps(model, ids, mask, COMPLETION_LENGTH, True, contextlib.nullcontext)
    assert shared is not None
    (shared.logps * weights).sum().backward()
    grads = lora_grads(model)

    torch.testing.assert_close(shared.logps, logps, rtol=0, atol=1e-5)
    assert shared.entropies is not None
    torch.testing.assert_close(shared.entropies, entropies, rtol=0, atol=1e-5)
    assert (shared.logps[mask[:, PROMPT_COLUMNS:] == 0] == 0).all(), "padding scores 0, as in TRL's pass"
    assert expected_grads.keys() == grads.keys() and len(grads) > 0
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)
    return shared


def test_logps_entropies_and_gradients_equal_trls_whole_row_pass(lora_model: torch.nn.Module) -> None:
    # groups of 4, 2, 1 and 1 rows, a one-token prompt (no cache to share), a prompt that shares all but its last
    # token with another, and a group whose rows are not adjacent
    ids, mask = batch([A, A, B, A, C, B, D, A])
    shared = check_against_trl(lora_model, ids, mask)
    assert shared.rows_per_prompt == pytest.approx(8 / 4)


def test_completion_tokens_a_group_shares_run_once_and_score_as_trls_pass(lora_model: torch.nn.Module) -> None:
    # A's rows share 3 completion tokens, B's rows are the same whole rows (all but their last token shared), the
    # one-token prompt C's rows share 2 (no prompt cache: the shared run starts the cache)
    ids, mask = batch([A, B, A, C, B, A, C])
    same_start(ids, mask, [0, 2, 5], 3)
    same_start(ids, mask, [1, 4], COMPLETION_LENGTH)
    same_start(ids, mask, [3, 6], 2)
    shared = check_against_trl(lora_model, ids, mask)
    assert shared.shared_completion_tokens == pytest.approx((3 + COMPLETION_LENGTH - 1 + 2) / 3)


def test_rows_group_by_their_unpadded_prompt_in_order_of_appearance() -> None:
    ids, mask = batch([B, A, B, C])
    groups = prompt_groups(ids, mask, PROMPT_COLUMNS)
    assert groups is not None
    assert [(g.rows, g.prompt) for g in groups] == [([0, 2], B), ([1], A), ([3], C)]


def test_prompts_that_cannot_share_fall_back(lora_model: torch.nn.Module) -> None:
    ids, mask = batch([A, B])
    empty = mask.clone()
    empty[1, :PROMPT_COLUMNS] = 0
    assert prompt_groups(ids, empty, PROMPT_COLUMNS) is None
    holed = mask.clone()
    holed[0, PROMPT_COLUMNS - 3] = 0
    assert prompt_groups(ids, holed, PROMPT_COLUMNS) is None
    assert shared_prompt_logps(lora_model, ids, holed, COMPLETION_LENGTH, False, contextlib.nullcontext) is None


def test_checkpointed_layers_get_whole_rows_since_they_drop_the_cache(lora_model: torch.nn.Module) -> None:
    # transformers' checkpointed layers set a given cache to None when they train: sharing would run the rows
    # without their prompt, so both computations decline and the trainers run the rows whole
    ids, mask = batch([A, A, B, B])
    lora_model.base_model.model.gradient_checkpointing_enable()
    assert shared_prompt_logps(lora_model, ids, mask, COMPLETION_LENGTH, False, contextlib.nullcontext) is None
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    assert shared_prefix_inputs(lora_model, {"input_ids": ids, "attention_mask": mask, "labels": labels}) is None
    with torch.no_grad():  # without backward nothing is recomputed: the cache is kept and sharing is exact
        logps, _ = trl_pass(lora_model, ids, mask)
        shared = shared_prompt_logps(lora_model, ids, mask, COMPLETION_LENGTH, False, contextlib.nullcontext)
    assert shared is not None
    torch.testing.assert_close(shared.logps, logps, rtol=0, atol=1e-5)


def test_the_shared_prefix_stops_before_the_column_that_scores_the_first_label() -> None:
    ids = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 3, 4, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    unscored = torch.full_like(ids, IGNORE_INDEX)
    assert shared_prefix_length(ids, mask, unscored) == 4  # the rows differ from column 4 on
    labels = unscored.clone()
    labels[1, 3] = 4  # scored from column 2's position: the prefix must end before column 3
    assert shared_prefix_length(ids, mask, labels) == 2
    labels[0, 0] = 1  # a label nothing scores: no prefix
    assert shared_prefix_length(ids, mask, labels) == -1
