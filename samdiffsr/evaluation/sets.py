"""Benchmark sets: whole-image (HR, LR) pairs from benchmark-format shards or from plain HR folders.

A set is named ``NAME=PATH`` or just ``PATH`` (name: the folder's name). ``PATH`` is a folder of
``.tar`` shards / a shard pattern written by ``make_shards.py --benchmark`` (mod-cropped HR + MATLAB
bicubic LR of the whole image), or a folder of HR images, which get the same treatment on the fly
(mod-crop to the scale, LR = MATLAB bicubic ``imresize(hr, 1/scale)``): both give identical pairs.

Every pair is then cropped top-left to a multiple of ``hr_multiple`` (HR) and ``hr_multiple / scale``
(LR). With ``hr_multiple = 2 * scale`` = 8 for the paper's model this is exactly what the authors' test
loader does before sampling and scoring, so our numbers are comparable with the paper's.
"""

from __future__ import annotations

import glob
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cli import UserError
from ..images import ImageError, find_images, read_image
from ..data.reader import SampleError, read_samples
from ..data.shardlist import expand_shards
from ..data.tarread import TarFormatError
from ..imresize import imresize


class SetError(UserError, ValueError):
    """A benchmark set that cannot be used; the message names the set and the file or sample."""


@dataclass(frozen=True)
class SetSource:
    name: str
    path: str
    kind: str  # "shards" | "folder"


@dataclass
class Pair:
    """One evaluation image: its position in the set, key, HR and LR (uint8 H x W x 3)."""

    index: int
    key: str
    hr: np.ndarray
    lr: np.ndarray


def parse_set(spec: str) -> SetSource:
    """``NAME=PATH`` or ``PATH`` -> SetSource; the kind is detected from what is at ``PATH``."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    if os.path.isdir(path):
        kind = "shards" if glob.glob(os.path.join(path, "*.tar")) else "folder"
        name = name or Path(path).resolve().name
    else:
        try:
            expand_shards(path)
        except FileNotFoundError:
            raise SetError(f"benchmark set {spec!r}: {path} is neither a folder nor matching shards") from None
        kind = "shards"
        name = name or Path(path).parent.resolve().name
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise SetError(f"benchmark set {spec!r}: give it a plain name, NAME=PATH")
    return SetSource(name, path, kind)


def crop_pair(hr: np.ndarray, lr: np.ndarray, scale: int, hr_multiple: int,
              where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check that ``hr`` is ``scale`` x ``lr`` and crop both (top-left) to ``hr_multiple``."""
    if hr.shape[0] != lr.shape[0] * scale or hr.shape[1] != lr.shape[1] * scale:
        raise SetError(f"{where}: HR {hr.shape[:2]} is not x{scale} of LR {lr.shape[:2]} (wrong --scale or set?)")
    h, w = hr.shape[0] - hr.shape[0] % hr_multiple, hr.shape[1] - hr.shape[1] % hr_multiple
    if h == 0 or w == 0:
        raise SetError(f"{where}: image {hr.shape[:2]} is smaller than {hr_multiple} pixels")
    return np.ascontiguousarray(hr[:h, :w]), np.ascontiguousarray(lr[: h // scale, : w // scale])


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


def load_share(source: SetSource, scale: int, hr_multiple: int, rank: int = 0,
               world: int = 1) -> tuple[list[str], list[Pair]]:
    """All keys of the set, in order, and the pairs this rank evaluates (positions ``i % world == rank``)."""
    keys: list[str] = []
    mine: list[Pair] = []
    if source.kind == "folder":
        for i, (key, name) in enumerate(folder_keys(source.path)):
            keys.append(key)
            if i % world != rank:
                continue
            try:
                hr = read_image(Path(source.path) / name)[0]
            except ImageError as exc:
                raise SetError(f"benchmark set {source.name}: {exc}") from exc
            hr, lr = hr_to_pair(hr, scale)
            mine.append(Pair(i, key, *crop_pair(hr, lr, scale, hr_multiple, f"{source.name}/{name}")))
    else:
        try:
            for i, sample in enumerate(read_samples(source.path)):
                keys.append(sample["key"])
                if i % world == rank:
                    where = f"{source.name}/{sample['key']}"
                    mine.append(Pair(i, sample["key"], *crop_pair(sample["hr"], sample["lr"], scale,
                                                                  hr_multiple, where)))
        except (SampleError, TarFormatError, OSError, tarfile.TarError) as exc:
            raise SetError(f"benchmark set {source.name} ({source.path}): {exc}") from exc
    if not keys:
        raise SetError(f"benchmark set {source.name} ({source.path}) holds no images")
    if len(set(keys)) != len(keys):
        raise SetError(f"benchmark set {source.name}: duplicate image keys")
    return keys, mine


def find_sr_file(sr_dir: str | Path, key: str) -> Path:
    """The SR image for an HR key: ``<key>.png``, else any image ``<key>.*`` (as the authors' IQA script)."""
    sr_dir = Path(sr_dir)
    exact = sr_dir / f"{key}.png"
    if exact.is_file():
        return exact
    matches = [p for p in sorted(sr_dir.glob(glob.escape(key) + ".*")) if p.suffix.lower() in
               (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")]
    if not matches:
        raise SetError(f"no SR image for {key!r} in {sr_dir} (expected {exact.name})")
    return matches[0]


def match_sr(sr: np.ndarray, hr: np.ndarray, max_crop: int, where: str) -> np.ndarray:
    """HR cropped to an existing SR's size when the SR was mod-cropped (by < ``max_crop`` per side)."""
    if sr.shape == hr.shape:
        return hr
    dh, dw = hr.shape[0] - sr.shape[0], hr.shape[1] - sr.shape[1]
    if not (0 <= dh < max_crop and 0 <= dw < max_crop):
        raise SetError(f"{where}: SR {sr.shape[:2]} does not match HR {hr.shape[:2]}")
    return np.ascontiguousarray(hr[: sr.shape[0], : sr.shape[1]])


def names(sources: Sequence[SetSource]) -> list[str]:
    """Set names, checked to be unique."""
    out = [s.name for s in sources]
    dup = {n for n in out if out.count(n) > 1}
    if dup:
        raise SetError(f"benchmark sets named more than once: {', '.join(sorted(dup))} (use NAME=PATH)")
    return out
