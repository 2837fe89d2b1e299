"""A rank's random state: captured with every checkpoint (``rng_rankR.pt``), restored on a resume with the
same number of ranks, reseeded deterministically on another number of ranks."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from samdiffsr.distributed import derive_seed
from samdiffsr.train.checkpoints import CheckpointError


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a rank's training depends on, as tensors and plain containers (weights_only)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "generator_device": str(generator.device),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if str(generator.device) != state["generator_device"]:
        raise CheckpointError(f"the diffusion RNG was saved on {state['generator_device']} and cannot be "
                              f"restored on {generator.device}")
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed(generator: torch.Generator, seed: int, rank: int, step: int) -> None:
    """The diffusion generator of ``rank`` resuming at ``step`` on another number of ranks (no saved state
    fits): a pure function of (seed, rank, step), so a rerun draws the same noise, and not the draws of the
    run's first steps again."""
    generator.manual_seed(derive_seed(seed, rank, 1, step) >> 1)
