"""Cross-field checks that types alone cannot express: choices, ranges, combinations."""

from __future__ import annotations

from typing import Any

from samdiffsr.config.schema import Config, ConfigError


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(choices)}")


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    m, t, d = cfg.model, cfg.train, cfg.data
    _check_choice("model.beta_schedule", m.beta_schedule, ("cosine", "linear"))
    _check_choice("model.loss_type", m.loss_type, ("l1", "l2"))
    _check_choice("train.task", t.task, ("diffusion", "rrdb"))
    _check_choice("train.precision", t.precision, ("fp32", "bf16", "fp16"))
    if m.sr_scale not in (2, 4, 8):
        raise ConfigError(f"config key 'model.sr_scale': {m.sr_scale} is not one of 2, 4, 8")
    if t.zero_stage not in (0, 1, 2):
        raise ConfigError(f"config key 'train.zero_stage': {t.zero_stage} is not one of 0, 1, 2")
    if t.precision == "fp16" and t.zero_stage:
        # Checked with deepspeed 0.19.8: on an overflow its ZeRO-1/2 optimizer returns before the autocast
        # GradScaler's step/update run (the scale never backs off: every later step is skipped), and it clips
        # the still loss-scaled gradients. ZeRO 1/2 save ~100 MB per GPU on this ~12M-parameter model.
        raise ConfigError(f"config keys 'train.precision' and 'train.zero_stage': fp16 with ZeRO {t.zero_stage} is "
                          "refused (DeepSpeed's ZeRO-1/2 optimizer never backs the fp16 loss scale off after an "
                          "overflow and clips the loss-scaled gradients); use train.zero_stage=0 with fp16, or bf16")
    if d.patch_size % m.sr_scale:
        raise ConfigError(f"config key 'data.patch_size': {d.patch_size} is not a multiple of "
                          f"model.sr_scale={m.sr_scale}")
    _check_ranges(cfg)
    _check_levers(cfg)
    _check_val_sampler(cfg)
    check_deepspeed_section(cfg, {k: v for k, v in cfg.deepspeed.items() if k != "config_path"}, None)


def _at_least(key: str, value: float, low: float, meaning: str = "") -> None:
    if not value >= low:  # also refuses NaN
        raise ConfigError(f"config key '{key}': must be >= {low:g}{meaning}, got {value:g}")


