"""A tiny randomly initialised SAM checkpoint for tests (segment-anything's own modules, 32-wide ViT)."""

from __future__ import annotations

from pathlib import Path

import torch

from samdiffsr.masks.sam import build_sam_vit_tiny


def write_tiny_sam_checkpoint(path: str | Path, seed: int = 0) -> Path:
    """Save a seeded random ``vit_tiny`` state dict for ``SamMasker(path, model_type="vit_tiny")``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_sam_vit_tiny()
    torch.save(model.state_dict(), path)
    return Path(path)
