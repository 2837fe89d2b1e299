"""Cross-field checks that types alone cannot express: choices, ranges, combinations."""

from __future__ import annotations

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
    if d.patch_size % m.sr_scale:
        raise ConfigError(f"config key 'data.patch_size': {d.patch_size} is not a multiple of "
                          f"model.sr_scale={m.sr_scale}")
    _check_ranges(cfg)
    _check_levers(cfg)
    _check_val_sampler(cfg)


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

def _check_val_sampler(cfg: Config) -> None:
    """The validation sampler: a known one, and the ddpm chain only over all T steps."""
    m, t = cfg.model, cfg.train
    _check_choice("train.val_sampler", t.val_sampler, ("ddpm", "ddim", "dpmpp_2m"))
    if t.val_sampler == "ddpm" and 0 < t.val_steps < m.timesteps:
        raise ConfigError(f"config keys 'train.val_sampler' and 'train.val_steps': the ddpm sampler runs all "
                          f"model.timesteps={m.timesteps} steps; set train.val_steps=0, or train.val_sampler=ddim")
    if not 0 <= t.val_eta <= 1:
        raise ConfigError(f"config key 'train.val_eta': must be in [0, 1], got {t.val_eta:g}")
