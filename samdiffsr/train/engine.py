"""Training: the command line and `train`, which reads top to bottom (build -> resume -> loop -> summary).

    python launcher/train.py --config configs/demo.yaml train.max_steps=20         # one process
    torchrun --nproc_per_node 2 launcher/train.py --config configs/demo.yaml        # data parallel
    deepspeed --num_gpus 2 launcher/train.py --config configs/demo.yaml             # (DS_ACCELERATOR=cpu on CPU)

The process group, stop requests, precision and non-finite steps are described in docs/training.md.
"""

from __future__ import annotations

import argparse
import signal
from collections.abc import Callable
from typing import Any

import torch

from samdiffsr.cli import EXIT_OK, EXIT_UNFINISHED, ArgumentParser, run_cli
from samdiffsr.config import Config, load_config
from samdiffsr.data.pairs import load_val_images
from samdiffsr.data.stream import TrainStream
from samdiffsr.train import checkpoints
from samdiffsr.train.build import build_ema, build_trainer
from samdiffsr.train.collective import agree, exit_process, init_distributed
from samdiffsr.train.logs import RunLog, train_log
from samdiffsr.train.loop import train_loop
from samdiffsr.train.resume import RunState, resume, resume_points
from samdiffsr.train.stop import EXIT_TERMINATED, STOP_SIGNALS, StopRequest


def train(cfg: Config, *, rank: int, world_size: int, device: torch.device,
          stop_requested: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train to ``train.max_steps`` or until ``stop_requested()`` on any rank; returns the summary."""
    settings = cfg.train
    ckpts = checkpoints.Checkpoints(settings.run_dir, settings.keep_last, settings.keep_every, rank)
    points = resume_points(settings.resume, ckpts.dir, rank)
    trainer = build_trainer(cfg, rank, world_size, device, load_rrdb=not points)
    run, saved_ema = resume(trainer, points) if points else (RunState(), None)
    trainer.ema = build_ema(trainer.net, settings.ema_decay, saved_ema, settings.ema_warmup_power, run.step)

    stream = TrainStream(cfg.data, batch_size=trainer.micro, scale=cfg.model.sr_scale, seed=settings.seed,
                         rank=rank, world_size=world_size, pin_memory=device.type == "cuda",
                         worker_ignores=STOP_SIGNALS)
    # Every rank its share of the held-out images (train/validation.py); one rank's unreadable image ends all.
    val_set = (agree(lambda: load_val_images(cfg.data.val_shards, cfg.data.val_images, cfg.model.sr_scale, rank,
                                             world_size))
               if cfg.data.val_shards and settings.val_every > 0 else None)
    runlog = RunLog(cfg, enabled=rank == 0, start_step=run.step, max_steps=settings.max_steps,
                    global_batch=trainer.micro * trainer.accum * world_size)
    runlog.message(f"{settings.task}: {run.describe()}; {world_size} rank(s) x micro batch {trainer.micro} x "
                   f"accumulation {trainer.accum}; run folder {settings.run_dir}")
    return train_loop(trainer, run, stream=stream, val_set=val_set, runlog=runlog, ckpts=ckpts,
                      stop_requested=stop_requested)


# --- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="train", description="Train SAM-DiffSR (task=diffusion) or its RRDB (task=rrdb).")
    parser.add_argument("--config", help="YAML config (configs/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="passed by the deepspeed launcher; the LOCAL_RANK variable is what is used")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, stop_requested: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train from a command line; returns a summary (final step, last loss, run_dir, counters).

    ``stop_requested`` (e.g. ``threading.Event.is_set``) is polled by every rank after each step; ``stopped``
    in the summary is true only when the run stopped before ``train.max_steps``.
    """
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    rank, world_size, device = init_distributed()
    with train_log(cfg.train.run_dir, enabled=rank == 0):
        return train(cfg, rank=rank, world_size=world_size, device=device, stop_requested=stop_requested)


def cli() -> int:
    """Console-script entry point: 0 on success; a user error is one line by rank 0 and exit 2 (samdiffsr.cli)."""
    return run_cli("train", train_until_signalled)


def process_main() -> None:
    """A training process's entry point (launcher/train.py, ``python -m samdiffsr.train``, samdiffsr-train):
    `cli`, then the process ends with its status (`samdiffsr.train.collective.exit_process` says why so)."""
    exit_process(cli())


def train_until_signalled() -> int:
    """`main` with SIGTERM / SIGUSR2 caught (samdiffsr/train/stop.py): every rank saves at the next step.

    Exit status after such a stop: 3 (not finished) after SIGUSR2, 143 after SIGTERM alone, as
    `samdiffsr.cluster.jobs.run_rank` under srun.
    """
    stop = StopRequest()
    with stop.catching(*STOP_SIGNALS):
        summary = main(stop_requested=stop)
    if not summary["stopped"]:
        return EXIT_OK
    return EXIT_TERMINATED if stop.received and signal.SIGUSR2 not in stop.received else EXIT_UNFINISHED
