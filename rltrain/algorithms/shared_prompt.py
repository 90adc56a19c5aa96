"""Per-token log-probabilities of completions that share prompts, each distinct prompt run once; and the SFT batch
whose rows share a leading prefix, that prefix run once.

Why: a GRPO step samples ``num_generations`` completions of every prompt, and an agent's prompt is long while its
completion is short (room selection, inline: ~530 prompt tokens, at most 8 completion tokens). TRL's loss runs every
row whole, so each prompt is computed ``num_generations`` times forward and backward, and off Triton devices its
fused LM head also projects every prompt position onto the vocabulary. Here the rows whose (unpadded) prompts are
equal form a group: the prompt without its last token runs once into a KV cache, the cache is repeated for the
group's rows, and only ``[last prompt token] + completion`` runs per row, through the same fused head TRL patched
onto the model (temperature included). The log-probs are the full pass's, up to float rounding; with gradients
on, backward sums every row's gradient through the shared cache into the one prompt pass, so the gradient is
the full pass's too (``tests/test_shared_prompt.py`` checks both against TRL's own computation).

A group's completions often begin alike too: an agent's rollouts that made the same tool call got the same tool
result, and only their final answers differ (the tool ladder: ~250 shared tokens, ~10 of each row's own). Those
leading tokens run once with the prompt (scored through the same head with pre-shifted labels), and each row runs
only what is its own.

Rotary position embeddings make the result independent of where TRL's left padding put a prompt, so the
unpadded prompt (positions from 0, as the engine sampled it) gives the same values.

The warm start has the same waste in another shape: every demonstration has its own request, but all of them begin
with the same system prompt (in tool mode with the tools' schema: ~510 of a ~780-token row), and TRL's SFT loss runs
every row whole. :func:`shared_prefix_inputs` runs the columns every row of a batch shares once and hands TRL's loss
the rest of each row with that cache.

Neither applies under gradient checkpointing: a checkpointed layer drops the cache it is given (transformers'
``GradientCheckpointingLayer``), so the rows would run without their prompt. Both then decline
(:func:`checkpoints_activations`) and the caller runs whole rows.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

IGNORE_INDEX = -100
"""The label of a position the fused head does not score."""


def checkpoints_activations(model: torch.nn.Module) -> bool:
    """Whether a layer of ``model`` recomputes its activations in backward (and so would ignore a KV cache).
    transformers' ``is_activation_checkpointing`` asks the same, but only of its own models: the trainers pass
    models wrapped by PEFT or DDP here, whose modules are all one can rely on."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


@dataclass(frozen=True)
class PromptGroup:
    """Rows of a batch whose prompts are the same token ids (``prompt``, unpadded)."""

    rows: list[int]
    prompt: list[int]


