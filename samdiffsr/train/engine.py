"""Training: a DeepSpeed engine built from our Config, and the loop. Read `train` top to bottom.

    python launcher/train.py --config configs/demo.yaml train.max_steps=20         # one process
    torchrun --nproc_per_node 2 launcher/train.py --config configs/demo.yaml        # data parallel
    deepspeed --num_gpus 2 launcher/train.py --config configs/demo.yaml             # (DS_ACCELERATOR=cpu on CPU)

The process group comes from the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) as
torchrun, the deepspeed launcher and the Slurm integration set it; without those variables, one process.
`main(argv, stop_requested=...)` is callable in-process; ``stop_requested`` (e.g. ``threading.Event.is_set``)
is polled by every rank after each step and agreed on with a host-side all-reduce, so a preemption signal on
one rank makes all ranks write a checkpoint at the same step boundary and return.

Precision: bf16 / fp16 use DeepSpeed's ``torch_autocast`` mode: parameters, optimizer state and the
diffusion schedule stay fp32, convolutions run in low precision, fp16 gets dynamic loss scaling. (DeepSpeed's
native ``bf16`` / ``fp16`` sections cast the whole module, schedule buffers included; they are refused.)

A step: ``grad_accum`` micro-batches of ``batch_size / (grad_accum * world)`` images per rank, one Adam update.
A non-finite loss on any rank skips the update on every rank without a host sync: the flag is all-reduced
on the device and handed to the fused Adam kernel as ``found_inf`` (the mechanism torch's GradScaler uses).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from samdiffsr.cli import EXIT_FAILED, EXIT_OK, EXIT_UNFINISHED, ArgumentParser, UserError, run_cli
from samdiffsr.config import Config, ConfigError, config_from_dict, deep_merge, load_config
from samdiffsr.data.stream import TrainStream, to_model_inputs
from samdiffsr.data.val import load_val_images
from samdiffsr.models import build_model, load_rrdb_weights, save_weights
from samdiffsr.train import checkpoints
from samdiffsr.train.ema import EMA
from samdiffsr.train.logs import RunLog
from samdiffsr.train.stop import EXIT_TERMINATED, STOP_SIGNALS, StopRequest
from samdiffsr.train.validation import validate

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(UserError, RuntimeError):
    """Too many optimizer steps in a row had a NaN/Inf loss: an expected failure, one line and exit 4."""

    exit_code = EXIT_FAILED


# --- configuration --------------------------------------------------------------------------------
def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: derived from ``train`` / ``optim``, then the ``deepspeed:`` section over it.

    ``deepspeed: path.json`` (stored as ``{"config_path": ...}``) reads a DeepSpeed JSON file first.
    """
    t, o = cfg.train, cfg.optim
    if t.batch_size % (t.grad_accum * world_size):
        raise ConfigError(f"config key 'train.batch_size': {t.batch_size} is not divisible by train.grad_accum "
                          f"x world size = {t.grad_accum} x {world_size}")
    derived: dict[str, Any] = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.batch_size // (t.grad_accum * world_size),
        "gradient_accumulation_steps": t.grad_accum,
        # Always explicit: DeepSpeed's default became 1.0, the paper clips at 10 (0 disables clipping).
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "wall_clock_breakdown": False,
    }
    if t.precision in AUTOCAST_DTYPES:
        derived["torch_autocast"] = {"enabled": True, "dtype": t.precision}
    user = dict(cfg.deepspeed)
    path = user.pop("config_path", None)
    if path:
        try:
            user = deep_merge(json.loads(Path(path).read_text()), user)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config key 'deepspeed': cannot read DeepSpeed JSON {path}: {exc}") from exc
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(f"config key 'deepspeed.{key}': the optimizer and its schedule come from the "
                              "'optim' section (fused torch Adam, which the NaN-step skip relies on)")
    for key in ("fp16", "bf16"):
        if isinstance(user.get(key), dict) and user[key].get("enabled"):
            raise ConfigError(f"config key 'deepspeed.{key}': use train.precision={key} instead (DeepSpeed's "
                              f"native {key} casts the diffusion schedule buffers to {key})")
    merged = deep_merge(derived, user)
    micro, accum = merged["train_micro_batch_size_per_gpu"], merged["gradient_accumulation_steps"]
    if merged["train_batch_size"] != micro * accum * world_size:
        raise ConfigError(f"config key 'deepspeed': train_batch_size {merged['train_batch_size']} != micro batch "
                          f"{micro} x gradient_accumulation_steps {accum} x world size {world_size}")
    return merged


