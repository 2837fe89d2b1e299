"""segment-anything's automatic mask generator from a local checkpoint, producing amg RLE records.

This is what SAM's ``scripts/amg.py --convert-to-rle`` does for one image: the model comes from
``sam_model_registry[model_type](checkpoint=path)`` and the generator runs with ``output_mode="coco_rle"``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
from segment_anything.build_sam import _build_sam
from segment_anything.modeling import Sam

from samdiffsr.io import FileProblem

# The settings amg.py exposes. amg.py passes only those given on its command line, so the effective defaults
# are SamAutomaticMaskGenerator's own, listed here (None values are dropped the same way).
AMG_DEFAULTS = MappingProxyType(
    {
        "points_per_side": 32,
        "points_per_batch": 64,
        "pred_iou_thresh": 0.88,
        "stability_score_thresh": 0.95,
        "stability_score_offset": 1.0,
        "box_nms_thresh": 0.7,
        "crop_n_layers": 0,
        "crop_nms_thresh": 0.7,
        "crop_overlap_ratio": 512 / 1500,
        "crop_n_points_downscale_factor": 1,
        "min_mask_region_area": 0,
    }
)


class SamCheckpointError(FileProblem, RuntimeError):
    """A SAM checkpoint that is missing or does not load: ``path`` names it, ``reason`` says why."""

    prefix = "SAM checkpoint "


# The checkpoints Meta publishes for each model type (https://github.com/facebookresearch/segment-anything
# #model-checkpoints), downloadable from https://dl.fbaipublicfiles.com/segment_anything/<file>.
OFFICIAL_CHECKPOINTS = MappingProxyType(
    {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_b": "sam_vit_b_01ec64.pth"})
CHECKPOINTS_PAGE = "https://github.com/facebookresearch/segment-anything#model-checkpoints"


def where_to_get(model_type: str, short: bool = False) -> str:
    """Which official checkpoint ``model_type`` takes and where it is published (empty for vit_tiny)."""
    name = OFFICIAL_CHECKPOINTS.get(model_type)
    if name is None:
        return ""
    if short:
        return f"the official {model_type} checkpoint is {name} ({CHECKPOINTS_PAGE})"
    return (f"the official {model_type} checkpoint is {name}, published at {CHECKPOINTS_PAGE} "
            f"(https://dl.fbaipublicfiles.com/segment_anything/{name}); pass its path with --sam-checkpoint")


def build_sam_vit_tiny(checkpoint: str | None = None) -> Sam:
    """SAM's own builder with a 2-block, 32-wide ViT encoder (prompt encoder and decoder as released).

    No weights exist for it: it serves tests and smoke runs with a randomly initialised checkpoint, going
    through exactly the loading and generation code that vit_b/l/h take. Its masks mean nothing.
    """
    return _build_sam(
        encoder_embed_dim=32,
        encoder_depth=2,
        encoder_num_heads=2,
        encoder_global_attn_indexes=[1],
        checkpoint=checkpoint,
    )


MODEL_BUILDERS: MappingProxyType[str, Callable[..., Sam]] = MappingProxyType(
    {
        "vit_h": sam_model_registry["vit_h"],
        "vit_l": sam_model_registry["vit_l"],
        "vit_b": sam_model_registry["vit_b"],
        "vit_tiny": build_sam_vit_tiny,
    }
)


class SamMasker:
    """Callable image -> amg RLE records, with SAM loaded once.

    ``generator_kwargs`` are the :data:`AMG_DEFAULTS` settings; None means "default", as in amg.py.
    ``device`` defaults to cuda when available. ``settings`` holds what was used, for provenance.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        model_type: str = "vit_h",
        device: str | None = None,
        **generator_kwargs: int | float | None,
    ):
        if model_type not in MODEL_BUILDERS:
            choices = ", ".join(MODEL_BUILDERS)
            raise ValueError(f"unknown SAM model type {model_type!r}; choose one of {choices}")
        unknown = sorted(set(generator_kwargs) - set(AMG_DEFAULTS))
        if unknown:
            raise TypeError(f"unknown mask generator settings: {', '.join(unknown)}")
        given = {key: value for key, value in generator_kwargs.items() if value is not None}
        if given.get("min_mask_region_area", 0) > 0 and importlib.util.find_spec("cv2") is None:
            raise ImportError("min_mask_region_area > 0 needs OpenCV (pip install opencv-python-headless)")
        path = Path(checkpoint)
        if not path.is_file():
            hint = where_to_get(model_type)
            raise SamCheckpointError(path, f"file not found; {hint}" if hint else "file not found")
        try:
            model = MODEL_BUILDERS[model_type](checkpoint=str(path))
        except Exception as err:  # torch.load / load_state_dict raise many types; all mean "not this model"
            detail = f"{type(err).__name__}: {err}"
            detail = detail if len(detail) <= 300 else detail[:300] + " ..."
            hint = where_to_get(model_type, short=True)
            reason = f"cannot be loaded as a SAM {model_type} model ({detail}){'; ' + hint if hint else ''}"
            raise SamCheckpointError(path, reason) from err
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(self.device)
        self.name = f"sam-{model_type}"
        self.settings = {"model_type": model_type, "checkpoint": str(path), **AMG_DEFAULTS, **given}
        self._generator = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **given)

    def __call__(self, image: np.ndarray) -> list[dict]:
        """Masks of an RGB uint8 H x W x 3 image, as amg records in the generator's order."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"SAM needs an RGB uint8 image H x W x 3, got {image.dtype} {image.shape}")
        return self._generator.generate(image)
