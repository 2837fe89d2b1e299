"""Super-resolve uint8 LR images with a loaded model: :class:`SuperResolver` (waves of same-shape tiles; the
Python API is ``SuperResolver.from_pretrained(path).upscale(image)``) and :func:`infer_folder` (folder ->
folder, resumable). The CLI is :mod:`samdiffsr.evaluation.infer_cli`.

Each image has its own generator, seeded from the run seed and its name (:func:`image_seed`), so an output
does not depend on the batch or on which images were already done. LR sizes the UNet cannot take are padded
(edge replicate) and the output cropped back to ``scale x`` the input.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from samdiffsr.cli import UserError
from samdiffsr.evaluation.tiling import TileGrid, lr_multiple, sample_tiled
from samdiffsr.images import ImageError, find_images, read_image
from samdiffsr.io import atomic_write
from samdiffsr.models.diffusion import GaussianDiffusion
from samdiffsr.models.inputs import PRECISION_DTYPES, to_uint8
from samdiffsr.models.loading import LoadedModel, load_model
from samdiffsr.models.samplers import resolve_sampler
from samdiffsr.progress import progress_bar


class InferenceError(UserError, RuntimeError):
    """A user-facing problem with inference inputs or settings."""


def image_seed(seed: int, key: str) -> int:
    """The per-image seed: a pure function of the run seed and the image's name."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class SamplerSettings:
    """How images are sampled; everything that changes an output is here (batch and device are not)."""

    steps: int | None = None  # None: all T steps (DDPM); fewer: respaced DDIM (or ``sampler``)
    eta: float = 0.0
    sampler: str | None = None  # one of models.samplers.SAMPLERS; None: ddpm, or ddim when steps < T
    seed: int = 0
    tile: int = 0  # LR pixels; 0 = whole images
    overlap: int = 16  # LR pixels
    precision: str = "fp32"
    batch: int = 1  # images (or tiles) per network call
    progress_steps: bool = False  # an inner progress bar over the denoising steps

    def identity(self) -> dict[str, Any]:
        """The settings that determine the results (for resume checks)."""
        identity = {"steps": self.steps, "eta": self.eta, "seed": self.seed, "tile": self.tile,
                    "overlap": self.overlap if self.tile > 0 else None, "precision": self.precision}
        if self.sampler is not None:  # absent for the default, so results written before it still resume
            identity["sampler"] = self.sampler
        return identity


