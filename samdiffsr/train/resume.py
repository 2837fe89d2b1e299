"""Where a run stands, and what a checkpoint carries beyond DeepSpeed's own state (the client state: step,
data position, EMA, loss scale, config; Adam's state per parameter name): :func:`save` writes it,
:func:`resume` reads it back.

What may change on resume, key by key, is samdiffsr/train/contract.py (docs/training.md, "Resume: the
contract"). The same number of ranks and ZeRO stage resume through DeepSpeed's own files, bit for bit;
another number of ranks or stage loads the weights alone and sets Adam's state from ``optimizer_full.pt``.
When the number of ranks, the micro batch or a key the data order depends on changed, the data continue at
the start of the next epoch, so that no sample of the current epoch is seen twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch.distributed as dist

from samdiffsr.io import torch_load
from samdiffsr.models import save_weights
from samdiffsr.train import checkpoints, optimizer_state, rng
from samdiffsr.train.build import Trainer
from samdiffsr.train.collective import gather
from samdiffsr.train.contract import CONVERTED, ORDER_KEYS, changed_keys, contract_of

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


def stream_key(trainer: Trainer) -> list[int]:
    """What the data order depends on beyond the config: world size, micro batch (and data workers)."""
    return [trainer.world_size, trainer.micro, trainer.cfg.data.workers]


def trainable(trainer: Trainer) -> list[tuple[str, Any]]:
    """The trained parameters by name (the names of the weights file and of the EMA)."""
    return [(n, p) for n, p in trainer.net.named_parameters() if p.requires_grad]


def resume(trainer: Trainer, points: list[checkpoints.ResumePoint]) -> tuple[RunState, dict | None]:
    """Load the first of ``points`` that loads (a damaged one is skipped with a warning saying why).

    Restores the engine, Adam's state, the loss scale and the RNG states; returns the run's state and the
    saved EMA. A rollback (an explicit older checkpoint of this run folder) moves the newer ones aside.
    """
    try:
        _, changed = changed_keys(checkpoints.saved_config(points[0]), trainer.cfg)
    except ValueError as exc:
        raise checkpoints.CheckpointError(str(exc)) from None
    point, (client, saved_rng, converted) = checkpoints.load_newest(points, partial(_load_one, trainer),
                                                                    trainer.rank, gather)
    run = RunState(step=client["step"], position=tuple(client["data_position"]), resumed_from=point,
                   last_saved=client["step"])
    trainer.update.load_state_dict(client.get("grad_scaler"))  # None (not fp16 before): the initial scale
    optim = trainer.cfg.optim
    for group in trainer.engine.basic_optimizer.param_groups:  # the config's, not the checkpoint's
        group.update(betas=tuple(optim.betas), weight_decay=optim.weight_decay)
    if saved_rng is not None:
        rng.restore_rng(saved_rng, trainer.generator)
    else:  # another number of ranks: no saved state belongs to this rank
        rng.reseed(trainer.generator, trainer.cfg.train.seed, trainer.rank, run.step)
    order = _order_changes(client, trainer, changed)
    if order:
        run.position = (run.position[0] + 1, 0)
    if trainer.rank == 0:
        _report(converted, changed, order, reseeded=saved_rng is None)
        settings = trainer.cfg.train
        if settings.resume not in ("auto", "must", "never"):
            checkpoints.Checkpoints(settings.run_dir, settings.keep_last, settings.keep_every, 0).abandon_newer(point)
    return run, client.get("ema")


def _load_one(trainer: Trainer, point: checkpoints.ResumePoint) -> tuple[dict, dict | None, str | None]:
    """(client state, this rank's RNG state or None, the conversion done or None) of one checkpoint."""
    engine, tag_dir = trainer.engine, point.load_dir / point.tag
    meta = checkpoints.checkpoint_meta(point)
    saved = (meta.get("world_size"), meta.get("zero_stage", meta["config"]["train"]["zero_stage"]))
    now = (trainer.world_size, engine.zero_optimization_stage())
    converted = None
    if saved == now:  # DeepSpeed's own files: bit for bit
        client = checkpoints.load(engine, point)
        optimizer_state.match_param_layouts(engine.basic_optimizer)  # train.channels_last may have changed
    else:
        full_file = tag_dir / optimizer_state.FULL_STATE
        if not full_file.is_file():
            raise checkpoints.CheckpointError(
                f"checkpoint {tag_dir} was written on {saved[0]} rank(s) with ZeRO {saved[1]} and has no "
                f"{full_file.name} to resume on {now[0]} rank(s) with ZeRO {now[1]}: resume it on {saved[0]} "
                f"rank(s) with train.zero_stage={saved[1]} (its next checkpoint will have one)")
        full = torch_load(full_file, checkpoints.CheckpointError, "optimizer state file")
        client = checkpoints.load(engine, point, module_only=True)
        try:
            optimizer_state.set_full_state(engine, trainable(trainer), full)
        except (KeyError, RuntimeError) as exc:
            raise checkpoints.CheckpointError(f"cannot set the optimizer state of {full_file}: {exc}") from exc
        for key in ("global_steps", "global_samples", "skipped_steps"):  # DeepSpeed's counters
            if key in client:
                setattr(engine, key, client[key])
        converted = f"{saved[0]} rank(s) x ZeRO {saved[1]} -> {now[0]} rank(s) x ZeRO {now[1]}"
    return client, checkpoints.load_rng(point, trainer.rank, trainer.world_size), converted


def _order_changes(client: dict[str, Any], trainer: Trainer, changed: list[str]) -> list[str]:
    """What changed that the data order depends on (then the data continue at the next epoch)."""
    saved_world, saved_micro = list(client["stream_key"])[:2]
    reasons = [k for k in changed if k in ORDER_KEYS]
    if saved_world != trainer.world_size:
        reasons.append(f"ranks {saved_world} -> {trainer.world_size}")
    if saved_micro != trainer.micro:
        reasons.append(f"micro batch {saved_micro} -> {trainer.micro}")
    return reasons


def _report(converted: str | None, changed: list[str], order: list[str], reseeded: bool) -> None:
    """One line saying what the resume changed, when it changed anything."""
    parts = [f"optimizer state converted ({converted})"] if converted else []
    converting = [k for k in changed if contract_of(k)[0] == CONVERTED]
    if converting:
        parts.append(f"converted for the changed {', '.join(converting)}")
    if order:
        parts.append(f"the data continue at the start of the next epoch ({', '.join(order)} changed the order)")
    if reseeded:
        parts.append("the diffusion RNG is reseeded from (seed, rank, step)")
    if parts:
        log.warning("resume: %s (docs/training.md, 'Resume: the contract')", "; ".join(parts))


def save(trainer: Trainer, ckpts: checkpoints.Checkpoints, run: RunState) -> None:
    """Collective: every rank writes its part of the checkpoint of step ``run.step``."""
    ema, engine = trainer.ema, trainer.engine
    client = {"step": run.step, "data_position": list(run.position), "ema": ema.state_dict() if ema else None,
              "config": trainer.cfg.to_dict(), "stream_key": stream_key(trainer),
              # DeepSpeed does not checkpoint the autocast GradScaler (fp16): the loss scale goes here.
              "grad_scaler": trainer.update.state_dict()}
    # Adam's state by parameter name, for a resume on another number of ranks or ZeRO stage (rank 0 writes
    # it; under ZeRO 1/2 gathering it is a collective).
    full = (optimizer_state.full_state(engine, trainable(trainer), keep=trainer.rank == 0)
            if trainer.rank == 0 or engine.zero_optimization_stage() else None)
    ckpts.save(engine, run.step, client, rng.capture_rng(trainer.generator), partial(_write_weights, trainer, run.step),
               dist.barrier, trainer.world_size, {optimizer_state.FULL_STATE: full} if trainer.rank == 0 else {})
    run.last_saved = run.step


def _write_weights(trainer: Trainer, step: int, path: Path) -> None:
    """The plain weights file of a checkpoint (rank 0 writes it, once every rank's files are on disk)."""
    ema = trainer.ema
    save_weights(path, trainer.net, ema=ema.full_state(trainer.net) if ema else None, step=step,
                 config=trainer.cfg.to_dict())
