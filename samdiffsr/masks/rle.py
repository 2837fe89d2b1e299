"""SAM mask files: the COCO-RLE JSON that segment-anything's ``scripts/amg.py --convert-to-rle`` writes.

One file per image, a bare JSON list with one record per mask, in the generator's order::

    {"segmentation": {"size": [h, w], "counts": "<COCO compressed RLE>"}, "area": int,
     "bbox": [x, y, w, h], "predicted_iou": float, "point_coords": [[x, y]],
     "stability_score": float, "crop_box": [x, y, w, h]}

The authors of SAM-DiffSR released their DF2K masks in exactly this format (they ran amg.py), so their files
are read as they are. Only ``segmentation`` is needed to decode; uncompressed RLE (list ``counts``, amg's
``uncompressed_rle`` mode) is accepted too. Every defect is reported as a :class:`MaskFileError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from samdiffsr.io import FileProblem, atomic_write_bytes

# A COCO RLE count is at most 6 chunks of 5 bits: pycocotools shifts an int by 5*k, overflowing beyond that.
_MAX_CHUNKS = 6
_AMG_FIELDS = ("predicted_iou", "point_coords", "stability_score", "crop_box")


class MaskFileError(FileProblem, ValueError):
    """A mask JSON that cannot be used: ``path`` names the file, ``reason`` says why."""


def read_mask_json(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a mask JSON into a bool array K x H x W in file order.

    ``expected_hw`` is the image's (H, W); every mask must have that size. A file with no masks gives shape
    (0, H, W), or (0, 0, 0) when ``expected_hw`` is None.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MaskFileError(path, "missing mask JSON") from None
    except OSError as err:
        raise MaskFileError(path, f"cannot read: {err.strerror or err}") from None
    return parse_mask_json(data, path, expected_hw)


def parse_mask_json(
    data: bytes, path: str | os.PathLike, expected_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Like :func:`read_mask_json` for the file's bytes; ``path`` only names the file in errors."""
    try:
        records = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = "empty file" if not data.strip() else f"invalid JSON ({err})"
        raise MaskFileError(path, reason) from None
    return records_to_masks(records, expected_hw, path)


def records_to_masks(
    records: Any, expected_hw: tuple[int, int] | None = None, path: str | os.PathLike = "<records>"
) -> np.ndarray:
    """Validate and decode amg records (a list of dicts) into a bool array K x H x W."""
    if not isinstance(records, list):
        raise MaskFileError(path, f"expected a JSON list of mask records, got {type(records).__name__}")
    rles, hw = [], expected_hw
    for index, record in enumerate(records):
        rle = _checked_rle(record, path, index)
        size = tuple(rle["size"])
        if hw is not None and size != tuple(hw):
            what = "the image's" if expected_hw is not None else "record 0's"
            raise MaskFileError(
                path, f"record {index}: mask size {size[0]}x{size[1]} differs from {what} {hw[0]}x{hw[1]}"
            )
        hw = size
        rles.append(rle)
    if hw is None:
        return np.zeros((0, 0, 0), dtype=bool)
    masks = np.empty((len(rles), *hw), dtype=bool)
    for index, rle in enumerate(rles):
        try:
            masks[index] = mask_utils.decode(rle)
        except Exception as err:  # pycocotools raises bare ValueError/TypeError on malformed RLE
            raise MaskFileError(path, f"record {index}: corrupt RLE ({err})") from None
    return masks


