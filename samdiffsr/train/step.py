"""One optimizer step: ``grad_accum`` micro-batches of ``batch_size / (grad_accum * world)`` images per rank
forward and backward, then one Adam update at the schedule's lr (skipped on every rank after a non-finite
loss on any, or an fp16 overflow) and the EMA. Per-step values stay on the device."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from samdiffsr.models.inputs import to_model_inputs
from samdiffsr.train.build import Trainer
from samdiffsr.train.schedule import lr_at


@dataclass
class StepOutcome:
    loss: torch.Tensor  # mean over the micro-batches of all ranks (0-d, on the device)
    # The update was not applied (0-d bool, on the device): a non-finite loss on some rank, an fp16 overflow
    # (the loss scale backed off) or DeepSpeed's own skip on non-finite gradients.
    skipped: torch.Tensor
    grad_norm: torch.Tensor | None  # the global norm before clipping, unscaled, when asked for (ZeRO 0)
    data_wait: float  # seconds this rank waited for its batches
    position: tuple[int, int]  # the data position after the step's last batch


def train_step(trainer: Trainer, batches: Iterator[tuple[dict, tuple[int, int]]], with_grad_norm: bool,
               step: int) -> StepOutcome:
    """Forward and backward over ``trainer.accum`` micro-batches from ``batches``, then the update at the lr
    of the step after ``step`` completed ones (skipped steps count: train/schedule.py)."""
    engine, model = trainer.engine, trainer.cfg.model
    stats = torch.zeros(2, device=trainer.device)  # [sum of micro-batch losses, non-finite micro-batches]
    data_wait = 0.0
    for micro_step in range(trainer.accum):
        started = time.perf_counter()
        batch, position = next(batches)
        data_wait += time.perf_counter() - started
        inputs = to_model_inputs(batch, trainer.device, model.sr_scale, model.lr_up_divisor,
                                 trainer.cfg.train.channels_last)
        loss = engine(**inputs, generator=trainer.generator)
        stats += torch.stack([loss.detach(), (~torch.isfinite(loss.detach())).float()])
        engine.backward(loss)
        if micro_step < trainer.accum - 1:
            engine.step()  # DeepSpeed counts micro-steps here; it updates only at the boundary
    dist.all_reduce(stats)  # every rank now agrees on the skip decision and the logged loss
    grad_norm = trainer.update.grad_norm(trainer.trainable) if with_grad_norm else None
    applied = trainer.update.step(stats[1] > 0, lr_at(trainer.cfg.optim, step))
    if trainer.ema is not None:
        trainer.ema.step(applied)  # decay (or its warm-up), nothing when the update was skipped
    return StepOutcome(loss=stats[0] / (trainer.accum * trainer.world_size), skipped=~applied, grad_norm=grad_norm,
                       data_wait=data_wait, position=position)
