"""What one rank trains with: the network, its loss as the module DeepSpeed wraps, the optimizer, the
DeepSpeed engine and its config, the per-rank generator and the EMA."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samdiffsr.config import Config, ConfigError, TrainConfig, deep_merge
from samdiffsr.config.validation import check_deepspeed_section, derived_engine_settings
from samdiffsr.distributed import derive_seed
from samdiffsr.models import build_model, load_rrdb_weights
from samdiffsr.models.diffusion import TrainingLevers
from samdiffsr.models.inputs import PRECISION_DTYPES
from samdiffsr.train.ema import EMA
from samdiffsr.train.nonfinite import GuardedUpdate
from samdiffsr.train.versions import check_versions


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype autocast runs in under ``train.precision``; None for fp32 (no autocast)."""
    return None if precision == "fp32" else PRECISION_DTYPES[precision]


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: derived from ``train`` / ``optim``, then the ``deepspeed:`` section over it.

    ``deepspeed: path.json`` (stored as ``{"config_path": ...}``) reads a DeepSpeed JSON file first. A key of
    the section that disagrees with a derived one is refused (config/validation.py: check_deepspeed_section).
    """
    settings = cfg.train
    if settings.batch_size % (settings.grad_accum * world_size):
        raise ConfigError(f"config key 'train.batch_size': {settings.batch_size} is not divisible by "
                          f"train.grad_accum x world size = {settings.grad_accum} x {world_size}")
    derived: dict[str, Any] = {"wall_clock_breakdown": False}  # a default the section may change
    for dotted, (value, _) in derived_engine_settings(cfg, world_size).items():
        if dotted == "torch_autocast.enabled" and not value:
            continue  # fp32: no torch_autocast section at all
        *parents, leaf = dotted.split(".")
        node = derived
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
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
    check_deepspeed_section(cfg, user, world_size)
    return deep_merge(derived, user)


class TrainingObjective(nn.Module):
    """The trained network with its loss as ``forward``, so that DeepSpeed's autocast covers it."""

    def __init__(self, net: nn.Module, task: str, levers: TrainingLevers | None = None) -> None:
        super().__init__()
        self.net, self.task, self.levers = net, task, levers

    def forward(self, img_hr: torch.Tensor, img_lr: torch.Tensor, img_lr_up: torch.Tensor,
                mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.task == "rrdb":  # RRDB pretraining: L1 of rrdb(LR) against HR
            return F.l1_loss(self.net(img_lr).float(), img_hr)
        return self.net.training_loss(img_hr, img_lr, img_lr_up, mask, generator=generator,
                                      levers=self.levers).float()


def check_rrdb_weights(settings: TrainConfig) -> None:
    """A frozen RRDB needs pretrained weights (``train.rrdb_ckpt``): a ConfigError otherwise."""
    if settings.freeze_rrdb and not settings.rrdb_ckpt:
        raise ConfigError("config key 'train.rrdb_ckpt': a frozen RRDB (train.freeze_rrdb=true) needs "
                          "pretrained weights (run the rrdb task first, or give the authors' checkpoint)")


def build_network(cfg: Config, load_rrdb: bool) -> nn.Module:
    """The network to train: RRDBNet alone (task=rrdb) or the diffusion model with its RRDB.

    A frozen RRDB is loaded from ``train.rrdb_ckpt`` on a fresh start; on resume the checkpoint holds it.
    """
    model = build_model(cfg.model)
    settings = cfg.train
    if settings.task == "rrdb":
        return model.rrdb
    if load_rrdb:
        check_rrdb_weights(settings)
        if settings.rrdb_ckpt:
            load_rrdb_weights(model.rrdb, settings.rrdb_ckpt)  # strict; WeightsError names the file or key
    if settings.freeze_rrdb:
        model.rrdb.requires_grad_(False)  # excluded from the optimizer below
    return model


@dataclass
class Trainer:
    """One rank's training objects, from :func:`build_trainer` (the EMA once a checkpoint is loaded)."""

    cfg: Config
    rank: int
    world_size: int
    device: torch.device
    net: nn.Module  # RRDBNet (task=rrdb) or the diffusion model with its RRDB
    engine: Any  # DeepSpeed's engine around TrainingObjective(net)
    trainable: list[nn.Parameter]
    update: GuardedUpdate  # the optimizer update, skipped after a non-finite loss; fp16's loss scale
    generator: torch.Generator  # the diffusion's t / noise draws; per rank, saved with the checkpoint
    micro: int  # micro-batch size per rank
    accum: int  # micro-batches per optimizer step
    ema: EMA | None = None


def forget_autocast_of_earlier_engines() -> None:
    """Reset DeepSpeed's process-wide autocast state before building an engine.

    DeepSpeed (checked with 0.19.8) records the torch_autocast dtype of the first autocast engine in module
    globals of ``deepspeed.runtime.torch_autocast`` and never clears them; an fp32 ZeRO 1/2 engine built later
    in the same process (tests, notebooks, sweeps) then makes an fp16 GradScaler and trains with it (gradient
    norm 65536x, updates cut by clipping: tests/test_training_matrix.py). An autocast config sets them again
    in ``deepspeed.initialize``.
    """
    from deepspeed.runtime import torch_autocast

    torch_autocast.TORCH_AUTOCAST_INITIALIZED, torch_autocast.TORCH_AUTOCAST_DTYPE = False, None


def build_trainer(cfg: Config, rank: int, world_size: int, device: torch.device, load_rrdb: bool) -> Trainer:
    """Network, fused Adam and DeepSpeed engine (the lr schedule is set before each update: train/schedule.py).

    The same seed on every rank (and in any world size) gives the same initial weights, so a 2-rank run and
    a 1-process run start from the same point.
    """
    import deepspeed

    check_versions()  # an older DeepSpeed / torch fails here in one line, not with an AttributeError later
    settings, optim = cfg.train, cfg.optim
    torch.manual_seed(settings.seed)
    net = build_network(cfg, load_rrdb=load_rrdb)
    levers = TrainingLevers(snr_gamma=settings.snr_gamma,  # the loss levers (docs/training.md)
                            timestep_power=settings.timestep_power if settings.timestep_sampling == "low_noise" else 0)
    objective = TrainingObjective(net, settings.task, levers).to(device)
    if settings.compile:  # in place: parameter names (and so checkpoints) stay the same
        (net if settings.task == "rrdb" else net.denoise_fn).compile()
    trainable = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay,
                                 fused=True)
    # No DeepSpeed lr_scheduler: the schedule is a function of the loop's step, set before each update
    # (train/schedule.py), so that skips and a changed optim.lr on resume act the same on every ZeRO stage.
    forget_autocast_of_earlier_engines()
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=optimizer,
                                           config=deepspeed_config(cfg, world_size), dist_init_required=False)
    if settings.channels_last and settings.zero_stage == 0:
        # Only now: DeepSpeed's initial broadcast views each parameter as bytes (default layout only), and
        # under ZeRO 1/2 parameters are views into flat buffers that must stay so; the inputs go
        # channels_last in any case, which is what selects the channels-last convolution kernels.
        objective.to(memory_format=torch.channels_last)
    generator = torch.Generator(device).manual_seed(derive_seed(settings.seed, rank, 1) >> 1)
    return Trainer(cfg=cfg, rank=rank, world_size=world_size, device=device, net=net, engine=engine,
                   trainable=trainable, update=GuardedUpdate(engine), generator=generator,
                   micro=engine.train_micro_batch_size_per_gpu(), accum=engine.gradient_accumulation_steps())


def build_ema(net: nn.Module, decay: float, saved: dict[str, torch.Tensor] | None, warmup_power: float = 0.0,
              steps_done: int = 0) -> EMA | None:
    """The EMA of the trainable weights (None when ``decay`` is 0), from ``saved`` when a checkpoint had one.

    Built once a checkpoint is loaded: a fresh EMA starts from the loaded weights. A checkpoint saved before the
    EMA counted its updates resumes the warm-up at ``steps_done`` (the steps run, skipped ones included).
    """
    ema = EMA(net, decay, warmup_power) if decay > 0 else None
    if ema is not None and saved:
        ema.load_state_dict(saved, updates_if_absent=steps_done)
    return ema
