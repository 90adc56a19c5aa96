"""One GRPO loss pass: TRL's log-probs over whole rows vs rltrain's shared-prompt pass, same rows, same model.

The workload is a room-selection micro-batch as the CPU ladder trains it: SmolLM2-135M-Instruct with LoRA r=16 on
all linear layers and TRL's fused LM head (temperature 0.7), one task's inline prompt (the agent's own chat
messages, ~530 tokens) with ``--generations`` sampled completions of ``--completion`` tokens. ``--shared-completion
N`` puts N tokens every completion has in front of them, as in tool mode, where a group's rollouts make the same
tool call and get the same result and differ in their answers (the tool ladder: ~250 and ~10). Both sides compute
the per-token log-probs and entropies of the completions and back-propagate a loss through them:

* peer: ``trl.GRPOTrainer._get_per_token_logps_and_entropies`` itself, TRL 1.16's code, on the whole rows;
* rltrain: :func:`rltrain.algorithms.shared_prompt.shared_prompt_logps` (the prompt once, its KV cache shared).

Time: medians of ``--repeats`` alternating trials in this process. Peak memory: each side once more in a fresh
process of its own, run first (``ru_maxrss`` minus the RSS before the pass). Prints both and the ratios. Run:
``.venv/bin/python benchmarks/bench_shared_prompt.py [--generations 8] [--repeats 3] [--shared-completion 250
--completion 10]``
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, log, median, report, timed

from rltrain.algorithms.shared_prompt import shared_prompt_logps
from rltrain.envs.room_selection import RoomSelectionEnv, default_prompts
from rltrain.envs.room_selection.prompts import prompt_values
from rltrain.envs.room_selection.tasks import request_of
from rltrain.models import DEFAULT_MODEL, load_model_and_tokenizer

TEMPERATURE = 0.7


def room_prompt_ids(tokenizer: Any, task: Any = None) -> list[int]:
    """The inline agent's prompt for ``task`` (the first public validation request by default), as the chat
    template renders it."""
    env = RoomSelectionEnv()
    task = task or env.load_tasks("public:val")[0]
    values = prompt_values("inline", request_of(task.payload), env.catalog)
    prompts = default_prompts("inline")
    messages = [
        {"role": "system", "content": prompts["system"].format(**values)},
        {"role": "user", "content": prompts["user"].format(**values)},
        {"role": "assistant", "content": prompts["answer_prefix"].format()},
    ]
    return list(tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def build(generations: int, completion: int, shared: int = 0) -> tuple[Any, torch.Tensor, torch.Tensor]:
    from peft import LoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    model, tokenizer = load_model_and_tokenizer(DEFAULT_MODEL)
    add_fused_lm_head(model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).train()
    prompt = torch.tensor(room_prompt_ids(tokenizer))
    generator = torch.Generator().manual_seed(0)
    common = torch.randint(100, len(tokenizer), (1, shared), generator=generator).expand(generations, -1)
    completions = torch.randint(100, len(tokenizer), (generations, completion), generator=generator)
    ids = torch.cat([prompt.expand(generations, -1), common, completions], dim=1)
    return model, ids, torch.ones_like(ids)


def trl_pass(model: Any, ids: torch.Tensor, mask: torch.Tensor, completion: int) -> None:
    """``completion``: the columns scored (everything after the prompt)."""
    from trl import GRPOTrainer

    trainer = SimpleNamespace(accelerator=SimpleNamespace(autocast=contextlib.nullcontext))
    # its profiling wrapper reads more of a trainer; the method itself reads only `accelerator.autocast`
    logps = GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__(
        trainer, model, ids, mask, completion, compute_entropy=True)[0]
    logps.sum().backward()
    model.zero_grad()


def shared_pass(model: Any, ids: torch.Tensor, mask: torch.Tensor, completion: int) -> None:
    shared = shared_prompt_logps(model, ids, mask, completion, True, contextlib.nullcontext)
    assert shared is not None
    shared.logps.sum().backward()
    model.zero_grad()


SIDES = {"trl": trl_pass, "rltrain": shared_pass}


def peak_mb_of(side: str, args: argparse.Namespace) -> float:
    """Peak RSS growth of one pass of ``side`` in a fresh process."""
    done = subprocess.run([sys.executable, __file__, "--memory-of", side, "--generations", str(args.generations),
                           "--completion", str(args.completion), "--shared-completion", str(args.shared_completion),
                           "--threads", str(args.threads)],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=8, help="completions of the prompt (one GRPO group)")
    parser.add_argument("--completion", type=int, default=6, help="tokens per completion")
    parser.add_argument("--shared-completion", type=int, default=0,
                        help="completion tokens every row has, before its own (a tool call and its result)")
    parser.add_argument("--repeats", type=int, default=3, help="timed trials per side")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-RSS runs (TRL's whole-row pass of 8 tool rows peaks near 20 GB)")
    parser.add_argument("--memory-of", choices=sorted(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (for run_all.py)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        model, ids, mask = build(args.generations, args.completion, args.shared_completion)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        SIDES[args.memory_of](model, ids, mask, args.completion + args.shared_completion)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        return
    # memory first, while this process holds nothing: the whole-row pass peaks at many GB, and a parent that has
    # already run it keeps much of that heap, so both together can exceed a 24 GB machine
    memory = {side: (None if args.no_memory else peak_mb_of(side, args)) for side in SIDES}
    model, ids, mask = build(args.generations, args.completion, args.shared_completion)
    scored = args.completion + args.shared_completion
    log(f"{args.generations} rows of {ids.size(1)} tokens ({ids.size(1) - scored} prompt, "
        f"{args.shared_completion} completion tokens shared)")
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for trial in range(args.repeats):
        for side, run in SIDES.items():
            times[side].append(timed(lambda run=run: run(model, ids, mask, scored)))
            log(f"trial {trial}: {side} {times[side][-1]:.2f} s")
    label = f"GRPO loss pass, {args.generations} x {ids.size(1)} tokens"
    if args.shared_completion:
        label += f" ({args.shared_completion} completion tokens shared)"
    rows = [Row("shared_prompt", f"{label}, forward + backward", "s", median(times["rltrain"]), median(times["trl"]),
                higher_is_better=False, note="peer: TRL 1.16 GRPOTrainer's whole-row pass")]
    if memory["rltrain"] is not None:
        rows.append(Row("shared_prompt", f"{label}, peak RSS growth", "MB", memory["rltrain"], memory["trl"],
                        higher_is_better=False, note="each side in a fresh process"))
    report(rows)


if __name__ == "__main__":
    main()
