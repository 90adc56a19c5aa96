"""Weight sync with the vLLM engine (design decision 4).

The trainer updates a LoRA adapter in its own process; vLLM samples in another. After every optimiser step
:class:`AdapterPublisher` saves the adapter under ``<run dir>/adapters/policy-v{step}``, hot-loads it into vLLM
under that name (``POST /v1/load_lora_adapter``), makes it the version the agents' calls use, and unloads the older
version (and deletes its files: checkpoints are kept elsewhere). With ``engine.vllm.weight_sync: merged`` TRL's own
vLLM client pushes the merged weights over NCCL instead (for ZeRO-3 / FSDP, where no process holds the whole
adapter). Either way :class:`WeightSync`, a ``TrainerCallback``, does it at the start of training (the resumed
step) and at the end of every optimiser step, before the validation callbacks that follow.

Importance sampling: TRL corrects for the gap between the engine's logprobs and its own (different kernels and
dtype) only when it believes it sampled with vLLM itself. :func:`attach_weight_sync` therefore sets the trainer's
``use_vllm`` flag and hands it the :class:`WeightSync` as its ``vllm_generation``, whose ``sync_weights`` TRL calls
before each generation (a no-op when the step is already synced). These are TRL 1.16 attributes
(``use_vllm``, ``vllm_mode``, ``vllm_generation``, ``_last_loaded_step``; ``tests/test_weight_sync.py`` runs a GRPO
step through them on CPU, so a TRL change that breaks them fails there). The mode and clip bounds are the
``vllm_importance_sampling_*`` fields of the algorithm section; TRL logs the ratios as
``sampling/importance_sampling_ratio/{min,mean,max}``.

Several vLLM servers (``engine.vllm.urls`` / ``replicas``) are one :class:`~rltrain.engines.engine_pool.EnginePool`
to the publisher: each load and unload reaches every live server before it returns, so the next step samples the
new version wherever its rollouts land.

Several training processes (DDP, ZeRO-2) share one vLLM server: the main process saves and loads, all wait at a
barrier, then every process routes to the new version.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from transformers import TrainerCallback, TrainerControl, TrainerState

from rltrain.algorithms.vllm_checks import WeightSyncError, adapter_problems, check_adapter_sync_layout
from rltrain.engines.engine_pool import EnginePool
from rltrain.engines.vllm import VLLMEngine, adapter_name
from rltrain.recipes import Recipe

if TYPE_CHECKING:
    from trl import GRPOTrainer

logger = logging.getLogger(__name__)

#: where adapters are saved for the engine, under the run directory
ADAPTERS_DIR = "adapters"


class _ProcessState(Protocol):
    """What is needed of ``accelerate``'s process state: who saves, and a barrier."""

    @property
    def is_main_process(self) -> bool: ...

    def wait_for_everyone(self) -> None: ...


class AdapterPublisher:
    """Save a PEFT model's adapter and serve it from ``engine`` as ``policy-v{version}`` (older versions go)."""

    def __init__(
        self, engine: VLLMEngine | EnginePool, directory: Path, max_lora_rank: int, state: _ProcessState
    ) -> None:
        self.engine = engine
        self.directory = directory
        self.max_lora_rank = max_lora_rank
        self.state = state

    def publish(self, model: Any, version: int) -> None:
        engine = self.engine
        if engine.policy_version == version and version in engine.loaded_versions:
            return
        path = self.directory / adapter_name(version)
        main = self.state.is_main_process
        if main:
            if path.exists():
                shutil.rmtree(path)  # left by an earlier, interrupted run of this directory
            model.save_pretrained(path)
            problems = adapter_problems(path, self.max_lora_rank)
            if problems:
                raise WeightSyncError("; ".join(problems))
            engine.load_adapter(version, path)
        self.state.wait_for_everyone()
        if not main:
            engine.adopt_adapter(version, path)
        engine.set_policy_version(version)
        for old in engine.loaded_versions:
            if old == version:
                continue
            if main:
                engine.unload_adapter(old)
                shutil.rmtree(self.directory / adapter_name(old), ignore_errors=True)
            else:
                engine.forget_adapter(old)
        logger.info("vLLM now samples with %s", adapter_name(version))


