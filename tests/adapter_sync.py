"""Helpers of the vLLM tests (the test server's and the real one's): LoRA adapters that change a model's outputs,
and what a 2-step GRPO run with adapter sync must have left in its run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rltrain.metrics import read_metrics
from rltrain.store import SqliteStore
from rltrain.types import SpanKind


def make_adapter(model_dir: str | Path, out: Path, seed: int, r: int = 4,
                 targets: tuple[str, ...] = ("q_proj", "v_proj"), scale: float = 2.0) -> Path:
    """A LoRA adapter with random (non-zero) B matrices times ``scale``, so that it changes the model's outputs."""
    from peft import LoraConfig, get_peft_model

    from rltrain.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(model_dir)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(out)
    return out


def two_synced_steps(run: Path) -> list[dict[str, Any]]:
    """Check a 2-step GRPO run with adapter sync (only the newest adapter kept; the rollouts of step 1 sampled by
    version 0, those of step 2 by version 1) and return its two training log lines."""
    assert [p.name for p in (run / "adapters").iterdir()] == ["policy-v2"]
    store = SqliteStore(run / "store.sqlite")
    try:
        versions = {span.attributes["policy_version"] for r in store.list_rollouts(mode="train")
                    for span in store.get_spans(r.rollout_id) if span.kind is SpanKind.LLM}
    finally:
        store.close()
    assert versions == {0, 1}
    logs = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "train" and "loss" in r]
    assert len(logs) == 2
    return logs