@dataclass
class SuperResolver:
    """Samples SR images from uint8 LR arrays with a loaded model, in waves of same-shape tiles."""

    loaded: LoadedModel
    settings: SamplerSettings = field(default_factory=SamplerSettings)

    def __post_init__(self) -> None:
        if self.settings.precision not in PRECISION_DTYPES:
            raise InferenceError(f"precision must be one of {', '.join(PRECISION_DTYPES)}, "
                                 f"got {self.settings.precision}")
        if self.settings.precision == "fp16" and self.device.type == "cpu":
            raise InferenceError("fp16 needs a GPU; use fp32 or bf16 on CPU")
        if self.settings.tile > 0 and not 0 <= self.settings.overlap < self.settings.tile:
            raise InferenceError(f"--overlap must be in [0, tile), got {self.settings.overlap}")
        try:  # refused here, before any image is read, rather than mid-run with a traceback
            resolve_sampler(self.settings.sampler, self.settings.steps, self.model.num_timesteps)
        except ValueError as exc:
            raise InferenceError(f"--sampler/--steps: {exc}") from None

    @property
    def model(self) -> GaussianDiffusion:
        return self.loaded.model

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def scale(self) -> int:
        return self.loaded.config.model.sr_scale

    def _padded(self, hw: tuple[int, int]) -> tuple[int, int]:
        m = lr_multiple(self.model.cfg)
        return hw[0] + -hw[0] % m, hw[1] + -hw[1] % m

    def plan_waves(self, sizes: Sequence[tuple[int, int]]) -> list[list[int]]:
        """Indices of images sampled together: same tile shape, about ``batch`` tiles per wave.

        An image with more tiles than ``batch`` is a wave of its own (its tiles still go ``batch`` at a
        time); images are never split across waves.
        """
        s = self.settings
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, hw in enumerate(sizes):
            grid = TileGrid(self._padded(hw), s.tile, s.overlap, self.scale, lr_multiple(self.model.cfg))
            groups.setdefault(grid.tile_lr, []).append((i, len(grid)))
        waves: list[list[int]] = []
        for shape in sorted(groups):
            wave: list[int] = []
            tiles = 0
            for i, n in groups[shape]:
                if wave and tiles + n > s.batch:
                    waves.append(wave)
                    wave, tiles = [], 0
                wave.append(i)
                tiles += n
            if wave:
                waves.append(wave)
        return waves

    def sample(self, lrs: Sequence[np.ndarray], keys: Sequence[str]) -> list[np.ndarray]:
        """SR uint8 images for one wave of LR uint8 images; ``keys`` name them (they seed the noise)."""
        s, scale = self.settings, self.scale
        inputs = [self.loaded.inputs(lr, lr_multiple(self.model.cfg)) for lr in lrs]
        gens = [torch.Generator().manual_seed(image_seed(s.seed, k)) for k in keys]
        srs = sample_tiled(self.model, [a for a, _ in inputs], [b for _, b in inputs], gens,
                           steps=s.steps, eta=s.eta, sampler=s.sampler, tile=s.tile, overlap=s.overlap,
                           batch=s.batch, dtype=PRECISION_DTYPES[s.precision], progress=s.progress_steps)
        return [to_uint8(sr[0, :, :lr.shape[0] * scale, :lr.shape[1] * scale]) for sr, lr in zip(srs, lrs, strict=True)]

    def run(self, items: Sequence[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(key, sr)`` for ``(key, lr)`` items, wave by wave (not in input order)."""
        for wave in self.plan_waves([lr.shape[:2] for _, lr in items]):
            srs = self.sample([items[i][1] for i in wave], [items[i][0] for i in wave])
            yield from zip([items[i][0] for i in wave], srs, strict=True)

    @classmethod
    def from_pretrained(cls, path: str | Path, config: str | Path | None = None, overrides: Sequence[str] = (),
                        device: str | torch.device | None = None, *, prefer_ema: bool = True,
                        lr_up_divisor: float | None = None, **settings: Any) -> SuperResolver:
        """A resolver for a weights file: ours (``weights/latest.pt``, its own config) or the authors' ``.ckpt``.

        ``config``: a YAML path or a shipped config's name (e.g. ``authors_samdiffsr_df2k4x``); default: the
        config saved in the file, else the paper's model. ``settings`` are :class:`SamplerSettings` fields
        (``steps``, ``sampler``, ``eta``, ``seed``, ``tile``, ``overlap``, ``batch``, ``precision``). The
        bicubic divisor comes from the weights, as in the command lines (``lr_up_divisor`` overrides).
        """
        unknown = sorted(set(settings) - set(SamplerSettings.__dataclass_fields__))
        if unknown:
            raise InferenceError(f"unknown sampler setting(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(SamplerSettings.__dataclass_fields__)}")
        loaded = load_model(path, config, overrides=overrides, device=device, prefer_ema=prefer_ema,
                            lr_up_divisor=lr_up_divisor)
        return cls(loaded, SamplerSettings(**settings))

    def upscale(self, image: Any, key: str = "image") -> np.ndarray:
        """The SR image (H*scale x W*scale x 3 uint8) of a PIL image or an H x W x 3 uint8 array.

        ``key`` seeds the noise together with ``seed`` (the CLI uses the file name): the same image, key and
        settings give the same output.
        """
        return self.sample([as_rgb_uint8(image)], [key])[0]


def as_rgb_uint8(image: Any) -> np.ndarray:
    """An H x W x 3 uint8 array from a PIL image (any mode) or an H x W x 3 (or H x W) uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise InferenceError(f"expected a PIL image or a uint8 array, got a {array.dtype} array "
                             "(convert floats with (x * 255).round().clip(0, 255).astype(np.uint8))")
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise InferenceError(f"expected an H x W x 3 RGB array, got shape {array.shape}")
    return np.ascontiguousarray(array)


def save_png(path: Path, img: np.ndarray) -> None:
    """Write an RGB uint8 PNG atomically (a crash never leaves a half-written output that counts as done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))


def _header_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size[1], img.size[0]


def infer_folder(loaded: LoadedModel, img_dir: str | Path, save_dir: str | Path,
                 settings: SamplerSettings, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Super-resolve every image under ``img_dir`` into ``save_dir/<relative path>.png``.

    Outputs that exist are skipped unless ``overwrite``. Unreadable images are reported (path and
    reason) in the returned summary's ``failed`` and do not stop the others.
    """
    img_dir, save_dir = Path(img_dir), Path(save_dir)
    names, _ = find_images(img_dir)
    if not names:
        raise InferenceError(f"no images (png/jpg/bmp/tif/webp) found under {img_dir}")
    out_of = {n: save_dir / Path(n).with_suffix(".png") for n in names}
    todo = [n for n in names if overwrite or not out_of[n].exists()]
    skipped = len(names) - len(todo)
    failed: list[tuple[str, str]] = []
    sizes: dict[str, tuple[int, int]] = {}
    for n in todo:
        try:
            sizes[n] = _header_size(img_dir / n)
        except Exception as exc:  # Pillow raises many types for non-images
            failed.append((str(img_dir / n), f"cannot read image header ({type(exc).__name__}: {exc})"))
    todo = [n for n in todo if n in sizes]
    resolver = SuperResolver(loaded, settings)
    start = time.perf_counter()
    bar = progress_bar(total=len(todo), desc="super-resolving", unit="img", disable=not progress)
    done = 0
    for wave in resolver.plan_waves([sizes[n] for n in todo]):
        items = []
        for i in wave:
            try:
                items.append((todo[i], read_image(img_dir / todo[i])[0]))
            except ImageError as exc:
                failed.append((exc.path, exc.reason))
                bar.update(1)
        if items:
            for key, sr in zip([k for k, _ in items], resolver.sample([lr for _, lr in items],
                                                                       [k for k, _ in items]), strict=True):
                save_png(out_of[key], sr)
                done += 1
                bar.update(1)
    bar.close()
    return {"done": done, "skipped": skipped,
            "failed": failed, "seconds": time.perf_counter() - start, "save_dir": str(save_dir)}
