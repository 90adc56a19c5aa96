"""Shared fixtures: the real SmolLM2 tokenizer with a tiny random Llama model, and an engine on it.

Tests run the real tokenizer and chat template (what the gateway and the trajectories see) with a model small
enough that a forward pass costs microseconds, so nothing depends on the 135M weights except the few tests
marked ``slow`` (and ``vllm``). Tests marked ``gpu`` are skipped on machines without CUDA, tests marked ``vllm``
where vLLM is not installed (`make test` installs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rltrain.engines.transformers import TransformersEngine
from rltrain.models import prepare_default_model

TINY_SEED = 1234


def pytest_configure(config: pytest.Config) -> None:
    # Tests run tiny models, where intra-op threads only add overhead, often on a small machine that runs
    # other work too; one thread was measured faster there (CALIBRATION.md).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests need CUDA; ``vllm`` tests need vLLM (CPU or GPU build), which `make test` installs first."""
    from rltrain.recipes import VLLMConfig

    has_cuda = torch.cuda.is_available()
    has_vllm = VLLMConfig().installed()
    skip_gpu = pytest.mark.skip(reason="needs CUDA; torch.cuda.is_available() is False")
    skip_vllm = pytest.mark.skip(reason="needs vLLM: `make vllm` (CPU) installs it in .venv-vllm")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(skip_vllm)


@pytest.fixture(scope="session")
def smollm_tokenizer_dir() -> Path:
    """Directory of the prepared default model, which holds its tokenizer and chat template (converted from
    the GGUF on first use, ~20 s; cached for every later session)."""
    return prepare_default_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's vocabulary, saved with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=128,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tiny_engine(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    """A fresh engine (own model object, zeroed stats) on the tiny model; closed after the test."""
    engine = TransformersEngine.from_pretrained(str(tiny_model_dir))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[TransformersEngine]:
    """One tiny engine per test module, for the tests that leave it running (loading one per test would dominate
    the run time); a test that closes an engine builds its own."""
    engine = TransformersEngine.from_pretrained(str(tiny_model_dir))
    yield engine
    engine.close()