def masks_to_records(masks: np.ndarray, **per_mask_fields: Sequence) -> list[dict]:
    """Encode bool masks K x H x W as amg records (RLE, area, bbox), plus one value per mask for each field.

    ``bbox`` follows SAM's convention: [x0, y0, x1 - x0, y1 - y0] with x1, y1 the last pixel inside the mask
    (one less than the COCO pixel extent), [0, 0, 0, 0] for an empty mask. Fields come in amg's order.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.dtype != bool:
        raise ValueError(f"masks must be a bool array K x H x W, got {masks.dtype} {masks.shape}")
    count = masks.shape[0]
    for name, values in per_mask_fields.items():
        if len(values) != count:
            raise ValueError(f"field {name!r} has {len(values)} values for {count} masks")
    records = []
    for start in range(0, count, 32):  # chunks bound the Fortran-order copy pycocotools needs
        chunk = np.asfortranarray(masks[start : start + 32].transpose(1, 2, 0), dtype=np.uint8)
        for offset, rle in enumerate(mask_utils.encode(chunk)):
            records.append(_record(masks[start + offset], rle))
    ordered = [name for name in _AMG_FIELDS if name in per_mask_fields]
    ordered += [name for name in per_mask_fields if name not in _AMG_FIELDS]
    for index, record in enumerate(records):
        for name in ordered:
            record[name] = _plain(per_mask_fields[name][index])
    return records


def dump_mask_json(records: list[dict]) -> bytes:
    """Serialise records as amg does (``json.dump`` of the list), numpy scalars and arrays included."""
    return json.dumps(records, default=_plain_or_fail).encode()


def write_mask_json(path: str | os.PathLike, records: list[dict]) -> None:
    """Write records as a mask JSON atomically: a crash leaves the old file or none, never half a file."""
    atomic_write_bytes(path, dump_mask_json(records))


def _checked_rle(record: Any, path, index: int) -> dict:
    """The record's RLE as pycocotools wants it, after checking that its counts tile the image exactly."""
    where = f"record {index}"
    if not isinstance(record, dict) or not isinstance(record.get("segmentation"), dict):
        raise MaskFileError(path, f"{where} has no 'segmentation' RLE")
    seg = record["segmentation"]
    size, counts = seg.get("size"), seg.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and v > 0 for v in size)):
        raise MaskFileError(path, f"{where}: segmentation size must be [height, width], got {size!r}")
    h, w = size
    if isinstance(counts, str):
        runs = _string_counts(counts)
    elif isinstance(counts, list) and all(type(v) is int for v in counts):
        runs = np.asarray(counts, dtype=np.int64)
    else:
        raise MaskFileError(path, f"{where}: RLE counts must be a string or a list of integers")
    # pycocotools writes past its buffer or returns uninitialised pixels unless the runs sum to h*w.
    if runs is None or len(runs) == 0 or runs.min() < 0 or runs.sum() != h * w:
        raise MaskFileError(path, f"{where}: corrupt RLE counts (runs do not cover the {h}x{w} mask)")
    area = record.get("area")
    if isinstance(area, int | float) and not isinstance(area, bool) and area != runs[1::2].sum():
        held = int(runs[1::2].sum())
        raise MaskFileError(path, f"{where}: corrupt RLE (area {area} but the counts hold {held})")
    if isinstance(counts, str):
        return {"size": [h, w], "counts": counts.encode("ascii")}
    return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)


def _string_counts(counts: str) -> np.ndarray | None:
    """Run lengths of a COCO compressed RLE string (pycocotools' rleFrString), or None if malformed.

    Each run is a little-endian group of 5-bit chunks in characters '0'..'o'; bit 0x20 continues the group,
    bit 0x10 of its last chunk makes it negative; from the fourth run on it is a delta to the run two back.
    """
    if not counts.isascii():
        return None
    chars = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if chars.size == 0 or chars.min() < 0 or chars.max() > 63 or chars[-1] & 0x20:
        return None
    ends = np.flatnonzero((chars & 0x20) == 0)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_CHUNKS:
        return None
    group = np.repeat(np.arange(len(ends)), lengths)
    shift = 5 * (np.arange(chars.size) - starts[group])
    values = np.bincount(group, weights=(chars & 0x1F) << shift, minlength=len(ends)).astype(np.int64)
    negative = (chars[ends] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * lengths[negative])
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])  # run m = value m + run m-2, for m >= 3
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def _record(mask: np.ndarray, rle: dict) -> dict:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size:
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0]), int(rows[-1] - rows[0])]
    else:
        bbox = [0, 0, 0, 0]
    return {
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": int(mask.sum()),
        "bbox": bbox,
    }


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as plain Python values, so records serialise like amg's."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _plain_or_fail(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"mask record value of type {type(value).__name__} is not JSON serialisable")
