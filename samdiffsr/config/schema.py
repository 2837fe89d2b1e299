"""The configuration schema: one dataclass per section, with its defaults and what each key means.

Loading (YAML files, ``base`` chains, ``key=value`` overrides) is in :mod:`samdiffsr.config.loading`,
cross-field checks in :mod:`samdiffsr.config.validation`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from samdiffsr.cli import UserError


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the offending key."""


@dataclass
class ModelConfig:
    """The SAM-DiffSR network and its diffusion (names follow the authors' hparams where they exist)."""

    hidden_size: int = 64
    dim_mults: tuple[int, ...] = (1, 2, 3, 4)
    rrdb_num_block: int = 17
    rrdb_num_feat: int = 64
    rrdb_growth: int = 32
    sr_scale: int = 4
    timesteps: int = 100
    beta_schedule: str = "cosine"  # cosine | linear
    beta_s: float = 0.008
    beta_end: float = 0.02
    res_rescale: float = 2.0  # x0 = (HR - bicubic_up(LR)) * res_rescale
    clip_input: bool = True
    loss_type: str = "l1"  # l1 | l2
    use_attn: bool = False
    # The paper's core: add the SPE mask to the training noise, scaled by sqrt(1 - abar_t) * beta_t.
    sam_modulation: bool = True
    mask_coefficient: bool = True
    # The authors build bicubic_up(LR) from uint8 / 256 while HR uses / 255. Their released weights were
    # trained that way; set 256 to reproduce their numbers, keep 255 (consistent scaling) for new runs.
    lr_up_divisor: float = 255.0


@dataclass
class DataConfig:
    """Where training / validation samples come from and how they are cropped."""
    train_shards: str = "shards/demo/train"  # a shard folder (with sizes.json), pattern or list
    val_shards: str = ""  # shard pattern or an HR image folder; empty: no validation
    val_images: int = 4  # held-out images used for validation
    patch_size: int = 160  # HR crop; LR crop is patch_size // sr_scale
    crops_per_tile: int = 1  # random crops taken from each decoded tile (an epoch = tiles x crops)
    shuffle_buffer: int = 256
    resampled: bool = False  # True: sample shards with replacement (infinite stream)
    hflip: bool = True
    vflip: bool = False  # with hflip and rot90 already all 8 flips/rotations occur
    rot90: bool = True
    workers: int = 2  # DataLoader workers per rank
    samples_per_epoch: int = 0  # crops per rank per epoch; 0 = derived from the shard manifest (sizes.json)
    prefetch_factor: int = 4
    cache_dir: str = ""  # node-local folder: each shard copied there on first use, read there after (data/cache.py)


@dataclass
class OptimConfig:
    """Adam with the paper's step decay (lr halved every ``decay_steps``)."""

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    decay_steps: int = 200_000
    decay_gamma: float = 0.5
    grad_clip: float = 10.0
    # Linear warm-up: update k (1-based) of the first warmup_steps uses lr * k / warmup_steps; 0 = none
    # (the paper). The schedule is samdiffsr/train/schedule.py, documented in docs/training.md.
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    """The training run: task, sizes, precision, checkpoints and logging."""

    task: str = "diffusion"  # diffusion | rrdb
    run_dir: str = "runs/samdiffsr"
    batch_size: int = 64  # global batch = micro_batch * grad_accum * world_size
    grad_accum: int = 1
    max_steps: int = 400_000
    precision: str = "fp32"  # fp32 | bf16 | fp16
    zero_stage: int = 0
    seed: int = 1234
    rrdb_ckpt: str = ""  # weights for the frozen LR encoder (ours or the authors' layout)
    freeze_rrdb: bool = True
    ema_decay: float = 0.0  # 0 disables the EMA (the paper uses none)
    # Convergence levers (docs/training.md, "Convergence levers"), each off by default (the paper's training).
    # Training-only, so they may change on resume (model.* may not).
    ema_warmup_power: float = 0.0  # EMA decay min(ema_decay, 1 - (1 + t)^-power) at applied update t; 0 = off
    snr_gamma: float = 0.0  # Min-SNR-gamma weighting of each sample's loss (5 in the paper); 0 = off
    timestep_sampling: str = "uniform"  # uniform (the paper) | low_noise: p(t) ~ (T - t)^timestep_power
    timestep_power: float = 1.0  # k of the low_noise density (> 0)
    ckpt_every: int = 2000
    keep_last: int = 3
    keep_every: int = 0  # also keep every M-th step (0: none)
    resume: str = "auto"  # auto | never | must | <checkpoint dir>
    log_every: int = 100
    val_every: int = 4000
    val_crop: int = 0  # validation: centre-crop each held-out HR image to at most this size (0: whole)
    # Validation sampler (models/samplers.py): by default the fast one of bench/RESULTS.md "Samplers",
    # respaced ancestral sampling (ddim, 10 steps, eta 1); ddpm with val_steps=0 is the paper's T-step chain.
    val_sampler: str = "ddim"  # ddpm | ddim | dpmpp_2m
    val_steps: int = 10  # 0: all T steps
    val_eta: float = 1.0  # ddim: 0 deterministic, 1 ancestral
    max_bad_steps: int = 20  # NaN/Inf losses in a row before the run stops
    channels_last: bool = False
    compile: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Extra DeepSpeed settings merged over the ones derived from `train`/`optim` (or a JSON path).
    deepspeed: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
