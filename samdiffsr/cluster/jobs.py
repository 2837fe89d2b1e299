"""What runs inside a Slurm job: the distributed environment, the preemption stop, and the job callables
(:class:`TrainJob`, :class:`ShardsPart` / :class:`ShardsMerge`, :class:`BenchmarkJob`), importable by the
job's Python.

The one rule: a preemption signal only sets a flag, and every rank saves at the same step boundary before
rank 0 lets submitit requeue the job (a DeepSpeed save is collective). The design: docs/cluster.md.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import submitit

from samdiffsr.train.stop import EXIT_TERMINATED, StopRequest

log = logging.getLogger(__name__)

EXIT_REQUEUE = 3  # a rank stopped at a SIGUSR2 checkpoint: requeue the job (slurm/train.sbatch)
MASTER_PORTS = (20000, 60000)  # as submitit's TorchDistributedEnvironment


def preempt_signal() -> signal.Signals:
    """The signal Slurm sends before the time limit (submitit's choice: USR2 unless SUBMITIT_PREEMPT_SIGNAL)."""
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)


# --- the distributed environment -------------------------------------------------------------------
def first_host(nodelist: str, timeout: float = 30) -> str:
    """The first host of a Slurm node list (``node[01-04]`` -> ``node01``), via ``scontrol show hostnames``."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         timeout=timeout, check=True).stdout.split()
    if not out:
        raise RuntimeError(f"scontrol show hostnames {nodelist!r} printed no host")
    return out[0]


def slurm_distributed_env(environ: Mapping[str, str]) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for one ``srun`` task, from SLURM_* variables.

    Variables already set in ``environ`` win (slurm/train.sbatch sets them itself). The master is the first
    host of the job's node list; the port is derived from the job id, so every task agrees on it.
    """
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID") if k not in environ]
    if missing:
        raise RuntimeError(f"not inside a Slurm job step (missing {', '.join(missing)}): run under srun")
    env = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
           "LOCAL_RANK": environ.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in environ:
        env["MASTER_ADDR"] = first_host(environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"])
    if "MASTER_PORT" not in environ:
        env["MASTER_PORT"] = str(random.Random(environ["SLURM_JOB_ID"]).randint(*MASTER_PORTS))
    return {k: v for k, v in env.items() if k not in environ}


def limit_threads(environ: Mapping[str, str]) -> None:
    """Use the task's CPUs (SLURM_CPUS_PER_TASK) for torch's threads unless OMP_NUM_THREADS says otherwise."""
    cpus = environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in environ:
        import torch

        torch.set_num_threads(int(cpus))


def wait_to_be_ended(seconds: float, why: str) -> None:
    """Wait for Slurm to end this task (a requeue or cancel sends SIGTERM, then SIGKILL).

    Never returns: SIGTERM exits quietly (SystemExit, so submitit writes no result for an unfinished job);
    after ``seconds`` without it, an error. Exiting on our own any earlier could make Slurm end the step
    (KillOnBadExit) before rank 0 has requeued the job.
    """
    log.warning("%s; waiting up to %.0f s for Slurm to end the job", why, seconds)

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(EXIT_TERMINATED)

    signal.signal(signal.SIGTERM, leave)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.5)
    raise RuntimeError(f"{why}, but the job was not ended within {seconds:.0f} s")


# --- training ------------------------------------------------------------------------------------
def _with_resume(overrides: list[str], setting: str) -> list[str]:
    kept = [o for o in overrides if o.split("=", 1)[0].strip().lstrip("-") != "train.resume"]
    return [*kept, f"train.resume={setting}"]


