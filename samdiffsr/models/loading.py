"""A model ready to sample from a weights file (ours or the authors'): its config, its weights, its device,
and the ``lr_up_divisor`` its weights were trained with (which :class:`LoadedModel` carries)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samdiffsr.bundled import config_path
from samdiffsr.config import Config, ModelConfig, config_from_dict, deep_merge, load_config, parse_override
from samdiffsr.distributed import local_rank
from samdiffsr.models.diffusion import GaussianDiffusion, build_model
from samdiffsr.models.inputs import prepare_lr
from samdiffsr.models.weights import extract_state_dict, load_state_strict, read_checkpoint

AUTHORS_LR_UP_DIVISOR = 256.0  # what the authors' released weights were trained with


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when a GPU is there (one process per GPU under torchrun/deepspeed/srun), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def lr_up_divisor_for(layout: str, model_cfg: ModelConfig, override: float | None = None) -> float:
    """The divisor of ``bicubic_up(LR / divisor)`` for weights of ``layout``: ``override`` if given, else 256
    for the authors' checkpoint layout (their weights were trained so), else the config's ``lr_up_divisor``."""
    if override is not None:
        return float(override)
    return AUTHORS_LR_UP_DIVISOR if layout == "authors" else float(model_cfg.lr_up_divisor)


@dataclass
class LoadedModel:
    """A model ready to sample, with where it came from and the LR -> input mapping its weights expect."""

    model: GaussianDiffusion
    config: Config
    info: dict[str, Any]  # layout, step, ema, path (see models.weights)
    lr_up_divisor: float

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def inputs(self, lr: np.ndarray, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(img_lr, img_lr_up)`` of one uint8 LR image on this model's device, padded to ``multiple``."""
        return prepare_lr(lr, self.config.model.sr_scale, self.lr_up_divisor, multiple, self.device)


def resolve_config(ckpt: dict[str, Any], config: str | Path | Config | None,
                   overrides: Sequence[str] = ()) -> Config:
    """``config`` (a path, a shipped config's name, or a Config) if given, else the config embedded in our
    weights, else defaults (the paper's model); ``key=value`` overrides apply on top."""
    if isinstance(config, Config):
        return config
    if config:
        return load_config(config_path(config), overrides)
    embedded = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(embedded, dict):
        return load_config(None, overrides)
    for text in overrides:
        embedded = deep_merge(embedded, parse_override(text))
    return config_from_dict(embedded)


def load_model(ckpt_path: str | Path, config: str | Path | Config | None = None, *,
               overrides: Sequence[str] = (), device: str | torch.device | None = None,
               prefer_ema: bool = True, lr_up_divisor: float | None = None) -> LoadedModel:
    """Build the model for a checkpoint (ours or the authors') and load its weights strictly.

    ``lr_up_divisor`` None: the weights' own (:func:`lr_up_divisor_for`).
    """
    ckpt = read_checkpoint(ckpt_path)
    cfg = resolve_config(ckpt, config, overrides)
    state, info = extract_state_dict(ckpt, ckpt_path, prefer_ema)
    model = build_model(cfg.model)
    load_state_strict(model, state, str(ckpt_path))
    device = torch.device(device) if device is not None else default_device()
    return LoadedModel(model.to(device).eval(), cfg, info, lr_up_divisor_for(info["layout"], cfg.model, lr_up_divisor))
