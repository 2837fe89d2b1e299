"""Held-out image pairs, for validation during training and for benchmark sets: whole-image (HR, LR) pairs
from benchmark-format shards or from a folder of HR images.

A source is a folder of ``.tar`` shards or a shard pattern written by ``make_shards.py --benchmark``
(mod-cropped HR + MATLAB bicubic LR of the whole image), or a folder of HR images, which get the same
treatment on the fly (mod-crop to the scale, LR = MATLAB bicubic ``imresize(hr, 1/scale)``): both give
identical pairs.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samdiffsr.cli import UserError
from samdiffsr.data.reader import SampleError, read_samples
from samdiffsr.data.tarread import TarFormatError
from samdiffsr.images import ImageError, find_images, read_image
from samdiffsr.imresize import imresize


class SetError(UserError, ValueError):
    """A held-out set that cannot be used; the message names the set and the file or sample."""


@dataclass(frozen=True)
class SetSource:
    name: str
    path: str
    kind: str  # "shards" | "folder"


@dataclass
class Pair:
    """One held-out image: its position in the set, key, HR and LR (uint8 H x W x 3), and the mask of a
    shard sample (float32 H x W; None for a folder image, and for benchmark pairs, which do not use it)."""

    index: int
    key: str
    hr: np.ndarray
    lr: np.ndarray
    mask: np.ndarray | None = None


def source_kind(path: str) -> str:
    """``"folder"`` for a folder of HR images (no ``.tar`` files in it), else ``"shards"``."""
    if os.path.isdir(path) and not glob.glob(os.path.join(path, "*.tar")):
        return "folder"
    return "shards"


def crop_pair(hr: np.ndarray, lr: np.ndarray, scale: int, hr_multiple: int,
              where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check that ``hr`` is ``scale`` x ``lr`` and crop both (top-left) to ``hr_multiple``."""
    if hr.shape[0] != lr.shape[0] * scale or hr.shape[1] != lr.shape[1] * scale:
        raise SetError(f"{where}: HR {hr.shape[:2]} is not x{scale} of LR {lr.shape[:2]} (wrong --scale or set?)")
    h, w = hr.shape[0] - hr.shape[0] % hr_multiple, hr.shape[1] - hr.shape[1] % hr_multiple
    if h == 0 or w == 0:
        raise SetError(f"{where}: image {hr.shape[:2]} is smaller than {hr_multiple} pixels")
    return np.ascontiguousarray(hr[:h, :w]), np.ascontiguousarray(lr[: h // scale, : w // scale])


def centre_box(height: int, width: int, size: int, scale: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the central ``size`` x ``size`` HR region (at most), on the ``scale`` grid
    so that the LR region is ``top // scale`` ... exactly."""
    h, w = min(height, size) // scale * scale, min(width, size) // scale * scale
    return (height - h) // 2 // scale * scale, (width - w) // 2 // scale * scale, h, w


def hr_to_pair(hr: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """Mod-crop an HR image to ``scale`` and make its LR with MATLAB bicubic, as make_shards does."""
    h, w = hr.shape[0] - hr.shape[0] % scale, hr.shape[1] - hr.shape[1] % scale
    hr = np.ascontiguousarray(hr[:h, :w])
    return hr, imresize(hr, 1 / scale)


def folder_keys(path: str) -> list[tuple[str, str]]:
    """(key, relative file) of the images of a folder; the key is the relative path without extension."""
    names, _ = find_images(path)
    keys = [(str(Path(n).with_suffix("")), n) for n in names]
    seen: dict[str, str] = {}
    for key, name in keys:
        if key in seen:
            raise SetError(f"{path}: {seen[key]} and {name} have the same name; keep one")
        seen[key] = name
    return keys


def _everything(index: int) -> bool:
    return True


def read_pairs(path: str, kind: str, scale: int, wanted: Callable[[int], bool] = _everything,
               what: str = "image") -> Iterator[tuple[str, str, Pair | None]]:
    """``(key, name, pair)`` for every image of a set, in order: ``name`` is the file (relative to the
    folder) or the sample key; ``pair`` is None where ``wanted(index)`` is false (a folder image is then
    not read). A folder image smaller than ``scale`` raises ``SetError("{what} FILE is smaller ...")``.
    """
    if kind == "folder":
        for i, (key, name) in enumerate(folder_keys(path)):
            if not wanted(i):
                yield key, name, None
                continue
            file = Path(path) / name
            hr = read_image(file)[0]
            if hr.shape[0] < scale or hr.shape[1] < scale:
                raise SetError(f"{what} {file} is smaller than the scale {scale}")
            yield key, name, Pair(i, key, *hr_to_pair(hr, scale))
        return
    for i, sample in enumerate(read_samples(path)):
        key = sample["key"]
        yield key, key, (Pair(i, key, sample["hr"], sample["lr"], sample["mask"]) if wanted(i) else None)


def load_share(source: SetSource, scale: int, hr_multiple: int, rank: int = 0,
               world: int = 1) -> tuple[list[str], list[Pair]]:
    """All keys of the set, in order, and the pairs this rank evaluates (positions ``i % world == rank``),
    cropped top-left to a multiple of ``hr_multiple`` (HR) and ``hr_multiple / scale`` (LR)."""
    keys: list[str] = []
    mine: list[Pair] = []
    # Folder images are read one by one (an unusable one names the set); a shard's errors name its path.
    errors = (ImageError,) if source.kind == "folder" else (SampleError, TarFormatError, OSError, tarfile.TarError)
    where = f"benchmark set {source.name}" + ("" if source.kind == "folder" else f" ({source.path})")
    try:
        for key, name, pair in read_pairs(source.path, source.kind, scale, lambda i: i % world == rank,
                                          f"benchmark set {source.name}: image"):
            keys.append(key)
            if pair is not None:
                hr, lr = crop_pair(pair.hr, pair.lr, scale, hr_multiple, f"{source.name}/{name}")
                mine.append(Pair(pair.index, key, hr, lr))
    except errors as exc:
        raise SetError(f"{where}: {exc}") from exc
    if not keys:
        raise SetError(f"benchmark set {source.name} ({source.path}) holds no images")
    if len(set(keys)) != len(keys):
        raise SetError(f"benchmark set {source.name}: duplicate image keys")
    return keys, mine


def _as_batch(pair: Pair) -> dict[str, Any]:
    mask = pair.mask if pair.mask is not None else np.zeros(pair.hr.shape[:2], np.float32)
    return {
        "key": pair.key,
        "index": pair.index,
        "hr": torch.from_numpy(np.array(pair.hr)).permute(2, 0, 1)[None],
        "lr": torch.from_numpy(np.array(pair.lr)).permute(2, 0, 1)[None],
        "mask": torch.from_numpy(np.array(mask, np.float32))[None, None],
    }


def load_val_images(source: str, limit: int, scale: int, rank: int = 0, world: int = 1) -> list[dict[str, Any]]:
    """This rank's share (positions ``i % world == rank``) of the first ``limit`` images (all when
    ``limit <= 0``) of ``source``, as batches of one, in a fixed order; a folder image outside the share is
    not read.

    Each in the training stream's layout (``hr`` 1 x 3 x H x W uint8, ``lr`` 1 x 3 x H/s x W/s uint8,
    ``mask`` 1 x 1 x H x W float32, plus ``key`` and ``index``, the position in the set), so
    `models.inputs.to_model_inputs` applies unchanged. Folder images have an all-zero mask (masks only shape
    the training noise).
    """
    kind = source_kind(source)
    out, seen = [], 0
    images = read_pairs(source, kind, scale, lambda i: i % world == rank, what="validation image")
    for _, _, pair in islice(images, limit if limit > 0 else None):
        seen += 1
        if pair is None:
            continue
        if pair.hr.shape[0] != pair.lr.shape[0] * scale:
            raise ValueError(f"validation sample {pair.key} is not a x{scale} pair")
        out.append(_as_batch(pair))
    if kind == "folder" and not seen:
        raise FileNotFoundError(f"no shards (*.tar) in folder {source}")
    return out