def _check_resumable(saved: dict[str, Any], cfg: Config) -> None:
    """A checkpoint continues only the same model and task; everything else may change on resume."""
    old = config_from_dict(saved)
    if old.model != cfg.model:
        diff = [k for k, v in cfg.model.__dict__.items() if getattr(old.model, k) != v]
        raise checkpoints.CheckpointError(f"the checkpoint was trained with other model settings: "
                                          f"{', '.join(f'model.{k}' for k in diff)}")
    if old.train.task != cfg.train.task:
        raise checkpoints.CheckpointError(f"the checkpoint is of task '{old.train.task}', not "
                                          f"'{cfg.train.task}'")


# --- the model DeepSpeed wraps --------------------------------------------------------------------
class TrainingObjective(nn.Module):
    """The trained network with its loss as ``forward``, so that DeepSpeed's autocast covers it."""

    def __init__(self, net: nn.Module, task: str) -> None:
        super().__init__()
        self.net, self.task = net, task

    def forward(self, img_hr: torch.Tensor, img_lr: torch.Tensor, img_lr_up: torch.Tensor,
                mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.task == "rrdb":  # RRDB pretraining: L1 of rrdb(LR) against HR
            return F.l1_loss(self.net(img_lr).float(), img_hr)
        return self.net.training_loss(img_hr, img_lr, img_lr_up, mask, generator=generator).float()


def build_network(cfg: Config, load_rrdb: bool) -> nn.Module:
    """The network to train: RRDBNet alone (task=rrdb) or the diffusion model with its RRDB.

    A frozen RRDB is loaded from ``train.rrdb_ckpt`` on a fresh start; on resume the checkpoint holds it.
    """
    model = build_model(cfg.model)
    t = cfg.train
    if t.task == "rrdb":
        return model.rrdb
    if t.freeze_rrdb and not t.rrdb_ckpt and load_rrdb:
        raise ConfigError("config key 'train.rrdb_ckpt': a frozen RRDB (train.freeze_rrdb=true) needs "
                          "pretrained weights (run the rrdb task first, or give the authors' checkpoint)")
    if t.rrdb_ckpt and load_rrdb:
        load_rrdb_weights(model.rrdb, t.rrdb_ckpt)  # strict; WeightsError names the file or key
    if t.freeze_rrdb:
        model.rrdb.requires_grad_(False)  # excluded from the optimizer below
    return model


# --- distributed set-up ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group unless it already exists.

    The group then lives as long as the process: DeepSpeed caches process groups in module globals, so a
    destroyed and re-created group would leave it holding stale ones. Later in-process calls reuse it.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if not dist.is_initialized():
        if {"RANK", "WORLD_SIZE"} <= os.environ.keys():  # torchrun, the deepspeed launcher, Slurm
            deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False)
        else:  # plain `python`: a group of one
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it from the environment
            deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False,
                                       init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def _seed_for(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)


def _broadcast_resume(setting: str, ckpt_dir: Path, rank: int) -> list[checkpoints.ResumePoint]:
    """Rank 0 decides which checkpoints to try; every rank gets the same answer (or the same error)."""
    box: list[Any] = [[]]
    if rank == 0:
        try:
            box[0] = checkpoints.resolve_resume(setting, ckpt_dir)
        except checkpoints.CheckpointError as exc:
            box[0] = exc
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise checkpoints.CheckpointError(str(box[0]))
    return box[0]


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, on every rank."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _positioned_batches(stream: TrainStream, epoch: int, index: int) -> Iterator[tuple[dict, tuple[int, int]]]:
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


