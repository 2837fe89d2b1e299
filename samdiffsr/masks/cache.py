"""Per-image mask cache: read an image's mask JSON, or make it once with a masker and keep it.

The JSON stays a bare amg list, so our files and the authors' released ones are interchangeable. Which
masker made a file is kept in a sidecar ``<name>.json.meta`` (JSON: ``masker``, ``settings``, ``json_sha256``)
written before the mask JSON, both atomically. A rerun that finds the JSON reports the masker recorded for it,
so samples made before and after an interruption carry the same provenance; a JSON without a matching sidecar
(someone else's, or replaced since) is reported as ``"json"``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from samdiffsr.io import atomic_write_bytes
from samdiffsr.masks.rle import MaskFileError, dump_mask_json, parse_mask_json, records_to_masks


class Masker(Protocol):
    """What :func:`load_or_make_masks` calls: RGB uint8 image -> amg records. ``name`` goes in metadata."""

    name: str

    def __call__(self, image: np.ndarray) -> list[dict]: ...


def meta_path(json_path: str | os.PathLike) -> Path:
    """The provenance sidecar of a mask JSON."""
    return Path(f"{os.fspath(json_path)}.meta")


def load_or_make_masks(
    json_path: str | os.PathLike, image: np.ndarray, masker: Masker | None = None
) -> tuple[np.ndarray, str]:
    """Masks of ``image`` (bool K x H x W, file order) and where they came from.

    An existing JSON is read and checked against the image size (a bad one raises, it is never overwritten);
    the source is the masker recorded in its sidecar, or ``"json"``. Otherwise ``masker`` makes the masks,
    they are saved, and the source is ``masker.name``. No JSON and no masker raises :class:`MaskFileError`.
    """
    json_path = Path(json_path)
    hw = tuple(image.shape[:2])
    try:
        data = json_path.read_bytes()
    except FileNotFoundError:
        data = None
    except OSError as err:
        raise MaskFileError(json_path, f"cannot read: {err.strerror or err}") from None
    if data is not None:
        return parse_mask_json(data, json_path, hw), _recorded_masker(json_path, data) or "json"
    if masker is None:
        raise MaskFileError(json_path, "missing mask JSON (and no masker was given to make it)")
    records = masker(image)
    masks = records_to_masks(records, hw, json_path)
    data = dump_mask_json(records)
    meta = {
        "masker": masker.name,
        "settings": getattr(masker, "settings", {}),
        "json_sha256": hashlib.sha256(data).hexdigest(),
    }
    atomic_write_bytes(meta_path(json_path), json.dumps(meta, default=str).encode())
    atomic_write_bytes(json_path, data)
    return masks, masker.name


def _recorded_masker(json_path: Path, data: bytes) -> str | None:
    """The sidecar's masker name if the sidecar describes exactly these JSON bytes."""
    try:
        meta = json.loads(meta_path(json_path).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("json_sha256") != hashlib.sha256(data).hexdigest():
        return None
    name = meta.get("masker")
    return name if isinstance(name, str) else None
