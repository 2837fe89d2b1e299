"""SamMasker end to end on a tiny random SAM checkpoint, loaded through the same path as released weights."""

from __future__ import annotations

import importlib.util
import inspect
import json
import pickle

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from skimage import data, transform
from tiny_sam import write_tiny_sam_checkpoint

from samdiffsr.masks.cache import load_or_make_masks, meta_path
from samdiffsr.masks.rle import masks_to_records, read_mask_json, records_to_masks, write_mask_json
from samdiffsr.masks.sam import AMG_DEFAULTS, SamCheckpointError, SamMasker, build_sam_vit_tiny

# What scripts/amg.py passes to SamAutomaticMaskGenerator (its get_amg_kwargs), in its order.
AMG_SETTINGS = [
    "points_per_side",
    "points_per_batch",
    "pred_iou_thresh",
    "stability_score_thresh",
    "stability_score_offset",
    "box_nms_thresh",
    "crop_n_layers",
    "crop_nms_thresh",
    "crop_overlap_ratio",
    "crop_n_points_downscale_factor",
    "min_mask_region_area",
]
AMG_KEYS = ["segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"]
# Random weights predict low quality: without these the generator's filters drop every mask.
TINY_SETTINGS = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "sam_tiny.pth", seed=0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A real photo, small and non-square (48 x 64) so the test stays quick and catches H/W swaps."""
    return (transform.resize(data.astronaut(), (48, 64), anti_aliasing=True) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def masker(checkpoint) -> SamMasker:
    return SamMasker(checkpoint, model_type="vit_tiny", device="cpu", **TINY_SETTINGS)


@pytest.fixture(scope="module")
def records(masker, image) -> list[dict]:
    return masker(image)


def test_amg_defaults_are_the_generators_own():
    assert list(AMG_DEFAULTS) == AMG_SETTINGS
    signature = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
    assert dict(AMG_DEFAULTS) == {name: signature[name].default for name in AMG_SETTINGS}


def test_tiny_sam_records_have_amg_format(masker, image, records, tmp_path):
    assert masker.name == "sam-vit_tiny"
    assert len(records) >= 1
    for record in records:
        assert list(record) == AMG_KEYS
        assert record["segmentation"]["size"] == [48, 64]
        assert isinstance(record["segmentation"]["counts"], str)
        assert record["crop_box"] == [0, 0, 64, 48]
        (x, y) = record["point_coords"][0]
        assert 0 <= x < 64 and 0 <= y < 48
        assert 0.0 <= record["stability_score"] <= 1.0 and isinstance(record["predicted_iou"], float)

    path = tmp_path / "astronaut.json"
    write_mask_json(path, records)
    assert json.loads(path.read_text()) == records
    masks = read_mask_json(path, expected_hw=(48, 64))
    assert masks.shape == (len(records), 48, 64)
    ours = masks_to_records(masks)  # our encoder reproduces SAM's RLE, area and bbox for the same masks
    assert [(r["segmentation"], r["area"], r["bbox"]) for r in ours] == [
        (r["segmentation"], r["area"], r["bbox"]) for r in records
    ]


def test_same_masks_as_the_generator_run_directly(checkpoint, image, records):
    model = build_sam_vit_tiny()
    model.load_state_dict(torch.load(checkpoint))
    direct = SamAutomaticMaskGenerator(model, output_mode="coco_rle", **TINY_SETTINGS).generate(image)
    assert direct == records  # same records, same order: SamMasker runs these weights, nothing else


def test_cache_with_sam(masker, image, records, tmp_path):
    path = tmp_path / "astronaut.json"
    masks, source = load_or_make_masks(path, image, masker)
    assert source == "sam-vit_tiny"
    np.testing.assert_array_equal(masks, records_to_masks(records, (48, 64)))
    meta = json.loads(meta_path(path).read_text())
    assert meta["settings"]["model_type"] == "vit_tiny" and meta["settings"]["points_per_side"] == 4
    assert load_or_make_masks(path, image)[1] == "sam-vit_tiny"


def test_settings_follow_amg_py(checkpoint):
    masker = SamMasker(checkpoint, "vit_tiny", points_per_side=None, box_nms_thresh=0.5)
    assert masker.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert {k: masker.settings[k] for k in AMG_SETTINGS} == {**AMG_DEFAULTS, "box_nms_thresh": 0.5}
    assert masker.settings["checkpoint"] == str(checkpoint)
    assert masker._generator.box_nms_thresh == 0.5 and masker._generator.point_grids[0].shape == (32 * 32, 2)


def test_bad_arguments(checkpoint, image):
    with pytest.raises(ValueError, match="unknown SAM model type 'vit_x'; choose one of vit_h, vit_l, vit_b"):
        SamMasker(checkpoint, "vit_x")
    with pytest.raises(TypeError, match="unknown mask generator settings: output_mode, point_grids"):
        SamMasker(checkpoint, "vit_tiny", point_grids=None, output_mode="binary_mask")
    masker = SamMasker(checkpoint, "vit_tiny", device="cpu", **TINY_SETTINGS)
    with pytest.raises(ValueError, match="RGB uint8"):
        masker(image[..., 0])


@pytest.mark.skipif(importlib.util.find_spec("cv2") is not None, reason="OpenCV is installed")
def test_small_region_removal_needs_opencv(checkpoint):
    with pytest.raises(ImportError, match="OpenCV"):
        SamMasker(checkpoint, "vit_tiny", min_mask_region_area=100)


def test_checkpoint_errors_name_the_file(checkpoint, tmp_path):
    missing = tmp_path / "sam_vit_h_4b8939.pth"
    with pytest.raises(SamCheckpointError, match="file not found") as info:
        SamMasker(missing)
    assert info.value.path == str(missing) and str(missing) in str(info.value)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(SamCheckpointError, match="cannot be loaded as a SAM vit_tiny model") as info:
        SamMasker(garbage, "vit_tiny")
    assert str(garbage) in str(info.value)

    with pytest.raises(SamCheckpointError, match="cannot be loaded as a SAM vit_b model") as info:
        SamMasker(checkpoint, "vit_b")  # the registry's real vit_b rejects the tiny weights
    assert str(checkpoint) in str(info.value) and len(str(info.value)) < 600
    error = pickle.loads(pickle.dumps(info.value))
    assert (error.path, error.reason) == (info.value.path, info.value.reason)
