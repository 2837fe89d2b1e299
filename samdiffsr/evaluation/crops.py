"""The crops of the HTML report: the same square of every image as LR (nearest), each row's SR and HR.

Per image of a set, ``<out>/crops/<set>/<key>/`` holds ``lr.png``, ``hr.png`` and ``row-<label>.png`` (the crop
at full size), a ``.thumb.png`` beside each (:data:`THUMB` pixels square) and a ``.json`` with the box,
the thumbnail's size and the whole image's PSNR-Y (BasicSR protocol, border = scale) against HR. The box is
chosen from the HR image alone (the square with the most detail), so every row shows the same pixels.
Written by the sweep as each image is scored (``--html-crops`` or ``--save-images``); read by
:mod:`samdiffsr.evaluation.html_report`. Names in paths are URL-quoted as in :mod:`samdiffsr.evaluation.results`.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from samdiffsr.evaluation import metrics as pixel
from samdiffsr.io import atomic_write, atomic_write_text

THUMB = 128  # thumbnail width (and height) in pixels
DEFAULT_CROP = 256  # crop side in HR pixels
LR_NAME, HR_NAME = "lr", "hr"


def crop_folder(out: str | Path, set_name: str, key: str) -> Path:
    q = urllib.parse.quote
    return Path(out) / "crops" / q(set_name, safe="") / q(key, safe="")


def row_name(label: str) -> str:
    """The file stem of a row's crop (``lr`` / ``hr`` stay free for the references)."""
    return "row-" + urllib.parse.quote(label, safe="")


def crop_box(hr: np.ndarray, size: int, scale: int) -> tuple[int, int, int]:
    """(top, left, side) of the square with the largest luma gradient energy, aligned to ``scale``.

    The side is ``size`` (or the image's shorter side) rounded down to a multiple of ``scale``; candidate
    corners lie on a grid of a quarter side, so the search is cheap at any image size.
    """
    h, w = hr.shape[:2]
    side = max(scale, min(size, h, w) // scale * scale)
    y = pixel.rgb_to_y(hr).astype(np.float64)
    energy = np.zeros((h, w))
    energy[:, 1:] += np.abs(np.diff(y, axis=1))
    energy[1:, :] += np.abs(np.diff(y, axis=0))
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    stride = max(scale, side // 4 // scale * scale)
    tops = sorted({*range(0, h - side + 1, stride), (h - side) // scale * scale})
    lefts = sorted({*range(0, w - side + 1, stride), (w - side) // scale * scale})
    best, box = -1.0, (0, 0, side)
    for t in tops:
        for left in lefts:
            total = (integral[t + side, left + side] - integral[t, left + side]
                     - integral[t + side, left] + integral[t, left])
            if total > best:
                best, box = total, (t, left, side)
    return box


def _nearest_up(lr: np.ndarray, scale: int, shape: tuple[int, ...]) -> np.ndarray:
    up = np.repeat(np.repeat(lr, scale, axis=0), scale, axis=1)
    return np.ascontiguousarray(up[: shape[0], : shape[1]])


def write_crop(folder: Path, stem: str, img: np.ndarray, box: tuple[int, int, int], info: dict[str, Any]) -> None:
    """``stem.png`` (the box of ``img``), ``stem.thumb.png`` and ``stem.json``; each written atomically."""
    top, left, side = box
    crop = Image.fromarray(np.ascontiguousarray(img[top : top + side, left : left + side]))
    # Exactly THUMB pixels, shown at that size: small crops grow by pixel repetition (true pixels, no blur).
    thumb = crop if side == THUMB else crop.resize((THUMB, THUMB), Image.NEAREST if side < THUMB else Image.LANCZOS)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"{stem}.png", lambda tmp: crop.save(tmp, format="PNG"))
    atomic_write(folder / f"{stem}.thumb.png", lambda tmp: thumb.save(tmp, format="PNG"))
    meta = {**info, "box": list(box), "thumb": list(thumb.size)}
    atomic_write_text(folder / f"{stem}.json", json.dumps(meta))


def save_crops(out: str | Path, set_name: str, key: str, label: str, sr: np.ndarray, hr: np.ndarray,
               lr: np.ndarray | None, scale: int, size: int = DEFAULT_CROP) -> None:
    """One row's crop of an image, and the LR / HR crops of that image the first time it is seen.

    ``lr`` None (existing SR images, whose LR is unknown) writes no LR crop.
    """
    folder = crop_folder(out, set_name, key)
    box = crop_box(hr, size, scale)
    if lr is not None and not (folder / f"{LR_NAME}.json").is_file():
        up = _nearest_up(lr, scale, hr.shape)
        if up.shape == hr.shape:
            write_crop(folder, LR_NAME, up, box, {"psnr_y": pixel.psnr_y(up, hr, scale)})
    if not (folder / f"{HR_NAME}.json").is_file():
        write_crop(folder, HR_NAME, hr, box, {})
    write_crop(folder, row_name(label), sr, box, {"psnr_y": pixel.psnr_y(sr, hr, scale)})


def read_crop(folder: Path, stem: str) -> dict[str, Any] | None:
    """A crop's metadata, with the file names of the crop and its thumbnail; None when it was not written."""
    try:
        meta = json.loads((folder / f"{stem}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not (folder / f"{stem}.png").is_file() or not (folder / f"{stem}.thumb.png").is_file():
        return None
    return {**meta, "full": folder / f"{stem}.png", "thumb_file": folder / f"{stem}.thumb.png"}
