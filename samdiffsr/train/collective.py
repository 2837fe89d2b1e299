"""The training process group and the collectives on host values: gathering, agreeing on a stop or on a
failure, and the weights digest that checks the ranks ended equal."""

from __future__ import annotations

import atexit
import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from samdiffsr.cli import EXIT_FAILED, PeerFailure, UserError, report_on_this_rank
from samdiffsr.distributed import free_port, launched

T = TypeVar("T")
SHM_DIR = Path("/dev/shm")
_GROUP_CREATED = [False]  # whether this process created the group (`exit_process`)


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group unless it already exists.

    The group then lives as long as the process: DeepSpeed caches process groups in module globals, so a
    destroyed and re-created group would leave it holding stale ones. Later in-process calls reuse it; it is
    destroyed at exit (`destroy_group`).
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
        if accel.device_name() == "cpu":
            release_shm_buffer()
        atexit.register(destroy_group)
        _GROUP_CREATED[0] = True
    # LOCAL_RANK alone, as DeepSpeed's engine reads it: the device must be the one DeepSpeed uses.
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def shm_buffer_name(rank: int) -> str:
    """The name DeepSpeed's CPU all-reduce gives this rank's shared-memory workspace (``shm_initialize`` in
    deepspeed/ops/csrc/cpu/comm/shm.cpp: uid, MASTER_ADDR and MASTER_PORT as its environment had them)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed shared-memory workspace (66 MB in /dev/shm) as soon as every rank has it.

    DeepSpeed's CPU accelerator creates one per rank when all ranks are local (``LOCAL_SIZE`` = world, as the
    deepspeed launcher sets) and never unlinks it. Each rank maps every other rank's file while
    ``init_distributed`` runs, so after a barrier the names are no longer needed: the mappings live on until
    the process ends, and no exit path (finished, stopped, crashed, even kill -9) can leave a file behind.
    Only this run's own names (its master address and port, this rank) are touched.
    """
    if dist.get_world_size() > 1:
        dist.barrier()  # every rank has opened every other rank's workspace
    (SHM_DIR / shm_buffer_name(dist.get_rank())).unlink(missing_ok=True)


def destroy_group() -> None:
    """At process exit, while the interpreter is whole: left to the interpreter's teardown, gloo's threads
    can be destroyed still joinable (``terminate called without an active exception``, exit code 134)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a training process with ``code``: its exit handlers run (the group is destroyed, logs flushed),
    then, when it created a process group, the interpreter's own teardown is skipped (``os._exit``).

    Why: torch keeps a reference to the default gloo group in C++ after ``destroy_process_group`` (and
    DeepSpeed one to a group of its own), so their threads are destroyed only while the interpreter tears
    itself down, in no fixed order, and one of them is sometimes destroyed still joinable: ``terminate called
    without an active exception``, SIGABRT instead of the exit status (about 1 in 5 two-rank runs ending with
    a user error on CPU). Everything of ours is written and flushed before this point.
    """
    if not _GROUP_CREATED[0]:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def agree(work: Callable[[], T]) -> T:
    """``work()`` on every rank, then the ranks agree: when it raised on any rank, the lowest such rank
    raises its error (printed there, `samdiffsr.cli`) and every other rank `PeerFailure` (silent), so no rank
    waits in a later collective for a rank that is gone. For work whose failure can be one rank's alone.
    """
    error: BaseException | None = None
    try:
        result = work()
    except Exception as exc:  # noqa: BLE001 - re-raised below, on this rank, once the ranks agreed
        error, result = exc, None
    settle(error, gather(failure_code(error)) if dist.is_initialized() else [failure_code(error)])
    return result  # type: ignore[return-value]


def failure_code(error: BaseException | None) -> int:
    """0 for no error, a user error's exit status, else EXIT_FAILED."""
    if error is None:
        return 0
    return error.exit_code if isinstance(error, UserError) else EXIT_FAILED


def settle(error: BaseException | None, codes: list[int]) -> None:
    """Raise on every rank when any rank's code (``failure_code``, one per rank, in rank order) is non-zero."""
    failed = [rank for rank, code in enumerate(codes) if code]
    if not failed:
        return
    me = dist.get_rank() if dist.is_initialized() else 0
    if error is not None and me == failed[0]:
        raise report_on_this_rank(error)
    raise PeerFailure(failed[0], codes[failed[0]])


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