@dataclass(frozen=True)
class SharedLogps:
    """What :func:`shared_prompt_logps` computed: per-token log-probs and entropies (``None`` unless asked) of the
    completions, ``(rows, completion length)``, how many rows each prompt pass served on average, and how many
    leading completion tokens a group's rows shared and ran once, on average."""

    logps: torch.Tensor
    entropies: torch.Tensor | None
    rows_per_prompt: float
    shared_completion_tokens: float = 0.0


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
    if groups is None or (model.training and torch.is_grad_enabled() and checkpoints_activations(model)):
        return None
    device = input_ids.device
    logps, entropies, order, shared_tokens = [], [], [], []
    for group in groups:
        rows = torch.tensor(group.rows, device=device)
        completions, completion_mask = input_ids[rows, prompt_length:], attention_mask[rows, prompt_length:]
        shared = shared_completion_length(completions, completion_mask) if len(group.rows) > 1 else 0
        prefix = torch.tensor([group.prompt[:-1]], dtype=input_ids.dtype, device=device)
        cached = prefix.size(1) + shared  # tokens run once, whose cache the rows share
        cache = DynamicCache() if cached else None
        with autocast():
            if prefix.size(1):
                model(input_ids=prefix, cache=cache, use_cache=True, logits_to_keep=1)
            head = None
            if shared:  # the completion tokens every row has, scored once: pre-shifted labels score the last position
                run = torch.cat([torch.tensor([group.prompt[-1:]], dtype=input_ids.dtype, device=device),
                                 completions[:1, :shared - 1]], dim=1)
                head = model(input_ids=run, cache=cache, shift_labels=completions[:1, :shared], fused_lm_head=True)
        if cache is not None:
            cache.batch_repeat_interleave(len(group.rows))
        last = (completions[:, shared - 1:shared] if shared
                else torch.full((len(group.rows), 1), group.prompt[-1], dtype=input_ids.dtype, device=device))
        suffix = torch.cat([last, completions[:, shared:]], dim=1)
        scored = torch.cat([torch.zeros_like(last), completion_mask[:, shared:]], dim=1)
        mask = torch.cat([torch.ones(len(group.rows), cached, dtype=attention_mask.dtype, device=device),
                          torch.ones_like(last), completion_mask[:, shared:]], dim=1)
        with autocast():
            out = model(input_ids=suffix, attention_mask=mask, cache=cache,
                        labels=suffix.masked_fill(scored == 0, IGNORE_INDEX), fused_lm_head=True)
        logps.append(_joined(head.log_probs if head is not None else None, out.log_probs))
        if compute_entropy:
            entropies.append(_joined(head.entropy if head is not None else None, out.entropy))
        order.extend(group.rows)
        shared_tokens.append(shared)
    back = torch.argsort(torch.tensor(order, device=device))  # grouped order -> the batch's row order
    return SharedLogps(
        logps=torch.cat(logps)[back],
        entropies=torch.cat(entropies)[back] if compute_entropy else None,
        rows_per_prompt=input_ids.size(0) / len(groups),
        shared_completion_tokens=sum(shared_tokens) / len(groups),
    )


def _joined(head: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Per-row values with the group's shared head (``(1, k)``, computed once) in front of every row's own."""
    return rows if head is None else torch.cat([head.expand(rows.size(0), -1), rows], dim=1)


def _common_columns(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading columns every row holds unpadded with the same token."""
    same = (ids == ids[:1]).all(dim=0) & mask.bool().all(dim=0)
    return int(same.long().cumprod(dim=0).sum())


def shared_completion_length(completions: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading completion tokens every row of a group has the same and unpadded, leaving every row at
    least one token of its own (an agent's rows repeat its tool call and the tool's result whenever the
    model wrote the same call: only the final answers differ)."""
    return max(0, min(_common_columns(completions, mask), int(mask.sum(dim=1).min()) - 1))


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> int:
    """How many leading columns of a right-padded batch to run once: those every row holds unpadded with the same
    tokens, stopping before the column ahead of the first scored label of any row. (The head scores a label from
    the position before it; the rows' own pass starts at the prefix's end, so the prefix's last position must not
    be the one that scores a label.)"""
    scored = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    first_scored = int(scored[0]) if scored.numel() else input_ids.size(1)
    return min(_common_columns(input_ids, attention_mask), first_scored - 1)


def shared_prefix_inputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, object] | None:
    """The SFT batch ``inputs`` (``input_ids``, ``attention_mask``, ``labels``, right-padded) with the prefix every
    row shares already run, once, into a KV cache repeated for the rows: the returned inputs hold the rest of each
    row, the whole attention mask and that cache, and the model's loss on them equals its loss on the whole rows,
    gradients included (backward sums every row's gradient through the cache into the one prefix pass).

    ``None`` (run the rows whole) for a batch of one row, for inputs with anything else (position ids of a
    padding-free batch, images), under gradient checkpointing, or when the rows share no prefix."""
    if set(inputs) != {"input_ids", "attention_mask", "labels"} or checkpoints_activations(model):
        return None
    input_ids, attention_mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    rows = input_ids.size(0)
    length = shared_prefix_length(input_ids, attention_mask, labels) if rows > 1 else 0
    if length < 1:
        return None
    cache = DynamicCache()
    model(input_ids=input_ids[:1, :length], cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(rows)
    return {"input_ids": input_ids[:, length:], "attention_mask": attention_mask, "labels": labels[:, length:],
            "cache": cache}