def _check_ranges(cfg: Config) -> None:
    """Numbers that would otherwise fail mid-run (ZeroDivisionError, torch errors) or do nothing."""
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    for key, value in (("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                       ("train.max_steps", t.max_steps), ("train.ckpt_every", t.ckpt_every),
                       ("train.log_every", t.log_every), ("train.keep_last", t.keep_last),
                       ("train.max_bad_steps", t.max_bad_steps), ("optim.decay_steps", o.decay_steps),
                       ("model.timesteps", m.timesteps), ("model.hidden_size", m.hidden_size),
                       ("model.rrdb_num_feat", m.rrdb_num_feat), ("model.rrdb_growth", m.rrdb_growth),
                       ("data.patch_size", d.patch_size), ("data.crops_per_tile", d.crops_per_tile),
                       ("data.prefetch_factor", d.prefetch_factor)):
        _at_least(key, value, 1)
    for key, value in (("train.val_every", t.val_every), ("train.keep_every", t.keep_every),
                       ("train.val_crop", t.val_crop), ("train.val_steps", t.val_steps),
                       ("data.workers", d.workers), ("data.shuffle_buffer", d.shuffle_buffer),
                       ("data.samples_per_epoch", d.samples_per_epoch), ("data.val_images", d.val_images),
                       ("optim.warmup_steps", o.warmup_steps),
                       ("optim.weight_decay", o.weight_decay), ("optim.grad_clip", o.grad_clip)):
        _at_least(key, value, 0)
    # Fewer than 2 blocks leave the UNet no RRDB feature (a zero-channel projection, see models/unet.py).
    _at_least("model.rrdb_num_block", m.rrdb_num_block, 2, " (the UNet takes every third RRDB feature from the 3rd)")
    if not m.dim_mults or min(m.dim_mults) < 1:
        raise ConfigError(f"config key 'model.dim_mults': must be a non-empty list of integers >= 1, "
                          f"got {list(m.dim_mults)}")
    for key, value in (("optim.lr", o.lr), ("optim.decay_gamma", o.decay_gamma),
                       ("model.lr_up_divisor", m.lr_up_divisor)):
        if not value > 0:
            raise ConfigError(f"config key '{key}': must be > 0, got {value:g}")
    for key, value in (("optim.betas[0]", o.betas[0]), ("optim.betas[1]", o.betas[1]),
                       ("train.ema_decay", t.ema_decay)):
        if not 0 <= value < 1:
            raise ConfigError(f"config key '{key}': must be in [0, 1), got {value:g}")


def _check_levers(cfg: Config) -> None:
    """The convergence levers (docs/training.md): their ranges, and a warm-up needs an EMA to warm up."""
    t = cfg.train
    _check_choice("train.timestep_sampling", t.timestep_sampling, ("uniform", "low_noise"))
    _at_least("train.snr_gamma", t.snr_gamma, 0, " (0: no Min-SNR weighting)")
    _at_least("train.ema_warmup_power", t.ema_warmup_power, 0, " (0: no EMA warm-up)")
    if not t.timestep_power > 0:
        raise ConfigError(f"config key 'train.timestep_power': must be > 0, got {t.timestep_power:g}")
    if t.ema_warmup_power and not t.ema_decay:
        raise ConfigError("config keys 'train.ema_warmup_power' and 'train.ema_decay': the EMA warm-up needs an "
                          "EMA (train.ema_decay > 0)")


# --- the deepspeed: section against what train / optim derive ----------------------------------------
def derived_engine_settings(cfg: Config, world_size: int | None) -> dict[str, tuple[Any, str]]:
    """Each DeepSpeed key (dotted) that train / optim decide: (its value, where it comes from, for messages).

    The micro batch needs the world size (None: left out). Under fp32 ``torch_autocast.enabled`` is false.
    """
    t, o = cfg.train, cfg.optim
    settings: dict[str, tuple[Any, str]] = {
        "train_batch_size": (t.batch_size, f"train.batch_size={t.batch_size}"),
        "gradient_accumulation_steps": (t.grad_accum, f"train.grad_accum={t.grad_accum}"),
        "gradient_clipping": (o.grad_clip, f"optim.grad_clip={o.grad_clip:g}"),
        "zero_optimization.stage": (t.zero_stage, f"train.zero_stage={t.zero_stage}"),
        "torch_autocast.enabled": (t.precision != "fp32", f"train.precision={t.precision}"),
    }
    if t.precision != "fp32":
        settings["torch_autocast.dtype"] = (t.precision, f"train.precision={t.precision}")
    if world_size is not None:
        micro = t.batch_size // (t.grad_accum * world_size)
        settings["train_micro_batch_size_per_gpu"] = (
            micro, f"train.batch_size={t.batch_size} / (train.grad_accum={t.grad_accum} x {world_size} ranks)")
    return settings


def check_deepspeed_section(cfg: Config, user: dict[str, Any], world_size: int | None) -> None:
    """A ``deepspeed:`` key that disagrees with what train / optim derive is refused, naming both.

    Equal values pass, as do keys that train / optim do not decide. One source per setting: the trainer
    branches on ``train.*`` (ZeRO stage, precision), so a section that changed them behind its back would
    train something other than what the config says.
    """
    for key in ("fp16", "bf16"):
        if isinstance(user.get(key), dict) and user[key].get("enabled"):
            raise ConfigError(f"config key 'deepspeed.{key}': use train.precision={key} instead (DeepSpeed's "
                              f"native {key} casts the diffusion schedule buffers to {key})")
    for dotted, (value, source) in derived_engine_settings(cfg, world_size).items():
        node: Any = user
        for part in dotted.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT and node != value:
            raise ConfigError(f"config key 'deepspeed.{dotted}': {node!r} disagrees with {source} (which sets "
                              f"{value!r}); one source for each setting: drop it or give the same value")


_ABSENT = object()


def _check_val_sampler(cfg: Config) -> None:
    """The validation sampler: a known one, and the ddpm chain only over all T steps."""
    m, t = cfg.model, cfg.train
    _check_choice("train.val_sampler", t.val_sampler, ("ddpm", "ddim", "dpmpp_2m"))
    if t.val_sampler == "ddpm" and 0 < t.val_steps < m.timesteps:
        raise ConfigError(f"config keys 'train.val_sampler' and 'train.val_steps': the ddpm sampler runs all "
                          f"model.timesteps={m.timesteps} steps; set train.val_steps=0, or train.val_sampler=ddim")
    if not 0 <= t.val_eta <= 1:
        raise ConfigError(f"config key 'train.val_eta': must be in [0, 1], got {t.val_eta:g}")
