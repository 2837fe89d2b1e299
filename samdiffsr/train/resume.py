"""Where a run stands, and what a checkpoint carries beyond DeepSpeed's own state (the client state: step,
data position, EMA, loss scale, config): :func:`save` writes it, :func:`resume` reads it back.

A checkpoint continues only the same model and task; everything else may change on resume. When the world
size, micro batch or data workers changed, the data order cannot be continued exactly: the run continues
at the start of the next epoch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch.distributed as dist

from samdiffsr.config import Config, config_from_dict
from samdiffsr.models import save_weights
from samdiffsr.train import checkpoints
from samdiffsr.train.build import Trainer
from samdiffsr.train.collective import gather

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Where a run stands: the optimizer steps done and the data stream's position after them."""

    step: int = 0
    position: tuple[int, int] = (0, 0)  # (epoch, batches of it consumed)
    resumed_from: checkpoints.ResumePoint | None = None
    last_saved: int = -1  # the step of the newest checkpoint written or resumed from

    def describe(self) -> str:
        point = self.resumed_from
        return "fresh start" if point is None else f"resumed from {point.load_dir / point.tag} at step {self.step}"


def resume_points(setting: str, ckpt_dir: Path, rank: int) -> list[checkpoints.ResumePoint]:
    """Rank 0 decides which checkpoints to try; every rank gets the same answer (or the same error)."""
    decision: list[Any] = [[]]
    if rank == 0:
        try:
            decision[0] = checkpoints.resolve_resume(setting, ckpt_dir)
        except checkpoints.CheckpointError as exc:
            decision[0] = exc
    dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], Exception):
        raise checkpoints.CheckpointError(str(decision[0]))
    return decision[0]


def check_resumable(saved: dict[str, Any], cfg: Config) -> None:
    """A checkpoint continues only the same model and task; everything else may change on resume."""
    old = config_from_dict(saved)
    if old.model != cfg.model:
        diff = [k for k, v in cfg.model.__dict__.items() if getattr(old.model, k) != v]
        raise checkpoints.CheckpointError(f"the checkpoint was trained with other model settings: "
                                          f"{', '.join(f'model.{k}' for k in diff)}")
    if old.train.task != cfg.train.task:
        raise checkpoints.CheckpointError(f"the checkpoint is of task '{old.train.task}', not "
                                          f"'{cfg.train.task}'")


def stream_key(trainer: Trainer) -> list[int]:
    """What the data order depends on beyond the seed: world size, micro batch, data workers."""
    return [trainer.world_size, trainer.micro, trainer.cfg.data.workers]


def resume(trainer: Trainer, points: list[checkpoints.ResumePoint]) -> tuple[RunState, dict | None]:
    """Load the newest of ``points`` that loads (a corrupt one is skipped with a warning saying why).

    Restores the engine, the loss scale and the RNG states; returns the run's state and the saved EMA.
    """
    check_resumable(checkpoints.saved_config(points[0]), trainer.cfg)
    point, client, rng = checkpoints.load_newest(trainer.engine, points, trainer.rank, trainer.world_size, gather)
    run = RunState(step=client["step"], position=tuple(client["data_position"]), resumed_from=point,
                   last_saved=client["step"])
    trainer.update.load_state_dict(client.get("grad_scaler"))
    if rng is not None:
        checkpoints.restore_rng(rng, trainer.generator)
    else:
        log.warning("rank %d: no saved RNG state for this world size; the diffusion noise is reseeded", trainer.rank)
    if list(client["stream_key"]) != stream_key(trainer):
        log.warning("world size / micro batch / data.workers changed %s -> %s: the data order cannot be "
                    "continued exactly; resuming at the start of the next epoch", client["stream_key"],
                    stream_key(trainer))
        run.position = (run.position[0] + 1, 0)
    return run, client.get("ema")


def save(trainer: Trainer, ckpts: checkpoints.Checkpoints, run: RunState) -> None:
    """Collective: every rank writes its part of the checkpoint of step ``run.step``."""
    ema = trainer.ema
    client = {"step": run.step, "data_position": list(run.position), "ema": ema.state_dict() if ema else None,
              "config": trainer.cfg.to_dict(), "stream_key": stream_key(trainer),
              # DeepSpeed does not checkpoint the autocast GradScaler (fp16): the loss scale goes here.
              "grad_scaler": trainer.update.state_dict()}
    ckpts.save(trainer.engine, run.step, client, checkpoints.capture_rng(trainer.generator),
               partial(_write_weights, trainer, run.step), dist.barrier, trainer.world_size)
    run.last_saved = run.step


def _write_weights(trainer: Trainer, step: int, path: Path) -> None:
    """The plain weights file of a checkpoint (rank 0 writes it, once every rank's files are on disk)."""
    ema = trainer.ema
    save_weights(path, trainer.net, ema=ema.full_state(trainer.net) if ema else None, step=step,
                 config=trainer.cfg.to_dict())
