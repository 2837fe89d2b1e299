"""Benchmark sets on the command line and their SR images: ``NAME=PATH`` specs, unique names, and
matching an existing SR image to its HR pair.

A set is named ``NAME=PATH`` or just ``PATH`` (name: the folder's name); its pairs are loaded by
:func:`samdiffsr.data.pairs.load_share`, cropped top-left to a multiple of ``hr_multiple``. With
``hr_multiple = 2 * scale`` = 8 for the paper's model this is exactly what the authors' test loader does
before sampling and scoring, so our numbers are comparable with the paper's.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from samdiffsr.data.pairs import SetError, SetSource, source_kind
from samdiffsr.data.shardlist import expand_shards
from samdiffsr.images import IMAGE_EXTENSIONS


def parse_set(spec: str) -> SetSource:
    """``NAME=PATH`` or ``PATH`` -> SetSource; the kind is detected from what is at ``PATH``."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    if os.path.isdir(path):
        name = name or Path(path).resolve().name
    else:
        try:
            expand_shards(path)
        except FileNotFoundError:
            raise SetError(f"benchmark set {spec!r}: {path} is neither a folder nor matching shards") from None
        name = name or Path(path).parent.resolve().name
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise SetError(f"benchmark set {spec!r}: give it a plain name, NAME=PATH")
    return SetSource(name, path, source_kind(path))


def find_sr_file(sr_dir: str | Path, key: str) -> Path:
    """The SR image for an HR key: ``<key>.png``, else any image ``<key>.*`` (as the authors' IQA script)."""
    sr_dir = Path(sr_dir)
    exact = sr_dir / f"{key}.png"
    if exact.is_file():
        return exact
    matches = [p for p in sorted(sr_dir.glob(glob.escape(key) + ".*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
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
