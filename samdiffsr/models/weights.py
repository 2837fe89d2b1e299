"""Load and save model weights: ours, and the authors' (SRDiff / SAM-DiffSR) checkpoints.

Every load is strict: a missing, unexpected or mis-shaped key is an error that names it. The authors'
loader silently continued with random weights when a checkpoint did not match; never do that.

Formats understood by `load_weights`:
- ours: ``{"format": "samdiffsr-weights", "model": state_dict, "ema": state_dict | None, "step", "config"}``
- the authors' Lightning-like layout: ``{"state_dict": {"model": state_dict}, "global_step": int, ...}``
  with keys ``denoise_fn.*``, ``rrdb.*`` and the schedule buffers, possibly prefixed by ``module.``
- a bare state dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from samdiffsr.cli import UserError
from samdiffsr.io import atomic_torch_save, torch_load
from samdiffsr.models.architecture import overrides_to_fit

WEIGHTS_FORMAT = "samdiffsr-weights"


class WeightsError(UserError, RuntimeError):
    """A weights file is missing, unreadable, or does not match the model."""


def read_checkpoint(path: str | Path) -> Any:
    """A checkpoint as plain data (tensors and containers; no code is unpickled).

    Anything else is a :class:`WeightsError` of one line naming the file (:func:`samdiffsr.io.torch_load`).
    """
    return torch_load(path, WeightsError, "weights file")


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


def extract_state_dict(ckpt: Any, path: str | Path = "?", prefer_ema: bool = True) -> tuple[dict, dict]:
    """Return (state_dict, info) from any supported checkpoint layout."""
    info: dict[str, Any] = {"path": str(path)}
    if not isinstance(ckpt, dict):
        raise WeightsError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if ckpt.get("format") == WEIGHTS_FORMAT:
        use_ema = bool(prefer_ema and ckpt.get("ema"))
        # The EMA covers the trainable weights only; everything else comes from the model entry.
        state = {**ckpt["model"], **ckpt["ema"]} if use_ema else ckpt["model"]
        info.update(layout="samdiffsr", step=ckpt.get("step"), ema=bool(use_ema), config=ckpt.get("config"))
    elif "state_dict" in ckpt:
        inner = ckpt["state_dict"]
        if not isinstance(inner, dict) or "model" not in inner:
            raise WeightsError(f"{path}: 'state_dict' has no 'model' entry (keys: {list(inner)[:5]})")
        state = inner["model"]
        info.update(layout="authors", step=ckpt.get("global_step"), ema=False)
    else:
        state = ckpt
        info.update(layout="state_dict", step=None, ema=False)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: the model entry is not a state dict of tensors")
    return _strip_prefix(state, "module."), info


def load_state_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into `module`; any missing, unexpected or mis-shaped key is a WeightsError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    checks = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
    for title, items in checks:
        if items:
            more = f" ... and {len(items) - 8} more" if len(items) > 8 else ""
            problems.append(f"{len(items)} {title}: {', '.join(items[:8])}{more}")
    if problems:
        fit = overrides_to_fit(state, own)
        if fit:  # the architecture differs: say how to build the right one, not which keys are missing
            raise WeightsError(
                f"{source} does not match the model built from the config ({len(missing)} missing, "
                f"{len(unexpected)} unexpected, {len(shapes)} mis-shaped keys): pass the config it was trained "
                f"with (--config; the authors' checkpoint is configs/samdiffsr_df2k4x.yaml) or the overrides "
                f"{' '.join(fit)}")
        raise WeightsError(f"{source} does not match the model: " + "; ".join(problems))
    for name, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise WeightsError(f"{source}: tensor '{name}' holds NaN or Inf values; refusing to load it")
    # Schedule buffers must agree too: a checkpoint trained with another schedule is not this model.
    for name, buf in module.named_buffers():
        if name in state and not torch.allclose(state[name].float(), buf.float(), rtol=1e-4, atol=1e-6):
            raise WeightsError(f"{source}: buffer '{name}' differs from this config's diffusion schedule "
                               "(check model.timesteps / beta_schedule)")
    module.load_state_dict(state, strict=True)


def load_weights(model: nn.Module, path: str | Path, prefer_ema: bool = True) -> dict[str, Any]:
    """Load a full-model checkpoint (ours or the authors') into `model`; returns info (layout, step)."""
    state, info = extract_state_dict(read_checkpoint(path), path, prefer_ema)
    load_state_strict(model, state, str(path))
    return info


def load_rrdb_weights(rrdb: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load RRDB weights from an RRDB-only checkpoint (ours or the authors' pretraining), or take the
    ``rrdb.*`` part of a full-model checkpoint."""
    state, info = extract_state_dict(read_checkpoint(path), path, prefer_ema=True)
    if any(k.startswith("rrdb.") for k in state):
        state = {k[len("rrdb."):]: v for k, v in state.items() if k.startswith("rrdb.")}
    load_state_strict(rrdb, state, str(path))
    return info


def save_weights(path: str | Path, model: nn.Module, *, ema: dict[str, torch.Tensor] | None = None,
                 step: int = 0, config: dict[str, Any] | None = None) -> None:
    """Write a plain weights file (model + optional EMA, no optimizer), atomically.

    ``ema`` maps state-dict keys of `model` (usually the trainable parameters only) to averaged values.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": WEIGHTS_FORMAT,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "ema": {k: v.detach().cpu() for k, v in ema.items()} if ema else None,
        "step": int(step),
        "config": config,
    }
    atomic_torch_save(payload, path)  # no partial file left; a full disk is named as such