# --- the run --------------------------------------------------------------------------------------
def train(cfg: Config, *, rank: int, world_size: int, device: torch.device,
          stop_requested: Callable[[], bool] | None = None) -> dict[str, Any]:
    import deepspeed

    t, m = cfg.train, cfg.model
    ckpts = checkpoints.Checkpoints(t.run_dir, t.keep_last, t.keep_every, rank)
    resume_points = _broadcast_resume(t.resume, ckpts.dir, rank)

    # Model, optimizer, schedule. The same seed on every rank (and in any world size) gives the same
    # initial weights, so a 2-rank run and a 1-process run start from the same point.
    torch.manual_seed(t.seed)
    net = build_network(cfg, load_rrdb=not resume_points)
    objective = TrainingObjective(net, t.task).to(device)
    if t.compile:  # in place: parameter names (and so checkpoints) stay the same
        (net if t.task == "rrdb" else net.denoise_fn).compile()
    trainable = [p for p in objective.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.Adam(trainable, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, fused=True)
    # The paper's step decay, lr * gamma ** (step // decay_steps); DeepSpeed steps and checkpoints it.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: o.decay_gamma ** (s // o.decay_steps))
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world_size), dist_init_required=False)
    if t.channels_last and t.zero_stage == 0:
        # Only now: DeepSpeed's initial broadcast views each parameter as bytes (default layout only), and
        # under ZeRO 1/2 parameters are views into flat buffers that must stay so; the inputs go
        # channels_last in any case, which is what selects the channels-last convolution kernels.
        objective.to(memory_format=torch.channels_last)
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    scaler = engine.torch_autocast_z0_gradscaler or getattr(engine.optimizer, "torch_autocast_gradscaler", None)
    # The diffusion's t / noise draws: a generator per rank, saved and restored with the checkpoint.
    generator = torch.Generator(device).manual_seed(_seed_for(t.seed, rank, 1))

    step, position, saved_ema, runlog_note, resume = 0, (0, 0), None, "fresh start", None
    if resume_points:
        _check_resumable(checkpoints.saved_config(resume_points[0]), cfg)
        # The newest checkpoint that loads; a corrupt one is skipped with a warning saying why.
        resume, client, rng = checkpoints.load_newest(engine, resume_points, rank, world_size, _gather)
        step, position, saved_ema = client["step"], tuple(client["data_position"]), client.get("ema")
        if scaler is not None and client.get("grad_scaler"):
            scaler.load_state_dict(client["grad_scaler"])
        runlog_note = f"resumed from {resume.load_dir / resume.tag} at step {step}"
        if rng is not None:
            checkpoints.restore_rng(rng, generator)
        else:
            log.warning("rank %d: no saved RNG state for this world size; the diffusion noise is reseeded", rank)
        stream_key = [world_size, micro, cfg.data.workers]
        if list(client["stream_key"]) != stream_key:
            log.warning("world size / micro batch / data.workers changed %s -> %s: the data order cannot be "
                        "continued exactly; resuming at the start of the next epoch", client["stream_key"],
                        stream_key)
            position = (position[0] + 1, 0)
    ema = EMA(net, t.ema_decay) if t.ema_decay > 0 else None  # after loading: it starts from those weights
    if ema is not None and saved_ema:
        ema.load_state_dict(saved_ema)

    stream = TrainStream(cfg.data, batch_size=micro, scale=m.sr_scale, seed=t.seed, rank=rank,
                         world_size=world_size, pin_memory=device.type == "cuda", worker_ignores=STOP_SIGNALS)
    batches = _positioned_batches(stream, *position)
    val_set = (load_val_images(cfg.data.val_shards, cfg.data.val_images, m.sr_scale)
               if rank == 0 and cfg.data.val_shards and t.val_every > 0 else [])
    runlog = RunLog(cfg, enabled=rank == 0, start_step=step, max_steps=t.max_steps,
                    global_batch=micro * accum * world_size)
    runlog.message(f"{cfg.train.task}: {runlog_note}; {world_size} rank(s) x micro batch {micro} x accumulation "
                   f"{accum}; run folder {t.run_dir}")
    # Host-side agreement on the stop request: a gloo all-reduce, which never waits for the GPU.
    control = dist.new_group(backend="gloo") if stop_requested is not None and world_size > 1 else None

    def save() -> None:
        client = {"step": step, "data_position": list(position), "ema": ema.state_dict() if ema else None,
                  "config": cfg.to_dict(), "stream_key": [world_size, micro, cfg.data.workers],
                  # DeepSpeed does not checkpoint the autocast GradScaler (fp16): the loss scale goes here.
                  "grad_scaler": scaler.state_dict() if scaler is not None else None}

        def write_weights(path: Path) -> None:
            save_weights(path, net, ema=ema.full_state(net) if ema else None, step=step, config=cfg.to_dict())

        ckpts.save(engine, step, client, checkpoints.capture_rng(generator), write_weights, dist.barrier,
                   world_size)

    # Device-side counters, read at log intervals only: non-finite steps in total and in a row.
    bad_total = torch.zeros((), dtype=torch.long, device=device)
    bad_run = torch.zeros_like(bad_total)
    bad_run_max = torch.zeros_like(bad_total)
    bad_run_end = torch.zeros_like(bad_total)  # the step that ended the longest run of this log interval
    last_saved = step if resume is not None else -1
    host: dict[str, Any] = {"loss": float("nan"), "data_errors": dict(stream.counts)}
    stopped, summary = False, None
    try:
        while step < t.max_steps and not stopped:
            stats = torch.zeros(2, device=device)  # [sum of micro-batch losses, non-finite micro-batches]
            data_wait = 0.0
            for micro_step in range(accum):
                t0 = time.perf_counter()
                batch, position = next(batches)
                data_wait += time.perf_counter() - t0
                inputs = to_model_inputs(batch, device, m.sr_scale, m.lr_up_divisor, t.channels_last)
                loss = engine(**inputs, generator=generator)
                stats += torch.stack([loss.detach(), (~torch.isfinite(loss.detach())).float()])
                engine.backward(loss)
                if micro_step < accum - 1:
                    engine.step()  # DeepSpeed counts micro-steps here; it updates only at the boundary
            dist.all_reduce(stats)  # every rank now agrees on the skip decision and the logged loss
            skipped = stats[1] > 0
            grad_norm = (_grad_norm(trainable, scaler)
                         if (step + 1) % t.log_every == 0 and t.zero_stage == 0 else None)
            if scaler is None:  # (under fp16 the GradScaler sets found_inf itself, from the gradients)
                engine.basic_optimizer.found_inf = skipped.float()
            scale_before = scaler._scale.clone() if scaler is not None else None
            if not engine.is_gradient_accumulation_boundary():
                raise RuntimeError("DeepSpeed's micro-step count is out of step with the loop")
            engine.step()  # the boundary: gradients are reduced, clipped and applied (unless found_inf)
            applied = ~skipped
            if scaler is not None:  # a backed-off loss scale means the scaler skipped the update
                applied &= scaler._scale.reshape(()) >= scale_before.reshape(())
            if not engine.was_step_applied():  # DeepSpeed's own skip (ZeRO 1/2 on NaN gradients)
                applied = torch.zeros_like(applied)
            if ema is not None:
                ema.update((1.0 - ema.decay) * applied.float())
            bad_run = (bad_run + 1) * skipped
            bad_run_end = torch.where(bad_run > bad_run_max, step + 1, bad_run_end)
            bad_run_max = torch.maximum(bad_run_max, bad_run)
            bad_total += skipped
            step += 1
            runlog.step(step, stats[0] / (accum * world_size), skipped, data_wait)

            if stop_requested is not None:
                stopped = _agree(bool(stop_requested()), control)
            checkpoint_now = step % t.ckpt_every == 0 or step == t.max_steps or stopped
            if step % t.log_every == 0 or checkpoint_now:
                host = _flush(runlog, step, engine, stream, bad_total, grad_norm, scaler, device)
                if int(bad_run_max) >= t.max_bad_steps:
                    n, end = int(bad_run_max), int(bad_run_end)
                    raise NonFiniteLossError(
                        f"{n} optimizer steps in a row had a NaN/Inf loss (steps {end - n + 1} to {end}; limit "
                        f"train.max_bad_steps={t.max_bad_steps}); those updates were skipped, the weights are "
                        "those of the last good step. Lower optim.lr or check the data, then rerun to resume from the "
                        "last checkpoint.")
                bad_run_max, bad_run_end = bad_run.clone(), torch.full_like(bad_run_end, step)
            t0 = time.perf_counter()
            if checkpoint_now:
                save()
                last_saved = step
            if val_set and step % t.val_every == 0:
                val_net = net
                if ema is not None:  # validate the averaged weights, which are what gets deployed
                    val_net = copy.deepcopy(net)
                    val_net.load_state_dict(ema.full_state(net))
                metrics, images = validate(val_net, t.task, val_set, device=device, scale=m.sr_scale,
                                           lr_up_divisor=m.lr_up_divisor, seed=t.seed, crop=t.val_crop,
                                           steps=t.val_steps, autocast_dtype=AUTOCAST_DTYPES.get(t.precision))
                runlog.validation(step, metrics, images)
            runlog.exclude(time.perf_counter() - t0)
        if last_saved != step:
            save()
        digests: list[Any] = [None] * world_size
        dist.all_gather_object(digests, _weights_digest(net))
        if len(set(digests)) != 1:
            log.error("the ranks hold different weights at the end of training: %s", digests)
        summary = {"step": step, "loss": host["loss"], "run_dir": str(t.run_dir), "world_size": world_size,
                   "stopped": stopped and step < t.max_steps,  # a stop on the last step is just the end
                   "resumed_from": str(resume.load_dir / resume.tag) if resume else None,
                   "nonfinite_steps": int(bad_total), "data_errors": host["data_errors"],
                   "engine_skipped_steps": int(engine.skipped_steps), "weights_sha256_per_rank": digests}
    finally:
        batches.close()  # shuts the DataLoader workers down
        runlog.close(summary)
    return summary