@dataclass
class TrainJob:
    """One rank of a training run (submitit runs it once per task); checkpointable.

    ``config`` and ``overrides`` are what ``launcher/train.py`` takes; ``run_dir`` overrides ``train.run_dir``
    (absolute, so that every rank and every requeue writes into the same folder). ``grace_s``: how long a
    rank that stopped at a signal waits for Slurm to end the job before it gives up with an error.
    """

    config: str | None
    overrides: list[str] = field(default_factory=list)
    run_dir: str = "runs/samdiffsr"
    grace_s: float = 300.0

    def argv(self) -> list[str]:
        return [*(["--config", self.config] if self.config else []), *self.overrides,
                f"train.run_dir={self.run_dir}"]

    def __call__(self) -> dict[str, Any]:
        from samdiffsr.train import engine

        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                         overwrite=True)
        limit_threads(os.environ)
        preempt = preempt_signal()
        stop = StopRequest()
        with stop.catching(preempt, signal.SIGTERM) as submitit_handlers:
            summary = engine.main(self.argv(), stop_requested=stop)
        if not summary["stopped"]:  # (a signal at the very last step is not a stop: the run is complete)
            return summary
        signals = "+".join(s.name for s in stop.received) or "another rank's signal"
        why = f"rank {dist_env.rank} stopped at step {summary['step']} on {signals} after saving its checkpoint"
        if dist_env.rank == 0 and preempt in stop.received and callable(submitit_handlers[preempt]):
            # submitit's handler: checkpoint() -> requeue (or UncompletedJobError past the limit) -> exit.
            submitit_handlers[preempt](preempt, None)
        wait_to_be_ended(self.grace_s, why)
        raise AssertionError("unreachable")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit (rank 0) before it requeues: the same run, resumed from its latest checkpoint.

        The collective save already happened (docs/cluster.md). When no checkpoint exists yet (the
        signal came before the first one), the job restarts as it was first submitted.
        """
        latest = Path(self.run_dir) / "checkpoints" / "latest"
        job = replace(self, overrides=_with_resume(self.overrides, "must")) if latest.is_file() else self
        return submitit.helpers.DelayedSubmission(job)


def run_rank(argv: list[str]) -> int:
    """One training rank inside a Slurm allocation (``srun``; slurm/train.sbatch); returns the exit status.

    RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT come from the environment, or else from the
    SLURM_* variables of the task. SIGUSR2 or SIGTERM: all ranks save at the next step boundary and stop;
    exit status :data:`EXIT_REQUEUE` after SIGUSR2 (the batch script requeues), :data:`EXIT_TERMINATED`
    after SIGTERM alone.
    """
    from samdiffsr.train import engine

    os.environ.update(slurm_distributed_env(os.environ))
    limit_threads(os.environ)
    preempt = preempt_signal()
    stop = StopRequest()
    with stop.catching(preempt, signal.SIGTERM):
        summary = engine.main(argv, stop_requested=stop)
    if not summary["stopped"]:  # (a signal at the very last step is not a stop: the run is complete)
        return 0
    return EXIT_REQUEUE if preempt in stop.received or not stop.received else EXIT_TERMINATED


# --- data and evaluation -------------------------------------------------------------------------------
@dataclass
class ShardsPart:
    """Part ``part`` of a make_shards run split into ``num_parts`` (an array task). Resumable, so checkpointable."""

    argv: list[str]
    num_parts: int

    def __call__(self, part: int) -> int:
        from samdiffsr.cli import EXIT_CODES
        from samdiffsr.sharding.cli import main

        code = main([*self.argv, "--num-parts", str(self.num_parts), "--part", str(part), "--no-progress"])
        if code not in (0, 1):
            raise RuntimeError(f"make_shards part {part}/{self.num_parts} exited with {code} "
                               f"({EXIT_CODES.get(code, 'unknown')})")
        return code

    def checkpoint(self, part: int) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, part)  # make_shards resumes from its journal


@dataclass
class ShardsMerge:
    """Merge the part manifests of ``out`` (the job that depends on the array)."""

    out: str

    def __call__(self) -> int:
        from samdiffsr.sharding.cli import main

        code = main(["--merge", "--out", self.out])
        if code not in (0, 1):
            raise RuntimeError(f"make_shards --merge --out {self.out} exited with {code}")
        return code


@dataclass
class BenchmarkJob:
    """A benchmark sweep (``launcher/benchmark.py`` arguments); the tasks share the images (SLURM_PROCID)."""

    argv: list[str]

    def __call__(self) -> int:
        from samdiffsr.evaluation.benchmark_cli import main

        job = submitit.JobEnvironment()  # task r takes share r; LOCAL_RANK picks the GPU
        os.environ.update(RANK=str(job.global_rank), WORLD_SIZE=str(job.num_tasks), LOCAL_RANK=str(job.local_rank))
        limit_threads(os.environ)
        code = main(self.argv)
        if code != 0:
            raise RuntimeError(f"benchmark {' '.join(self.argv)} exited with {code}")
        return code

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self)  # finished (checkpoint, set) pairs are not redone
