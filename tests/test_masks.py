"""Mask JSON (amg COCO-RLE) reading/writing, the Felzenszwalb fallback and the per-image mask cache."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import mask_to_rle_pytorch
from skimage import data, filters, segmentation
from skimage.color import rgb2gray

from samdiffsr.io import atomic_write_bytes
from samdiffsr.masks.cache import load_or_make_masks, meta_path
from samdiffsr.masks.classical import FelzenszwalbMasker
from samdiffsr.masks.rle import MaskFileError, masks_to_records, read_mask_json, write_mask_json

AMG_KEYS = ["segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"]


def photo_masks(image: np.ndarray) -> np.ndarray:
    """Overlapping masks of a photo: Felzenszwalb regions, an Otsu threshold, an empty and a full mask."""
    labels = segmentation.felzenszwalb(image, scale=300, min_size=200)
    regions = labels[None] == np.arange(min(labels.max() + 1, 12))[:, None, None]
    gray = rgb2gray(image)
    otsu = gray > filters.threshold_otsu(gray)
    extra = np.stack([otsu, np.zeros_like(otsu), np.ones_like(otsu)])
    return np.concatenate([regions, extra])


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return data.coffee()  # 400 x 600: non-square catches transposed sizes


@pytest.fixture(scope="module")
def coffee_records(coffee) -> list[dict]:
    return masks_to_records(photo_masks(coffee))


# --- rle.py -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["coffee", "astronaut", "chelsea"])
def test_round_trip_on_photos_matches_pycocotools(tmp_path, name):
    image = getattr(data, name)()
    masks = photo_masks(image)
    fields = {"predicted_iou": np.linspace(0.5, 1, len(masks)), "crop_box": [[0, 0, 1, 1]] * len(masks)}
    records = masks_to_records(masks, **fields)
    path = tmp_path / f"{name}.json"
    write_mask_json(path, records)

    decoded = read_mask_json(path, expected_hw=image.shape[:2])
    assert decoded.dtype == bool and decoded.shape == masks.shape
    np.testing.assert_array_equal(decoded, masks)

    on_disk = json.loads(path.read_text())
    reference = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    for record, mask, ref in zip(on_disk, masks, reference, strict=True):
        assert record["segmentation"] == {"size": list(image.shape[:2]), "counts": ref["counts"].decode()}
        np.testing.assert_array_equal(mask_utils.decode(record["segmentation"]), mask)
        assert record["area"] == int(mask.sum()) == int(mask_utils.area(ref))
    assert [r["predicted_iou"] for r in on_disk] == pytest.approx(fields["predicted_iou"].tolist())
    assert list(on_disk[0]) == ["segmentation", "area", "bbox", "predicted_iou", "crop_box"]


def test_bbox_follows_sams_convention():
    masks = np.zeros((2, 30, 40), bool)
    masks[0, 10:20, 5:35] = True  # rows 10..19, columns 5..34
    records = masks_to_records(masks)
    assert records[0]["bbox"] == [5, 10, 29, 9]  # SAM: [x0, y0, x1 - x0, y1 - y0], x1/y1 inclusive
    assert records[1]["bbox"] == [0, 0, 0, 0]
    assert records[1]["area"] == 0


def test_empty_mask_list(tmp_path):
    path = tmp_path / "none.json"
    write_mask_json(path, [])
    assert path.read_text() == "[]"
    assert read_mask_json(path, expected_hw=(7, 9)).shape == (0, 7, 9)
    assert read_mask_json(path).shape == (0, 0, 0)
    assert masks_to_records(np.zeros((0, 7, 9), bool)) == []


def test_uncompressed_rle_from_sam_is_accepted(tmp_path, coffee):
    masks = photo_masks(coffee)
    rles = mask_to_rle_pytorch(torch.from_numpy(masks))  # SAM's own "uncompressed_rle" output
    path = tmp_path / "uncompressed.json"
    records = [{"segmentation": rle, "area": int(m.sum())} for rle, m in zip(rles, masks, strict=True)]
    path.write_text(json.dumps(records))
    np.testing.assert_array_equal(read_mask_json(path, coffee.shape[:2]), masks)


def test_masks_to_records_checks_its_input():
    with pytest.raises(ValueError, match="bool array"):
        masks_to_records(np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="bool array"):
        masks_to_records(np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="'predicted_iou' has 1 values for 2 masks"):
        masks_to_records(np.zeros((2, 4, 4), bool), predicted_iou=[0.5])


def _corrupt(records, index=0, **changes):
    records = json.loads(json.dumps(records))
    records[index].update(changes)
    return records


def _counts(records, index=0):
    return records[index]["segmentation"]["counts"]


def _with_counts(records, counts, index=0):
    records = json.loads(json.dumps(records))
    records[index]["segmentation"]["counts"] = counts
    return records


BAD_FILES = {
    "empty file": (b"", "empty file"),
    "truncated JSON": (b'[{"segmentation": {"size": [400, 600], "coun', "invalid JSON"),
    "not UTF-8": (b"\xff\xfe\x00[", "invalid JSON"),
    "not a list": (b'{"segmentation": {}}', "expected a JSON list of mask records, got dict"),
    "entry not a dict": (b"[1, 2]", "record 0 has no 'segmentation' RLE"),
    "no segmentation": (b'[{"area": 3, "bbox": [0, 0, 1, 1]}]', "record 0 has no 'segmentation' RLE"),
    "bad size": (b'[{"segmentation": {"size": [400], "counts": "0"}}]', "segmentation size must be"),
    "zero size": (b'[{"segmentation": {"size": [0, 5], "counts": "0"}}]', "segmentation size must be"),
    "counts of wrong type": (b'[{"segmentation": {"size": [2, 2], "counts": 4}}]', "counts must be a string"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_raise_mask_file_error(tmp_path, case):
    content, reason = BAD_FILES[case]
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(MaskFileError) as info:
        read_mask_json(path, expected_hw=(400, 600))
    assert info.value.path == str(path)
    assert reason in info.value.reason
    assert str(path) in str(info.value) and reason in str(info.value)


CORRUPT_RECORDS = {
    # pycocotools decodes "0000" (runs that cover 0 of 240000 pixels) to uninitialised memory, no error.
    "runs too short": (lambda r: _with_counts(r, "0000"), "corrupt RLE counts"),
    "truncated counts": (lambda r: _with_counts(r, _counts(r)[:-3]), "corrupt RLE counts"),
    "unfinished run": (lambda r: _with_counts(r, _counts(r) + "P"), "corrupt RLE counts"),
    "characters out of range": (lambda r: _with_counts(r, "!!~~"), "corrupt RLE counts"),
    "non-ASCII counts": (lambda r: _with_counts(r, "é0"), "corrupt RLE counts"),
    "negative run": (lambda r: _with_counts(r, [10, -5, 239995]), "corrupt RLE counts"),
    "swapped runs": (
        lambda r: _with_counts(r, r[1]["segmentation"]["counts"], index=2),
        "record 2: corrupt RLE (area",
    ),
    "area mismatch": (lambda r: _corrupt(r, 1, area=r[1]["area"] + 1), "record 1: corrupt RLE (area"),
    "mixed sizes": (
        lambda r: r + masks_to_records(np.zeros((1, 600, 400), bool)),
        "mask size 600x400 differs from the image's 400x600",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPT_RECORDS))
def test_corrupt_records_raise_mask_file_error(tmp_path, coffee_records, case):
    make, reason = CORRUPT_RECORDS[case]
    path = tmp_path / "corrupt.json"
    write_mask_json(path, make(coffee_records))
    with pytest.raises(MaskFileError, match="corrupt|differs") as info:
        read_mask_json(path, expected_hw=(400, 600))
    assert reason in info.value.reason


def test_size_must_match_the_image(tmp_path, coffee_records):
    path = tmp_path / "coffee.json"
    write_mask_json(path, coffee_records)
    with pytest.raises(MaskFileError, match="record 0: mask size 400x600 differs from the image's 600x400"):
        read_mask_json(path, expected_hw=(600, 400))
    assert read_mask_json(path).shape == (len(coffee_records), 400, 600)


def test_sizes_must_agree_without_expected_size(tmp_path, coffee_records):
    path = tmp_path / "mixed.json"
    write_mask_json(path, coffee_records + masks_to_records(np.zeros((1, 3, 3), bool)))
    with pytest.raises(MaskFileError, match="mask size 3x3 differs from record 0's 400x600"):
        read_mask_json(path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(MaskFileError, match="missing mask JSON") as info:
        read_mask_json(tmp_path / "nope.json")
    assert info.value.path == str(tmp_path / "nope.json")
    with pytest.raises(MaskFileError, match="cannot read"):
        read_mask_json(tmp_path)  # a directory


def test_mask_file_error_survives_pickling():
    error = pickle.loads(pickle.dumps(MaskFileError("a/b.json", "corrupt RLE counts")))
    assert (error.path, error.reason) == ("a/b.json", "corrupt RLE counts")
    assert str(error) == "a/b.json: corrupt RLE counts"


def test_failed_writes_leave_the_old_file_and_no_temporaries(tmp_path, coffee_records):
    path = tmp_path / "coffee.json"
    write_mask_json(path, coffee_records)
    before = path.read_bytes()
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_mask_json(path, coffee_records + [{"segmentation": object()}])
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "text, not bytes: fails after the temporary file exists")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coffee.json"]
    write_mask_json(path, coffee_records[:2])  # replacing works
    assert len(json.loads(path.read_text())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coffee.json"]


# --- classical.py -------------------------------------------------------------------------------------------


def test_felzenszwalb_masker_records(coffee):
    masker = FelzenszwalbMasker()
    records = masker(coffee)
    assert masker.name == "felzenszwalb"
    assert 10 <= len(records) <= 1000
    assert all(list(r) == AMG_KEYS for r in records)
    masks = np.stack([mask_utils.decode(r["segmentation"]).astype(bool) for r in records])
    np.testing.assert_array_equal(masks.sum(axis=0), 1)  # the regions partition the image
    areas = [r["area"] for r in records]
    assert areas == sorted(areas, reverse=True) and areas == masks.sum(axis=(1, 2)).tolist()
    for record, mask in zip(records, masks, strict=True):
        ((x, y),) = record["point_coords"]
        assert mask[int(y), int(x)]
        assert record["predicted_iou"] is None and record["stability_score"] is None
        assert record["crop_box"] == [0, 0, 600, 400]
    assert json.loads(json.dumps(records)) == masker(coffee)  # deterministic and JSON-native


def test_felzenszwalb_settings_change_the_segmentation(coffee):
    coarse, fine = FelzenszwalbMasker(scale=1000), FelzenszwalbMasker(scale=50, min_size=50)
    assert len(coarse(coffee)) < len(fine(coffee))
    with pytest.raises(ValueError, match="RGB uint8"):
        coarse(coffee.astype(np.float32))


# --- cache.py -----------------------------------------------------------------------------------------------


class CountingMasker:
    """A real masker that counts how often it runs."""

    def __init__(self, masker):
        self.masker, self.calls = masker, 0
        self.name, self.settings = masker.name, masker.settings

    def __call__(self, image):
        self.calls += 1
        return self.masker(image)


def test_cache_makes_masks_once_and_remembers_the_masker(tmp_path, coffee):
    masker = CountingMasker(FelzenszwalbMasker())
    path = tmp_path / "masks" / "coffee.json"
    masks, source = load_or_make_masks(path, coffee, masker)
    assert (source, masker.calls) == ("felzenszwalb", 1)
    np.testing.assert_array_equal(read_mask_json(path, (400, 600)), masks)
    meta = json.loads(meta_path(path).read_text())
    assert meta["masker"] == "felzenszwalb" and meta["settings"]["scale"] == 300.0

    again, source = load_or_make_masks(path, coffee, masker)
    assert (source, masker.calls) == ("felzenszwalb", 1)
    np.testing.assert_array_equal(again, masks)
    assert load_or_make_masks(path, coffee)[1] == "felzenszwalb"
    assert sorted(p.name for p in path.parent.iterdir()) == ["coffee.json", "coffee.json.meta"]


def test_cache_reads_foreign_json_as_json(tmp_path, coffee, coffee_records):
    path = tmp_path / "coffee.json"
    write_mask_json(path, coffee_records)
    masker = CountingMasker(FelzenszwalbMasker())
    masks, source = load_or_make_masks(path, coffee, masker)
    assert (source, masker.calls, len(masks)) == ("json", 0, len(coffee_records))

    load_or_make_masks(tmp_path / "made.json", coffee, masker)
    (tmp_path / "made.json").write_bytes(path.read_bytes())  # replaced after it was made: sidecar is stale
    assert load_or_make_masks(tmp_path / "made.json", coffee, masker)[1] == "json"


def test_cache_errors(tmp_path, coffee, coffee_records):
    with pytest.raises(MaskFileError, match="missing mask JSON") as info:
        load_or_make_masks(tmp_path / "coffee.json", coffee)
    assert info.value.path == str(tmp_path / "coffee.json")

    path = tmp_path / "wrong_size.json"
    write_mask_json(path, coffee_records)
    before = path.read_bytes()
    masker = CountingMasker(FelzenszwalbMasker())
    with pytest.raises(MaskFileError, match="differs from the image's 300x451"):
        load_or_make_masks(path, data.chelsea(), masker)
    assert masker.calls == 0 and path.read_bytes() == before  # a bad file is reported, never overwritten

    class WrongSizeMasker:
        name = "wrong"

        def __call__(self, image):
            return coffee_records

    with pytest.raises(MaskFileError, match="differs from the image's"):
        load_or_make_masks(tmp_path / "chelsea.json", data.chelsea(), WrongSizeMasker())
    assert not (tmp_path / "chelsea.json").exists() and not meta_path(tmp_path / "chelsea.json").exists()
