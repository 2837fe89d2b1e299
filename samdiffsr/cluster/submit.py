"""The ``submit`` command (``launcher/submit.py``, ``samdiffsr-submit``): ``submit.py [COMMAND] ARGS``, where
COMMAND is train (the default), shards, benchmark, ablate or rank (see :mod:`samdiffsr.cluster.slurm`)."""

from __future__ import annotations

import sys

from samdiffsr.cli import run_cli
from samdiffsr.cluster.ablate import submit_ablate
from samdiffsr.cluster.jobs import run_rank
from samdiffsr.cluster.slurm import submit_benchmark, submit_shards, submit_train

SUBMITTERS = {"train": submit_train, "shards": submit_shards, "benchmark": submit_benchmark,
              "ablate": submit_ablate}
COMMANDS = (*SUBMITTERS, "rank")


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command (default: train). A user error is one line and exit 2, before anything is queued."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if command == "rank":
        return run_cli("train", lambda: run_rank(argv))
    return run_cli("submit", lambda: SUBMITTERS[command](argv))
