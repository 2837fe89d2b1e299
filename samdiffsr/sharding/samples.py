"""One image file -> its encoded shard samples (the per-image work a sharding worker does).

An image is loaded (:mod:`samdiffsr.images`), its masks read or made (:mod:`samdiffsr.masks.cache`),
then prepared and tiled (:mod:`samdiffsr.sharding.tiles`) and every tile encoded as the fields of
:mod:`samdiffsr.data.reader` (``hr``, ``lr``, ``seg`` + ``segval`` (absent without mask data) in the job's
encoding, default zstd-compressed ``.npy.zst``, and ``json``). In benchmark mode the whole mod-cropped image is
one sample.

Keys are ``<stem>-<hash>-<y>-<x>`` (benchmark: ``<stem>-<hash>``): ``stem`` is the file's relative path
without extension, every character outside ``[A-Za-z0-9_-]`` replaced by ``_`` and cut to 48 characters;
``hash`` is the first 10 hex digits of the SHA-1 of the relative path, so keys are unique across the
dataset, carry no dots (WebDataset splits the field name at the first dot) and fit a USTAR tar name.

A bad input raises nothing: the result carries ``error`` (the file and the reason) and no samples.
Anything else (a bug, out of memory, a broken SAM checkpoint) propagates and stops the run.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samdiffsr.data.reader import DEFAULT_ENCODING, ENCODINGS, encode_arrays
from samdiffsr.images import ImageError, read_image
from samdiffsr.masks.cache import load_or_make_masks
from samdiffsr.masks.rle import MaskFileError
from samdiffsr.sharding.tiles import TileSpec, iter_tiles, prepare_image

MASKERS = ("sam", "felzenszwalb", "json", "none")


@dataclass(frozen=True)
class MaskSource:
    """Where masks come from.

    ``kind``: ``json`` reads ``<masks_dir>/<relative path with .json>`` (a missing file is a bad input);
    ``sam`` / ``felzenszwalb`` read that JSON if present, else make the masks and save them there (the cache);
    ``none``: samples carry no mask data.
    """

    kind: str = "none"
    masks_dir: str | None = None
    sam_checkpoint: str | None = None
    sam_model_type: str = "vit_h"
    sam_device: str | None = None
    generator: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.kind not in MASKERS:
            raise ValueError(f"unknown mask source {self.kind!r}; choose one of {', '.join(MASKERS)}")
        if self.kind != "none" and not self.masks_dir:
            raise ValueError(f"mask source {self.kind!r} needs a masks folder")
        if self.kind == "sam" and not self.sam_checkpoint:
            raise ValueError("mask source 'sam' needs a SAM checkpoint")

    def json_path(self, relpath: str) -> Path:
        return Path(self.masks_dir or ".") / Path(relpath).with_suffix(".json")

    def build_masker(self):
        """The masker that makes missing JSONs (None for ``json`` and ``none``)."""
        if self.kind == "felzenszwalb":
            from samdiffsr.masks.classical import FelzenszwalbMasker

            return FelzenszwalbMasker()
        if self.kind == "sam":
            from samdiffsr.masks.sam import SamMasker  # imports torch + segment-anything: only when used

            return SamMasker(
                self.sam_checkpoint, self.sam_model_type, device=self.sam_device, **dict(self.generator)
            )
        return None

    def describe(self) -> dict[str, Any]:
        """The settings that decide the samples' content (for the run's fingerprint)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "sam":  # paths are not compared: a moved folder or checkpoint may resume
            out.update(sam_model_type=self.sam_model_type, generator=dict(self.generator))
        return out


@dataclass(frozen=True)
class ImageJob:
    """Everything a worker needs: the image folder, the files in processing order, tiling and masks."""

    images_dir: str
    files: tuple[str, ...]
    spec: TileSpec
    masks: MaskSource
    benchmark: bool = False
    encoding: str = DEFAULT_ENCODING  # samdiffsr.data.reader.ENCODINGS: zstd (default) or npy (format 1)

    def __post_init__(self):
        if self.encoding not in ENCODINGS:
            raise ValueError(f"unknown shard encoding {self.encoding!r}; choose one of {', '.join(ENCODINGS)}")


@dataclass
class ImageResult:
    """One image's outcome: its samples (field -> bytes, with ``__key__``) or why it was skipped."""

    index: int
    file: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, str] | None = None
    note: str | None = None
    num_masks: int = 0
    masker: str = "none"


def sample_key(relpath: str, y: int | None = None, x: int | None = None) -> str:
    """The dataset-unique, dot-free key of a tile (or of a whole image when ``y`` is None)."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", str(Path(relpath).with_suffix("")))[:48]
    digest = hashlib.sha1(relpath.encode("utf-8")).hexdigest()[:10]
    base = f"{stem}-{digest}"
    return base if y is None else f"{base}-{y:05d}-{x:05d}"


class SampleMaker:
    """Turns image indices of an :class:`ImageJob` into :class:`ImageResult` s; builds the masker once."""

    def __init__(self, job: ImageJob):
        self.job = job
        self._masker = None
        self._masker_built = False

    def masker(self):
        if not self._masker_built:
            self._masker = self.job.masks.build_masker()
            self._masker_built = True
        return self._masker

    def process(self, index: int, skip: int = 0) -> ImageResult:
        """Encode image ``index`` of the job, leaving out its first ``skip`` samples (used on resume)."""
        job = self.job
        rel = job.files[index]
        path = Path(job.images_dir) / rel
        result = ImageResult(index=index, file=rel)
        try:
            image, result.note = read_image(path)
        except ImageError as err:
            result.error = {"file": str(path), "reason": err.reason}
            return result
        masks = None
        if job.masks.kind != "none":
            json_path = job.masks.json_path(rel)
            try:
                masks, result.masker = load_or_make_masks(json_path, image, self.masker())
            except MaskFileError as err:
                result.error = {"file": err.path, "reason": err.reason}
                return result
            result.num_masks = int(masks.shape[0])
        scale = job.spec.scale
        if image.shape[0] < scale or image.shape[1] < scale:
            h, w = image.shape[:2]
            result.error = {"file": str(path), "reason": f"image {w}x{h} is smaller than the scale {scale}"}
            return result
        prepared = prepare_image(image, masks, scale)
        meta = {
            "source": rel,
            "image_size": list(prepared.hr.shape[:2]),
            "orig_size": list(image.shape[:2]),
            "scale": scale,
            "num_masks": result.num_masks,
            "masker": result.masker,
        }
        if job.benchmark:
            if not skip:
                result.samples = [self._encode(prepared.hr, prepared.lr, prepared, rel, None, None, meta)]
            return result
        tiles = list(iter_tiles(prepared, job.spec))
        if not tiles:
            h, w = prepared.hr.shape[:2]
            result.error = {"file": str(path), "reason": f"too small for a tile: {w}x{h} after mod-crop, "
                            f"both sides must exceed thresh={job.spec.thresh}"}
            return result
        result.samples = [
            self._encode(t.hr, t.lr, prepared, rel, t.y, t.x, meta, t.labels) for t in tiles[skip:]
        ]
        return result

    def _encode(self, hr, lr, prepared, rel, y, x, meta, labels=None) -> dict[str, Any]:
        whole = y is None
        labels = prepared.labels if whole else labels
        sample = {"__key__": sample_key(rel, y, x),
                  **encode_arrays(hr, lr, labels, prepared.values, encoding=self.job.encoding)}
        info = dict(meta, pos=[0, 0] if whole else [y, x], size=list(hr.shape[:2]), whole_image=whole)
        sample["json"] = json.dumps(info, sort_keys=True).encode("utf-8")
        return sample