def _weights_digest(net: nn.Module) -> str:
    """SHA-256 of the parameters' bytes: equal on all ranks unless data parallelism went wrong."""
    h = hashlib.sha256()
    for p in net.parameters():
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _grad_norm(params: list[torch.Tensor], scaler: Any) -> torch.Tensor:
    """Global gradient 2-norm before clipping (ZeRO 0: every rank holds the all-reduced gradients)."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(norms))
    return norm / scaler._scale.reshape(()) if scaler is not None else norm


def _agree(flag: bool, group: Any) -> bool:
    """True on every rank when it is True on any rank."""
    if group is None:
        return flag
    box = torch.tensor([int(flag)])
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=group)
    return bool(box.item())  # a CPU tensor on a gloo group: no device sync


def _flush(runlog: RunLog, step: int, engine: Any, stream: TrainStream, bad_total: torch.Tensor,
           grad_norm: torch.Tensor | None, scaler: Any, device: torch.device) -> dict[str, Any]:
    """The host sync of a log interval: data-error counts summed over ranks, scalars to TensorBoard."""
    errors = torch.tensor(list(stream.counts.values()), dtype=torch.float64, device=device)
    dist.all_reduce(errors)
    data_errors = {k: int(v) for k, v in zip(stream.counts, errors.tolist(), strict=True)}
    if grad_norm is None and engine.get_global_grad_norm() is not None:
        grad_norm = torch.as_tensor(engine.get_global_grad_norm())
    scalars = {"lr": engine.get_lr()[0], "nonfinite_steps": float(bad_total),
               "engine_skipped_steps": float(engine.skipped_steps)}
    scalars.update({f"data/{k}": float(v) for k, v in data_errors.items()})
    if grad_norm is not None:
        scalars["grad_norm"] = float(grad_norm)
    if scaler is not None:
        scalars["loss_scale"] = float(scaler.get_scale())
    out = runlog.flush(step, scalars)
    return {"loss": out["loss"], "data_errors": data_errors}


# --- command line ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="train", description="Train SAM-DiffSR (task=diffusion) or its RRDB (task=rrdb).")
    parser.add_argument("--config", help="YAML config (configs/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="passed by the deepspeed launcher; the LOCAL_RANK variable is what is used")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=10")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, stop_requested: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train from a command line; returns a summary (final step, last loss, run_dir, counters)."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    rank, world_size, device = init_distributed()
    return train(cfg, rank=rank, world_size=world_size, device=device, stop_requested=stop_requested)


def cli() -> int:
    """Console-script entry point: 0 on success; a user error is one line by rank 0 and exit 2 (samdiffsr.cli)."""
    return run_cli("train", train_until_signalled)


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
