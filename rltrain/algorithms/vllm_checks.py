"""What vLLM can serve and train on, checked before any model is loaded (no torch imported here).

The recipe schema calls :func:`vllm_recipe_problems` for every recipe with ``engine.kind: vllm``, so a rank above
``--max-lora-rank``, a LoRA on the embeddings or the output head, ``top_p < 1`` for training rollouts, or a weight-sync
mode that cannot reach vLLM fail with the field named, in the time it takes to read the YAML.
:func:`adapter_problems` checks an adapter as saved (what vLLM will read) and :func:`check_adapter_sync_layout` the
distributed layout the trainer runs in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rltrain.recipes import Recipe

#: module names of input embeddings and output heads (PEFT / Hugging Face conventions); vLLM serves LoRA on
#: linear layers only
UNSERVABLE_TARGETS = frozenset({
    "lm_head", "embed_tokens", "embed_in", "embed_out", "wte", "wpe", "word_embeddings", "embeddings", "shared",
})


class WeightSyncError(RuntimeError):
    """The weights cannot be synced as configured (an adapter vLLM cannot load, a layout it cannot follow)."""


def lora_problems(
    r: int, target_modules: str | Iterable[str], max_lora_rank: int, where: str, *,
    modules_to_save: Iterable[str] | None = None, use_dora: bool = False,
) -> list[str]:
    """Why vLLM could not load a LoRA adapter of this shape (empty when it can)."""
    problems = []
    if r > max_lora_rank:
        problems.append(
            f"{where}.r={r} exceeds engine.vllm.max_lora_rank={max_lora_rank}: vLLM refuses adapters above its "
            "max rank; lower r or raise max_lora_rank (one of 1, 8, 16, 32, 64, 128, 256, 320, 512)"
        )
    if not isinstance(target_modules, str):
        bad = sorted(m for m in target_modules if m.rsplit(".", 1)[-1] in UNSERVABLE_TARGETS)
        if bad:
            problems.append(
                f"{where}.target_modules includes {bad}: vLLM serves LoRA on linear layers only, not on embeddings "
                "or the output head; remove them (or use all-linear, which leaves lm_head out)"
            )
    if modules_to_save:
        problems.append(f"{where}: modules_to_save {sorted(modules_to_save)} are full copies vLLM cannot load")
    if use_dora:
        problems.append(f"{where}: DoRA adapters (use_dora) are not served by vLLM")
    return problems


def vllm_recipe_problems(recipe: Recipe) -> list[str]:
    """Everything about ``recipe`` (engine.kind=vllm) that would fail or train wrongly on vLLM."""
    config = recipe.engine.vllm
    algorithm = recipe.algorithm
    problems = []
    lora = getattr(algorithm, "lora", None)
    if lora is not None and config.weight_sync == "adapter":
        problems += lora_problems(lora.r, lora.target_modules, config.max_lora_rank, "algorithm.lora")
    is_rl = hasattr(algorithm, "vllm_importance_sampling_correction")
    if is_rl and recipe.sampling.train.top_p != 1.0:
        problems.append(
            f"sampling.train.top_p={recipe.sampling.train.top_p} must be 1.0 with engine.kind=vllm: vLLM's logprobs "
            "are then of the nucleus-truncated distribution, which the trainer does not recompute"
        )
    if config.weight_sync == "merged" and (recipe.warm_start is not None or (algorithm is not None and not is_rl)):
        problems.append(
            "engine.vllm.weight_sync=merged pushes weights from TRL's GRPO trainer only, so the warm start's or "
            "SFT's adapter would never reach vLLM; use weight_sync: adapter"
        )
    return problems


def adapter_problems(path: Path, max_lora_rank: int) -> list[str]:
    """:func:`lora_problems` of an adapter saved by PEFT in ``path`` (what vLLM will read)."""
    config = json.loads((path / "adapter_config.json").read_text())
    return lora_problems(
        int(config["r"]), config.get("target_modules") or [], max_lora_rank, str(path),
        modules_to_save=config.get("modules_to_save"), use_dora=bool(config.get("use_dora")),
    )


def check_adapter_sync_layout(distributed_type: str, zero_stage: int | None) -> None:
    """Adapter sync needs one process that holds the whole adapter; ZeRO-3 and FSDP shard it."""
    if distributed_type == "FSDP" or (distributed_type == "DEEPSPEED" and zero_stage == 3):
        layout = "FSDP" if distributed_type == "FSDP" else "DeepSpeed ZeRO-3"
        raise WeightSyncError(
            f"{layout} shards the LoRA weights across processes, so no process can save the adapter for vLLM; "
            "set engine.vllm.weight_sync: merged (TRL gathers and pushes the merged weights), or train with "
            "ZeRO-2 (recipes/accelerate/zero2.yaml)"
        )
