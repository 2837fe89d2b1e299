"""The ``submit`` command (``launcher/submit.py``, ``samdiffsr-submit``): ``submit.py [COMMAND] ARGS``, where
COMMAND is train (the default), shards, benchmark, ablate or rank (see :mod:`samdiffsr.cluster.slurm`)."""

from __future__ import annotations

import os
import sys

from submitit.core.utils import FailedJobError

from samdiffsr.cli import ArgumentParser, UserError, run_cli
from samdiffsr.cluster.ablate import submit_ablate
from samdiffsr.cluster.jobs import run_rank, slurm_distributed_env
from samdiffsr.cluster.slurm import NoSlurmError, submit_benchmark, submit_shards, submit_train

SUBMITTERS = {"train": submit_train, "shards": submit_shards, "benchmark": submit_benchmark,
              "ablate": submit_ablate}
COMMANDS = (*SUBMITTERS, "rank")


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command (default: train). A user error is one line and exit 2, before anything is queued."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if command == "rank":
        return run_cli("train", lambda: _rank(argv))
    return run_cli("submit", lambda: _submit(command, argv))


def _submit(command: str, argv: list[str]) -> int:
    try:
        return SUBMITTERS[command](argv)
    except FailedJobError as exc:  # sbatch ran and refused: its own error lines, joined
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise NoSlurmError(f"sbatch failed: {'; '.join(lines[-3:]) or 'no message'}") from None


def _rank(argv: list[str]) -> int:
    """``submit.py rank --config C [key=value ...]``: one training rank, run by srun inside an allocation."""
    if "-h" in argv or "--help" in argv:
        parser = ArgumentParser(prog="submit rank", description="One training rank inside a Slurm allocation "
                                "(srun python launcher/submit.py rank ...; slurm/train.sbatch does this): rank, "
                                "world size and master address come from the SLURM_* variables of the task.")
        parser.add_argument("--config", help="training config (configs/*.yaml)")
        parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        parser.parse_args(argv)
    try:  # outside srun: one line, not a traceback
        slurm_distributed_env(os.environ)
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    return run_rank(argv)
