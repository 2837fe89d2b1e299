"""The training-configuration matrix: the real engine path and a plain single-process PyTorch reference.

A case is (precision, ZeRO stage, grad_accum, ranks). Both sides train the tiny SAM-DiffSR (tests/train_helpers.py
TINY, frozen random RRDB) for a few optimizer steps on the same fixed global batches:

- :func:`engine_run` is one rank of the real path: ``build_trainer`` (DeepSpeed engine, fused Adam, the
  GradScaler of fp16) and ``train_loop`` (step, skip, schedule, logging, max_bad_steps, the final checkpoint),
  fed by :class:`FixedStream` instead of the shard stream, so that the reference sees the identical batches.
- :func:`reference_run` is what those settings mean, written without DeepSpeed: per step the mean of the
  micro-batch losses over ranks and accumulation, autocast in the same dtype (torch's GradScaler for fp16),
  ``clip_grad_norm_`` on the true gradients, torch Adam, the step-decay lr. Each rank's diffusion draws (t,
  noise) come from that rank's generator (seeded as build.py does), so the reference replays them: rank r's
  generator draws for r's micro-batches in micro-step order.

Micro-batch (micro step m, rank r) of a global batch of B images is images [(m R + r) b, (m R + r + 1) b) with
b = B / (A R). bench/gpu_matrix.py runs the same functions on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from train_helpers import REPO, SCALE, TINY

from samdiffsr.config import Config, load_config
from samdiffsr.distributed import derive_seed
from samdiffsr.imresize import imresize
from samdiffsr.models import build_model, load_rrdb_weights
from samdiffsr.models.inputs import to_model_inputs

PRECISIONS, STAGES, ACCUMS, RANKS = ("fp32", "bf16", "fp16"), (0, 1, 2), (1, 3), (1, 2)
STEPS, GLOBAL_BATCH, PATCH = 3, 6, 32  # 6 = 1 x 6 = 2 x 3 = 3 x 2 = 3 x 2 x 1: every (accum, ranks) divides it
LR, GAMMA, DECAY_STEPS = 1e-3, 0.5, 2  # the lr halves after update 2: a boundary inside the 3 steps
# Low enough that every step clips (the tiny model's true gradient norm is ~0.08-0.1 on these batches), so a wrong
# norm (e.g. one of the loss-scaled gradients) changes the update, not only the log.
CLIP = 0.05
# Injected through the mask of a whole global batch: 3e38 is finite (float32) but the modulated noise overflows,
# so the loss is Inf/NaN in any precision; 1e4 keeps the fp32 loss finite (~1800) while the fp16 backward
# overflows at the loss scale 65536 (measured: 1e2 does not, 1e3 to 1e5 do): a gradient-only overflow.
NAN_MASK, FP16_OVERFLOW_MASK = 3e38, 1e4


def case_name(case: tuple[str, int, int, int]) -> str:
    precision, zero, accum, ranks = case
    return f"{precision}-zero{zero}-accum{accum}-ranks{ranks}"


def case_overrides(case: tuple[str, int, int, int], rrdb: str, *extra: str) -> list[str]:
    precision, zero, accum, _ = case
    return [*TINY, "data.val_shards=", f"train.rrdb_ckpt={rrdb}", f"train.precision={precision}",
            f"train.zero_stage={zero}", f"train.grad_accum={accum}", f"train.batch_size={GLOBAL_BATCH}",
            f"data.patch_size={PATCH}", f"optim.lr={LR}", f"optim.decay_gamma={GAMMA}",
            f"optim.decay_steps={DECAY_STEPS}", f"optim.grad_clip={CLIP}", "train.log_every=1",
            f"train.max_steps={STEPS}", "train.ckpt_every=1000", "train.ema_decay=0.0",
            # The reference trains the paper's objective (uniform t, unweighted loss), whatever demo.yaml turns on.
            "train.timestep_sampling=uniform", "train.snr_gamma=0", "optim.warmup_steps=0", *extra]


def case_config(case: tuple[str, int, int, int], rrdb: str, *extra: str) -> Config:
    """The config of ``case`` (config validation runs here: a refused case raises ConfigError)."""
    return load_config(REPO / "configs" / "demo.yaml", case_overrides(case, rrdb, *extra))


def make_batches(steps: int = STEPS, mask_values: dict[int, float] | None = None, seed: int = 0) -> list[dict]:
    """``steps`` global batches as the stream collates them (uint8 HR / LR, float mask B x 1 x H x W).

    ``mask_values``: step index -> a constant mask for that whole global batch (NaN/overflow injection).
    """
    rng = np.random.default_rng(seed)
    out = []
    for k in range(steps):
        hrs = [imresize(rng.integers(0, 256, (PATCH // 8, PATCH // 8, 3)).astype(np.uint8), output_shape=(PATCH, PATCH))
               for _ in range(GLOBAL_BATCH)]
        hr = torch.from_numpy(np.stack(hrs)).permute(0, 3, 1, 2).contiguous()
        lr = torch.from_numpy(np.stack([imresize(h, 1 / SCALE) for h in hrs])).permute(0, 3, 1, 2).contiguous()
        mask = torch.from_numpy(rng.choice([0.0, 0.3, -0.2], (GLOBAL_BATCH, 1, PATCH, PATCH)).astype(np.float32))
        if mask_values and k in mask_values:
            mask = torch.full_like(mask, mask_values[k])
        out.append({"hr": hr, "lr": lr, "mask": mask})
    return out


def micro_batch(batch: dict, micro_step: int, rank: int, accum: int, ranks: int) -> dict:
    b = GLOBAL_BATCH // (accum * ranks)
    start = (micro_step * ranks + rank) * b
    return {k: v[start:start + b] for k, v in batch.items()}


def rank_generator(cfg: Config, rank: int, device: torch.device) -> torch.Generator:
    """Rank ``rank``'s diffusion generator, seeded as samdiffsr/train/build.py seeds it."""
    return torch.Generator(device).manual_seed(derive_seed(cfg.train.seed, rank, 1) >> 1)


