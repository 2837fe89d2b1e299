"""The training loop: steps until ``train.max_steps`` or a stop request, with logging, checkpoints and
validation on their schedules; then the summary.

A stop request is polled by every rank after each step and agreed on over a host-side group, so that all
ranks write the checkpoint of the same step and return.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from samdiffsr.data.stream import TrainStream
from samdiffsr.train.build import Trainer, autocast_dtype
from samdiffsr.train.checkpoints import Checkpoints, tag_for
from samdiffsr.train.collective import any_rank, gather, stop_group, weights_digest
from samdiffsr.train.logs import RunLog
from samdiffsr.train.nonfinite import NonFiniteSteps, rerun_advice
from samdiffsr.train.resume import RunState, save
from samdiffsr.train.schedule import lr_at
from samdiffsr.train.step import train_step
from samdiffsr.train.validation import ValSampler, validate

log = logging.getLogger(__name__)


@dataclass
class Logged:
    """What the last log interval reported, on every rank."""

    loss: float = float("nan")
    data_errors: dict[str, int] = field(default_factory=dict)


def train_loop(trainer: Trainer, run: RunState, *, stream: TrainStream, val_set: list[dict[str, Any]] | None,
               runlog: RunLog, ckpts: Checkpoints, stop_requested: Callable[[], bool] | None) -> dict[str, Any]:
    """Train from ``run`` on; returns the summary (also written as ``summary.json``)."""
    settings = trainer.cfg.train
    control = stop_group(stop_requested, trainer.world_size)
    batches = positioned_batches(stream, *run.position)
    nonfinite = NonFiniteSteps(trainer.device)
    logged = Logged(data_errors=dict(stream.counts))
    stopped, summary = False, None
    try:
        while run.step < settings.max_steps and not stopped:
            log_step = (run.step + 1) % settings.log_every == 0
            outcome = train_step(trainer, batches, with_grad_norm=log_step and settings.zero_stage == 0,
                                 step=run.step)
            nonfinite.count(run.step + 1, outcome.skipped)
            run.step, run.position = run.step + 1, outcome.position
            runlog.step(run.step, outcome.loss, outcome.skipped, outcome.data_wait)

            if stop_requested is not None:
                stopped = any_rank(bool(stop_requested()), control)
            checkpoint_now = run.step % settings.ckpt_every == 0 or run.step == settings.max_steps or stopped
            if run.step % settings.log_every == 0 or checkpoint_now:
                logged = end_log_interval(trainer, runlog, run.step, stream, nonfinite, outcome.grad_norm)
                nonfinite.check(run.step, settings.max_bad_steps, save=lambda: save_for_rerun(trainer, ckpts, run))
            paused = time.perf_counter()
            if checkpoint_now:
                save(trainer, ckpts, run)
            if val_set is not None and run.step % settings.val_every == 0:  # this rank's share (maybe empty)
                validate_weights(trainer, val_set, runlog, run.step)
            runlog.exclude(time.perf_counter() - paused)
        if run.last_saved != run.step:
            save(trainer, ckpts, run)
        summary = summarize(trainer, run, logged, nonfinite, stopped)
    finally:
        batches.close()  # shuts the DataLoader workers down
        runlog.close(summary)
    return summary


def positioned_batches(stream: TrainStream, epoch: int, index: int) -> Iterator[tuple[dict, tuple[int, int]]]:
    """Endless batches from position (epoch, index), each with the position just after it."""
    while True:
        if index >= stream.epoch_batches:
            epoch, index = epoch + 1, 0
        epoch_batches = stream.iter_epoch(epoch, skip_batches=index)
        try:
            for batch in epoch_batches:
                index += 1
                yield batch, (epoch, index)
        finally:  # closing this generator shuts the epoch's DataLoader workers down at once
            epoch_batches.close()
        epoch, index = epoch + 1, 0


def end_log_interval(trainer: Trainer, runlog: RunLog, step: int, stream: TrainStream, nonfinite: NonFiniteSteps,
                     grad_norm: torch.Tensor | None) -> Logged:
    """The host sync of a log interval: data-error counts summed over ranks, scalars to TensorBoard."""
    engine = trainer.engine
    errors = torch.tensor(list(stream.counts.values()), dtype=torch.float64, device=trainer.device)
    dist.all_reduce(errors)
    data_errors = {k: int(v) for k, v in zip(stream.counts, errors.tolist(), strict=True)}
    if grad_norm is None and engine.get_global_grad_norm() is not None:
        grad_norm = torch.as_tensor(engine.get_global_grad_norm())
    scalars = {"lr": lr_at(trainer.cfg.optim, step), "nonfinite_steps": float(nonfinite.total),
               "engine_skipped_steps": float(engine.skipped_steps)}
    scalars.update({f"data/{k}": float(v) for k, v in data_errors.items()})
    if grad_norm is not None:
        scalars["grad_norm"] = float(grad_norm)
    loss_scale = trainer.update.loss_scale()
    if loss_scale is not None:
        scalars["loss_scale"] = loss_scale
    return Logged(loss=runlog.flush(step, scalars)["loss"], data_errors=data_errors)


def save_for_rerun(trainer: Trainer, ckpts: Checkpoints, run: RunState) -> str:
    """Before a non-finite stop: a checkpoint of this step (skipped updates changed nothing, so its weights
    are the last good step's) and the advice naming it. Collective."""
    if run.last_saved != run.step:
        save(trainer, ckpts, run)
    return rerun_advice(trainer.cfg.optim.lr, trainer.cfg.train.resume, ckpts.dir / tag_for(run.step))


def validate_weights(trainer: Trainer, val_set: list[dict[str, Any]], runlog: RunLog, step: int) -> None:
    """Validate the averaged weights when there is an EMA (they are what gets deployed), else the weights."""
    net, ema, settings, model = trainer.net, trainer.ema, trainer.cfg.train, trainer.cfg.model
    if ema is not None:
        net = copy.deepcopy(net)
        net.load_state_dict(ema.full_state(trainer.net))
    sampler = ValSampler(settings.val_sampler, settings.val_steps, settings.val_eta)
    done = validate(net, settings.task, val_set, device=trainer.device, scale=model.sr_scale,
                    lr_up_divisor=model.lr_up_divisor, seed=settings.seed, crop=settings.val_crop, sampler=sampler,
                    autocast_dtype=autocast_dtype(settings.precision))
    runlog.validation(step, done.metrics, done.images)
    runlog.message(f"validation step {step}: {sum(done.per_rank)} held-out images, per rank "
                   + " ".join(str(n) for n in done.per_rank))


def summarize(trainer: Trainer, run: RunState, logged: Logged, nonfinite: NonFiniteSteps,
              stopped: bool) -> dict[str, Any]:
    """The run's summary; collective (the ranks' weights digests are compared)."""
    digests = gather(weights_digest(trainer.net))
    if len(set(digests)) != 1:
        log.error("the ranks hold different weights at the end of training: %s", digests)
    settings, point = trainer.cfg.train, run.resumed_from
    return {"step": run.step, "loss": logged.loss, "run_dir": str(settings.run_dir),
            "world_size": trainer.world_size,
            "stopped": stopped and run.step < settings.max_steps,  # a stop on the last step is just the end
            "resumed_from": str(point.load_dir / point.tag) if point else None,
            "nonfinite_steps": int(nonfinite.total), "data_errors": logged.data_errors,
            "engine_skipped_steps": int(trainer.engine.skipped_steps), "weights_sha256_per_rank": digests}