def publish_served_weights(recipe: Recipe, engine: VLLMEngine | EnginePool, model: Any) -> None:
    """Make a freshly started engine sample with ``model``'s weights, as the embedded engine does by sharing the
    model: a PEFT model's adapter is published as version 0; a plain model is the base weights vLLM already
    serves (merged sync pushes weights only once training starts)."""
    from accelerate import PartialState
    from peft import PeftModel

    if not isinstance(model, PeftModel) or not engine.adapters_enabled:
        return
    publisher = AdapterPublisher(engine, recipe.run_dir / ADAPTERS_DIR, recipe.engine.vllm.max_lora_rank,
                                 PartialState())
    publisher.publish(model, 0)


class WeightSync(TrainerCallback):
    """Calls ``push(step)`` once per optimiser step: at the start of training and at the end of every step. Also
    TRL's ``vllm_generation`` (see the module docstring): TRL calls :meth:`sync_weights` before generating."""

    def __init__(self, trainer: GRPOTrainer, push: Callable[[int], None]) -> None:
        self.trainer = trainer
        self.push = push
        self.synced_step: int | None = None

    def sync(self, step: int) -> None:
        if step != self.synced_step:
            self.push(step)
            self.synced_step = step
        self.trainer._last_loaded_step = step

    def sync_weights(self) -> None:
        self.sync(int(self.trainer.state.global_step))

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.sync(int(state.global_step))

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.sync(int(state.global_step))


def importance_sampling_args(section: Any) -> dict[str, Any]:
    """The ``trl.GRPOConfig`` fields of the correction, from the algorithm section (same names)."""
    names = ("vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
             "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min")
    return {name: getattr(section, name) for name in names}


def attach_weight_sync(recipe: Recipe, engine: Any, trainer: GRPOTrainer) -> WeightSync | None:
    """With engine.kind=vllm, register the :class:`WeightSync` of ``trainer`` (call it before adding callbacks
    that validate after a step) and turn on TRL's importance-sampling correction; otherwise do nothing (the
    embedded engine shares the trainer's model)."""
    if recipe.engine.kind != "vllm":
        return None
    config = recipe.engine.vllm
    if config.weight_sync == "adapter":
        state = trainer.accelerator.state
        plugin = getattr(state, "deepspeed_plugin", None)
        check_adapter_sync_layout(state.distributed_type.value, plugin.zero_stage if plugin is not None else None)
        publisher = AdapterPublisher(engine, recipe.run_dir / ADAPTERS_DIR, config.max_lora_rank, trainer.accelerator)

        def push(step: int) -> None:
            publisher.publish(trainer.model, step)
    else:
        push = _merged_push(recipe, engine, trainer)
    sync = WeightSync(trainer, push)
    trainer.add_callback(sync)
    trainer.use_vllm = True
    trainer.vllm_mode = "server"
    trainer.vllm_generation = sync
    trainer._last_loaded_step = -1
    logger.info("weight sync: %s; importance sampling correction: %s (%s)", config.weight_sync,
                trainer.vllm_importance_sampling_correction, trainer.vllm_importance_sampling_mode)
    return sync


def _merged_push(recipe: Recipe, engine: VLLMEngine, trainer: GRPOTrainer) -> Callable[[int], None]:
    """TRL's server-mode sync: merge the adapter, stream every weight to vLLM over NCCL, unmerge."""
    if importlib.util.find_spec("vllm") is None:
        raise WeightSyncError(
            "engine.vllm.weight_sync=merged streams weights through TRL's vLLM client, which needs the `vllm` "
            "package importable by the trainer (`pip install 'rltrain[gpu]'` in the trainer's environment); "
            "or use weight_sync: adapter"
        )
    from trl.generation.vllm_generation import VLLMGeneration

    generation = VLLMGeneration(
        model=trainer.model, accelerator=trainer.accelerator, processing_class=trainer.processing_class,
        mode="server", server_base_url=engine.base_url, server_timeout=recipe.engine.vllm.startup_timeout_s,
        group_port=trainer.args.vllm_group_port,
    )

    def push(step: int) -> None:
        generation.sync_weights()
        engine.set_policy_version(step)

    return push
