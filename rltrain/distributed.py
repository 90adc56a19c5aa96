"""Ranks of a multi-process training run (``accelerate launch``, ``torchrun``): who writes, and the few collectives
the algorithms need on top of the gradient all-reduce accelerate already does.

The rule of a multi-process run: the *main* process (rank 0) owns everything with a side effect on the run
directory or the world, namely the serving stack (the engine shares the trainer's model object; the gateway and
the store are single-process things), the rollouts, validation, ``metrics.jsonl``, checkpoints' extra files,
``best/``, ``final/`` and the store's records. The other ranks train on rows the main process samples and
broadcasts, and meet it in the collectives below. When the main process fails, the launcher (torchrun's agent)
stops the others.

The rank comes from the launcher's environment (``RANK``, ``WORLD_SIZE``), so it is known before torch's
process group exists (the Trainer and the metrics writer need it first); torch is imported only by the
collectives.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")

#: how long a rank waits at a collective for the others (TRL's ``ddp_timeout``): the main process may spend a
#: whole validation pass there while the others wait, far longer than torch's 30-minute default on a CPU
COLLECTIVE_TIMEOUT_S = 6 * 3600


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes the run's files (the only process of a one-process run)."""
    return rank() == 0


def _group_ready() -> bool:
    if world_size() == 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(
            f"WORLD_SIZE={world_size()} but torch's process group is not initialised: a collective was reached "
            "before the trainer set up the run's processes"
        )
    return True


def _device() -> Any:
    """Where collective tensors must live: the current GPU under NCCL, the CPU under gloo."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast(obj: T) -> T:
    """The main process's ``obj`` on every rank (pickled; what the others pass is ignored)."""
    if not _group_ready():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_lists(items: list[T]) -> tuple[list[T], int]:
    """Every rank's ``items`` concatenated in rank order, on every rank, and where this rank's start."""
    if not _group_ready():
        return list(items), 0
    import torch.distributed as dist

    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    start = sum(len(part) for part in parts[: rank()])
    return [item for part in parts for item in part], start


def rank_weight(local_count: float) -> float:
    """The factor that turns this rank's mean over ``local_count`` items into its share of the mean over every
    rank's items, once gradients are averaged across ranks: ``world_size * local / total``."""
    if not _group_ready():
        return 1.0
    import torch
    import torch.distributed as dist

    total = torch.tensor([float(local_count)], dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    return world_size() * float(local_count) / max(float(total.item()), 1.0)


def average_gradients(params: Iterable[Any]) -> None:
    """Average the gradients of parameters the data-parallel wrapper does not own (PPO's critic head) across
    ranks, as accelerate does for the model's."""
    if not _group_ready():
        return
    import torch.distributed as dist

    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world_size()


def replica_divergence(params: Iterable[Any]) -> float:
    """The largest absolute difference between any rank's copy of ``params`` and the main process's (0.0 in a
    one-process run): data parallelism keeps replicas equal, and this checks it did."""
    if not _group_ready():
        return 0.0
    import torch
    import torch.distributed as dist

    device = _device()
    local = torch.cat([p.detach().float().reshape(-1).to(device) for p in params])
    reference = local.clone()
    dist.broadcast(reference, src=0)
    diff = (local - reference).abs().max().reshape(1) if local.numel() else torch.zeros(1, device=device)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())
