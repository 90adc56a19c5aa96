"""Export: merge a trained LoRA adapter into its base model, so any transformers/vLLM user can load it."""

from __future__ import annotations

import logging
from pathlib import Path

from rltrain.recipes import load_recipe

logger = logging.getLogger(__name__)


class ExportError(ValueError):
    """The run directory has no adapter of that name."""


def adapter_dir(run_dir: Path, adapter: str) -> Path:
    """``best``, ``final`` or ``checkpoint-N`` inside a run directory."""
    candidates = [run_dir / adapter, run_dir / "checkpoints" / adapter]
    for path in candidates:
        if (path / "adapter_config.json").exists():
            return path
    raise ExportError(
        f"no LoRA adapter {adapter!r} in {run_dir} (looked in {', '.join(str(c) for c in candidates)}); "
        "expected `best`, `final` or a checkpoint folder name"
    )


def export_merged(run_dir: Path, adapter: str, out: Path) -> Path:
    """Load the run's base model, apply the adapter, merge it and save model + tokenizer to ``out``."""
    from rltrain.models import load_policy

    recipe = load_recipe(run_dir / "recipe.yaml")
    source = adapter_dir(run_dir, adapter)
    merged, tokenizer = load_policy(recipe.model.name, source, dtype=recipe.model.dtype, device="cpu")
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("merged %s into %s", source, recipe.model.name)
    return out
