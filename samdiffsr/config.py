"""Typed configuration: dataclasses loaded from YAML, with ``key=value`` overrides.

A config file is a YAML mapping whose top-level keys are the sections below (``model``, ``data``,
``optim``, ``train``, ``deepspeed``). A file may name ``base: other.yaml`` (relative to itself) to
inherit and override it. Overrides on the command line use dotted keys: ``train.max_steps=10``.
Unknown keys and wrong types are errors that name the key and suggest the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
    ckpt_every: int = 2000
    keep_last: int = 3
    keep_every: int = 0  # also keep every M-th step (0: none)
    resume: str = "auto"  # auto | never | must | <checkpoint dir>
    log_every: int = 100
    val_every: int = 4000
    val_crop: int = 0  # validation: centre-crop each held-out HR image to at most this size (0: whole)
    val_steps: int = 0  # validation sampler: 0 = the full T-step DDPM, fewer = respaced DDIM steps
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


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert one value against its type hint; raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):  # "1,2,3,4" or the authors' "1|2|3|4"
            value = [v for v in value.replace("|", ",").strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if (len(args) == 2 and args[1] is Ellipsis) else None
        if item is None and len(args) != len(value):
            raise ConfigError(f"config key '{key}': expected {len(args)} values, got {len(value)}")
        return tuple(
            _coerce(v, item if item is not None else args[i], f"{key}[{i}]") for i, v in enumerate(value)
        )
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value.replace("_", ""))) if value.strip() else 0
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    """Apply a nested mapping of updates to a dataclass instance, validating every key."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'{_suggest(key, names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}': expected a section (mapping), got {value!r}")
            _apply(current, value, prefix=f"{full}.")
        elif key == "deepspeed" and prefix == "" and isinstance(value, str):
            setattr(obj, key, {"config_path": value})
        elif key == "deepspeed" and prefix == "":
            merged = dict(current)
            merged.update(_coerce(value, hints[key], full))
            setattr(obj, key, merged)
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """Return the layers of a config file, base first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    base = data.pop("base", None)
    layers: list[dict[str, Any]] = []
    for b in [base] if isinstance(base, str) else (base or []):
        layers += _read_yaml(path.parent / b, seen + (path,))
    return layers + [data]


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` on top; nested dicts merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``section.key=value`` into a nested dict; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from defaults, a YAML file (with its `base` chain) and `key=value` overrides."""
    cfg = Config()
    if path:
        for layer in _read_yaml(Path(path)):
            _apply(cfg, layer)
    for text in overrides:
        _apply(cfg, parse_override(text))
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. the copy saved in a checkpoint)."""
    cfg = Config()
    _apply(cfg, data)
    validate(cfg)
    return cfg


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


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
