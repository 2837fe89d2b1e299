"""Start a training run on this machine under the DeepSpeed launcher, with N data-parallel ranks (GPUs, or
CPU processes on gloo when there is no GPU); skip runs that already reached ``train.max_steps``.

The ranks run ``python -m samdiffsr.train`` (the runner's ``--module``), not a script of the repository, so
this works from a plain wheel install as well as from a checkout; they start in the caller's working folder,
where relative paths in the config and overrides are meant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from samdiffsr.config import load_config
from samdiffsr.distributed import free_port

TRAIN_MODULE = "samdiffsr.train"  # samdiffsr/train/__main__.py: launcher/train.py without the repository


def finished(config: str | os.PathLike, overrides: list[str], run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that already reached the config's ``train.max_steps`` (not stopped)."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("step", -1) >= load_config(config, overrides).train.max_steps and not summary.get("stopped")


def launch_training(config: str | os.PathLike, overrides: list[str], ranks: int, run_dir: Path) -> int:
    """Train into ``run_dir`` with ``ranks`` processes; returns the launcher's exit status (0 if finished)."""
    overrides = [*overrides, f"train.run_dir={run_dir}"]
    if finished(config, overrides, run_dir):
        print(f"{run_dir}: already trained to train.max_steps, not launched again", flush=True)
        return 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    gpus = torch.cuda.device_count()
    if gpus == 0:
        # CPU ranks: DeepSpeed's CPU accelerator + gloo; one thread per rank so the ranks don't fight.
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    else:
        ranks = min(ranks, gpus)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes", "1", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), "--module", TRAIN_MODULE, "--config", str(config), *overrides]
    print("$ " + " ".join(cmd[2:]), flush=True)
    return subprocess.run(cmd, env=env).returncode
