"""Per-token log-probabilities of completions that share prompts, each distinct prompt run once.

Why: a GRPO step samples ``num_generations`` completions of every prompt, and an agent's prompt is long while its
completion is short (room selection, inline: ~530 prompt tokens, at most 8 completion tokens). TRL's loss runs every
row whole, so each prompt is computed ``num_generations`` times forward and backward, and off Triton devices its
fused LM head also projects every prompt position onto the vocabulary. Here the rows whose (unpadded) prompts are
equal form a group: the prompt without its last token runs once into a KV cache, the cache is repeated for the
group's rows, and only ``[last prompt token] + completion`` runs per row, through the same fused head TRL patched
onto the model (temperature included). The log-probs are the full pass's, up to float rounding; with gradients
on, backward sums every row's gradient through the shared cache into the one prompt pass, so the gradient is
the full pass's too (``tests/test_shared_prompt.py`` checks both against TRL's own computation).

Rotary position embeddings make the result independent of where TRL's left padding put a prompt, so the
unpadded prompt (positions from 0, as the engine sampled it) gives the same values.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

IGNORE_INDEX = -100
"""The label of a position the fused head does not score."""


@dataclass(frozen=True)
class PromptGroup:
    """Rows of a batch whose prompts are the same token ids (``prompt``, unpadded)."""

    rows: list[int]
    prompt: list[int]


@dataclass(frozen=True)
class SharedLogps:
    """What :func:`shared_prompt_logps` computed: per-token log-probs and entropies (``None`` unless asked) of the
    completions, ``(rows, completion length)``, and how many rows each prompt pass served on average."""

    logps: torch.Tensor
    entropies: torch.Tensor | None
    rows_per_prompt: float


def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> list[PromptGroup] | None:
    """Rows grouped by their prompt (the first ``prompt_length`` columns, left-padded), in order of first
    appearance; ``None`` when a prompt is not one unpadded run ending at the completion (empty, or padded inside),
    which this computation cannot share."""
    groups: dict[tuple[int, ...], list[int]] = {}
    prompt_ids = input_ids[:, :prompt_length].tolist()
    prompt_mask = attention_mask[:, :prompt_length]
    lengths = prompt_mask.sum(dim=1).tolist()
    for row, (ids, length) in enumerate(zip(prompt_ids, lengths, strict=True)):
        if length == 0 or not bool(prompt_mask[row, prompt_length - length:].all()):
            return None
        groups.setdefault(tuple(ids[prompt_length - length:]), []).append(row)
    return [PromptGroup(rows=rows, prompt=list(prompt)) for prompt, rows in groups.items()]


def shared_prompt_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    compute_entropy: bool,
    autocast: Callable[[], AbstractContextManager[object]],
) -> SharedLogps | None:
    """Log-probs of the last ``completion_length`` tokens of each row, as TRL's
    ``model(..., labels=..., fused_lm_head=True)`` gives them on the whole rows (0 where the attention mask is 0),
    computing each distinct prompt once. ``model`` must carry TRL's fused LM head (``add_fused_lm_head``).

    ``None`` when the prompts cannot be grouped (see :func:`prompt_groups`); the caller then runs the rows whole.
    """
    prompt_length = input_ids.size(1) - completion_length
    groups = prompt_groups(input_ids, attention_mask, prompt_length)
    if groups is None:
        return None
    device = input_ids.device
    logps, entropies, order = [], [], []
    for group in groups:
        rows = torch.tensor(group.rows, device=device)
        prefix = torch.tensor([group.prompt[:-1]], dtype=input_ids.dtype, device=device)
        cache = DynamicCache()
        if prefix.size(1):
            with autocast():
                model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(len(group.rows))
        completion_mask = attention_mask[rows, prompt_length:]
        last = torch.full((len(group.rows), 1), group.prompt[-1], dtype=input_ids.dtype, device=device)
        suffix = torch.cat([last, input_ids[rows, prompt_length:]], dim=1)
        scored = torch.cat([torch.zeros_like(last), completion_mask], dim=1)
        mask = torch.cat([torch.ones_like(prefix).expand(len(group.rows), -1), torch.ones_like(last),
                          completion_mask], dim=1)
        with autocast():
            out = model(input_ids=suffix, attention_mask=mask, cache=cache if prefix.size(1) else None,
                        labels=suffix.masked_fill(scored == 0, IGNORE_INDEX), fused_lm_head=True)
        logps.append(out.log_probs)
        if compute_entropy:
            entropies.append(out.entropy)
        order.extend(group.rows)
    back = torch.argsort(torch.tensor(order, device=device))  # grouped order -> the batch's row order
    return SharedLogps(
        logps=torch.cat(logps)[back],
        entropies=torch.cat(entropies)[back] if compute_entropy else None,
        rows_per_prompt=input_ids.size(0) / len(groups),
    )
