"""The training process group and the collectives on host values: gathering, agreeing on a stop, and the
weights digest that checks the ranks ended equal."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from samdiffsr.distributed import free_port, launched


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group unless it already exists.

    The group then lives as long as the process: DeepSpeed caches process groups in module globals, so a
    destroyed and re-created group would leave it holding stale ones. Later in-process calls reuse it.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if not dist.is_initialized():
        if launched():  # torchrun, the deepspeed launcher, Slurm
            deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False)
        else:  # plain `python`: a group of one
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it from the environment
            deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False,
                                       init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    # LOCAL_RANK alone, as DeepSpeed's engine reads it: the device must be the one DeepSpeed uses.
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def stop_group(stop_requested: Any, world_size: int) -> Any:
    """The group the ranks agree on a stop request in: gloo, so that agreeing never waits for the device.

    None when there is nothing to agree on (no stop hook, or one rank).
    """
    return dist.new_group(backend="gloo") if stop_requested is not None and world_size > 1 else None


def any_rank(flag: bool, group: Any) -> bool:
    """True on every rank when it is True on any rank of ``group`` (None: this rank alone)."""
    if group is None:
        return flag
    votes = torch.tensor([int(flag)])
    dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=group)
    return bool(votes.item())  # a CPU tensor on a gloo group: no device sync


def weights_digest(net: nn.Module) -> str:
    """SHA-256 of the parameters' bytes: equal on all ranks unless data parallelism went wrong."""
    h = hashlib.sha256()
    for p in net.parameters():
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
