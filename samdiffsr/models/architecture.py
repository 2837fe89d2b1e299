"""The ``model.*`` settings a state dict implies, read back from its key names and tensor shapes.

Used to turn a checkpoint that does not fit the configured model (hundreds of missing or mis-shaped
keys) into the few config overrides that would make it fit.
"""

from __future__ import annotations

from typing import Any

import torch

RRDB_KEYS = ("conv_first.", "RRDB_trunk.")  # an RRDB-only state dict (pretraining), without "rrdb."


def model_settings(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{setting: value}`` for the ``model.*`` settings that ``state`` shows (a full model or an RRDB)."""
    if any(k.startswith(RRDB_KEYS) for k in state):
        state = {f"rrdb.{k}": v for k, v in state.items()}
    out: dict[str, Any] = {}
    trunk = {int(k.split(".")[2]) for k in state if k.startswith("rrdb.RRDB_trunk.") and k.split(".")[2].isdigit()}
    if trunk:
        out["rrdb_num_block"] = max(trunk) + 1
    if (w := state.get("rrdb.conv_first.weight")) is not None:
        out["rrdb_num_feat"] = int(w.shape[0])
    if (w := state.get("rrdb.RRDB_trunk.0.RDB1.conv1.weight")) is not None:
        out["rrdb_growth"] = int(w.shape[0])
    if (w := state.get("denoise_fn.mlp.0.weight")) is not None and w.ndim == 2:
        dim = int(w.shape[1])
        out["hidden_size"] = dim
        mults, level = [], 0
        while (w := state.get(f"denoise_fn.downs.{level}.0.block1.block.1.weight")) is not None:
            mults.append(int(w.shape[0]) // max(dim, 1))
            level += 1
        if mults:
            out["dim_mults"] = tuple(mults)
        out["use_attn"] = any(k.startswith("denoise_fn.mid_attn.") for k in state)
    if (w := state.get("denoise_fn.cond_proj.weight")) is not None and w.ndim == 4:
        out["sr_scale"] = int(w.shape[2]) // 2
    if (b := state.get("betas")) is not None:
        out["timesteps"] = int(b.shape[0])
    return out


def _as_override(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"model.{key}={str(value).lower()}"
    if isinstance(value, tuple):
        return f"model.{key}=[{','.join(str(v) for v in value)}]"
    return f"model.{key}={value}"


def overrides_to_fit(file_state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor]) -> list[str]:
    """The ``model.key=value`` overrides that would build a model shaped like ``file_state`` (may be empty)."""
    wanted, built = model_settings(file_state), model_settings(model_state)
    return [_as_override(k, v) for k, v in wanted.items() if k in built and built[k] != v]
