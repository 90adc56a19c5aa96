"""The even-length agent of ``even_length_env.py`` with reproducible sampling, for runs compared across launches.

Each call passes a seed fixed by the task, the policy version and how many calls that pair has made so far in
this process, so two runs that sample the same tasks in the same order (runner concurrency 1) from the same
weights sample the same tokens: a one-process and a two-process run of a recipe train on the same rows, and a
resumed run samples its steps as the interrupted one did.
"""

from __future__ import annotations

from collections import Counter

from even_length_env import even_length_reward

from rltrain.agent import rollout
from rltrain.types import Resources

_calls: Counter[tuple[str, int]] = Counter()


@rollout
def seeded_even_length_agent(task: dict, resources: Resources) -> float:
    """Rewarded when the reply has an even number of characters (see :func:`even_length_reward`)."""
    key = (task["word"], resources.version)
    seed = 1000 * resources.version + 100 * int(task["word"].removeprefix("word")) + _calls[key]
    _calls[key] += 1
    return even_length_reward(task, resources, seed=seed)


@rollout
def broken_agent(task: dict, resources: Resources) -> float:
    """Fails every rollout: the main process's sampling stops the run (``runner.max_failed_fraction``)."""
    raise RuntimeError(f"broken agent on {task['word']}")