# --- the reference ---------------------------------------------------------------------------------------
def reference_run(cfg: Config, ranks: int, batches: list[dict], device: torch.device) -> dict[str, Any]:
    """Plain PyTorch: the values of each step and the final trained weights (see the module docstring)."""
    settings, optim = cfg.train, cfg.optim
    torch.manual_seed(settings.seed)  # the engine builds from the same seed: the same initial weights
    model = build_model(cfg.model)
    load_rrdb_weights(model.rrdb, settings.rrdb_ckpt)
    model.rrdb.requires_grad_(False)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    initial = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[settings.precision]
    scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
    gens = [rank_generator(cfg, r, device) for r in range(ranks)]
    accum = settings.grad_accum
    out: dict[str, Any] = {k: [] for k in ("loss", "lr", "lr_next", "grad_norm", "skipped", "loss_scale")}
    for k, batch in enumerate(batches):
        lr = optim.lr * optim.decay_gamma ** (k // optim.decay_steps)  # the lr of update k + 1
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        losses = []
        for m in range(accum):
            for r in range(ranks):
                inputs = to_model_inputs(micro_batch(batch, m, r, accum, ranks), device, cfg.model.sr_scale,
                                         cfg.model.lr_up_divisor)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = model.training_loss(**inputs, generator=gens[r]).float()
                losses.append(loss.detach())
                mean_part = loss / (accum * ranks)  # the loss of the step is the mean over micro-batches
                (scaler.scale(mean_part) if scaler else mean_part).backward()
        loss = torch.stack(losses).mean()
        if scaler is not None:
            scaler.unscale_(opt)
        # The true (unscaled) global norm before clipping; clipping acts on it.
        norm = torch.nn.utils.clip_grad_norm_(params, optim.grad_clip) if optim.grad_clip > 0 else \
            torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params]))
        skipped = not (math.isfinite(float(loss)) and math.isfinite(float(norm)))
        if scaler is not None:
            scaler.step(opt)  # skips the update on non-finite gradients
            scaler.update()  # halves the scale after an overflow
            out["loss_scale"].append(float(scaler.get_scale()))
        elif not skipped:
            opt.step()
        out["loss"].append(float(loss))
        out["lr"].append(lr)
        out["lr_next"].append(optim.lr * optim.decay_gamma ** ((k + 1) // optim.decay_steps))
        out["grad_norm"].append(float(norm))
        out["skipped"].append(skipped)
    out["weights"] = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    out["initial"] = initial
    return out


def differences(engine: dict, ref: dict, skip: tuple[int, ...] = ()) -> dict[str, float]:
    """The largest differences of the engine from the reference: loss and grad_norm (relative, per step, skipped
    steps left out), the weight updates (relative L2: |engine - reference| / |reference - initial| over all
    trained weights) and the weights (max abs)."""
    kept = [k for k in range(len(ref["loss"])) if k not in skip]
    moved = {n: ref["weights"][n] - ref["initial"][n] for n in ref["weights"]}
    gap = {n: engine["weights"][n] - ref["weights"][n] for n in ref["weights"]}

    def relative(a: float, b: float) -> float:
        return abs(a - b) / abs(b)

    def norm(tensors: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))

    return {"loss": max(relative(engine["loss"][k], ref["loss"][k]) for k in kept),
            "grad_norm": max(relative(engine["grad_norm"][k], ref["grad_norm"][k]) for k in kept),
            "update": norm(gap) / norm(moved),
            "weights_max_abs": max(float(t.abs().max()) for t in gap.values())}


# --- the engine ------------------------------------------------------------------------------------------
class FixedStream:
    """What ``train_loop`` reads from ``TrainStream``, serving this rank's micro-batches of fixed global batches."""

    def __init__(self, batches: list[dict], rank: int, accum: int, ranks: int) -> None:
        self.micro = [micro_batch(b, m, rank, accum, ranks) for b in batches for m in range(accum)]
        self.epoch_batches = len(self.micro)
        self.counts: dict[str, int] = {}

    def iter_epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        if epoch > 0:
            raise AssertionError("the matrix run read past its fixed batches")
        yield from self.micro[skip_batches:]


def engine_run(cfg: Config, rank: int, world_size: int, batches: list[dict], device: torch.device,
               run_dir: str) -> dict[str, Any]:
    """One rank of the real engine on ``batches``: per step the loss, skip, lr, grad_norm and loss scale the loop
    logs; the final trained weights; ``error``, the one-line message of a run that stopped with a user error.
    ``run_dir``: the run folder (the same on every rank; the loop writes its final checkpoint there)."""
    from samdiffsr.cli import UserError
    from samdiffsr.train.build import build_trainer
    from samdiffsr.train.checkpoints import Checkpoints
    from samdiffsr.train.logs import RunLog
    from samdiffsr.train.loop import train_loop
    from samdiffsr.train.resume import RunState

    class RecordingLog(RunLog):
        """The loop's log, recording what it is handed (rank 0 writes nothing: no TensorBoard to read back)."""

        def step(self, step: int, loss: torch.Tensor, skipped: torch.Tensor, data_wait: float) -> None:
            record["loss"].append(float(loss))
            record["skipped"].append(bool(skipped))
            super().step(step, loss, skipped, data_wait)

        def flush(self, step: int, scalars: dict[str, float]) -> dict[str, float]:
            record["scalars"].append({"step": step, **scalars})
            return super().flush(step, scalars)

    record: dict[str, Any] = {"loss": [], "skipped": [], "scalars": [], "error": None}
    cfg = replace(cfg, train=replace(cfg.train, run_dir=run_dir))
    trainer = build_trainer(cfg, rank, world_size, device, load_rrdb=True)
    stream = FixedStream(batches, rank, trainer.accum, world_size)
    runlog = RecordingLog(cfg, enabled=False, start_step=0, max_steps=cfg.train.max_steps, global_batch=GLOBAL_BATCH)
    try:
        train_loop(trainer, RunState(), stream=stream, val_set=None, runlog=runlog,
                   ckpts=Checkpoints(run_dir, 1, 0, rank), stop_requested=None)
    except UserError as exc:
        record["error"] = str(exc)
    scalars = {s["step"]: s for s in record.pop("scalars")}
    steps = sorted(scalars)
    record.update({key: [scalars[s].get(key) for s in steps] for key in ("lr", "grad_norm", "loss_scale",
                                                                         "nonfinite_steps")})
    names = {id(p): n for n, p in trainer.net.named_parameters()}
    record["weights"] = {names[id(p)]: p.detach().float().cpu().clone() for p in trainer.trainable}
    trainer.engine.destroy()
    return record
