"""Where this process sits in a job: rank, world size, local rank and array task from the launcher's
environment (torchrun and the deepspeed launcher set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; ``srun``
sets ``SLURM_PROCID`` / ``SLURM_NTASKS`` / ``SLURM_LOCALID``), plus seeds and ports derived from it, and
which rank of a process group reports an error (the group's key-value store decides)."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from typing import Any

import numpy as np

_LAUNCHERS = (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))


def process_rank() -> int:
    """This process's rank under torchrun / deepspeed (``RANK``) or srun (``SLURM_PROCID``); 0 otherwise."""
    for name, _ in _LAUNCHERS:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def rank_and_world(error: type[Exception] = ValueError) -> tuple[int, int]:
    """(rank, world size) from torchrun / deepspeed or Slurm; (0, 1) outside a launcher.

    A rank outside ``[0, world)`` raises ``error`` naming both variables.
    """
    for rank_var, world_var in _LAUNCHERS:
        if rank_var in os.environ and world_var in os.environ:
            rank, world = int(os.environ[rank_var]), int(os.environ[world_var])
            if not 0 <= rank < world:
                raise error(f"{rank_var}={rank} is not in [0, {world_var}={world})")
            return rank, world
    return 0, 1


def launched() -> bool:
    """Whether a launcher (torchrun, the deepspeed launcher, or Slurm set up by cluster.jobs) gave a world."""
    return {"RANK", "WORLD_SIZE"} <= os.environ.keys()


def local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``, else ``SLURM_LOCALID``, else 0): its GPU."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def array_task_id() -> int:
    """This Slurm array task's index (``SLURM_ARRAY_TASK_ID``); 0 outside an array job."""
    return int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))


def free_port() -> int:
    """A TCP port on localhost that is free now (for a process group of one, or a local launcher)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def derive_seed(*key: int) -> int:
    """A 64-bit seed that is a pure function of non-negative integers (no global RNG, no hashing salt)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0])


_ERROR_CLAIMED, _ERROR_CODE = "samdiffsr/error_claimed", "samdiffsr/error_code"
_STORE_WAIT = timedelta(seconds=5)


def _group_store() -> Any:
    """The key-value store of a live process group of several ranks (torch.distributed), else None."""
    dist = sys.modules.get("torch.distributed")  # no torch imported: no group either
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return None
    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(_STORE_WAIT)  # the store's host may be the rank that ended
    return store


def claim_error_report(exit_code: int) -> bool:
    """Whether this process prints the error it ends with: in a group of several ranks the first rank to ask
    (any rank: the error may be its own alone), which leaves ``exit_code`` for `peer_error_code`; outside a
    group, rank 0 (every rank meets the same error before the group exists)."""
    try:
        store = _group_store()
        if store is None:
            return process_rank() == 0
        first = store.add(_ERROR_CLAIMED, 1) == 1
        if first:
            store.set(_ERROR_CODE, str(exit_code))
        return first
    except Exception:  # noqa: BLE001 - the store is gone: say it here rather than nowhere
        return True


def peer_error_code() -> int | None:
    """The exit status another rank of the group reported an error with (`claim_error_report`), or None."""
    try:
        store = _group_store()
        if store is None:
            return None
        store.wait([_ERROR_CODE], _STORE_WAIT)
        return int(store.get(_ERROR_CODE))
    except Exception:  # noqa: BLE001 - no report (timeout), or the store is gone with its host
        return None
