"""Super-resolve LR images with a trained SAM-DiffSR model: ``python launcher/infer.py``.

    python launcher/infer.py --ckpt runs/x/weights/latest.pt --img-dir LR --save-dir SR
    python launcher/infer.py --config configs/samdiffsr_df2k4x.yaml --ckpt model_ckpt_steps_400000.ckpt \\
        --img-dir LR --save-dir SR --steps 25 --tile 64 --batch 8 --precision bf16

Reads our weights files (their embedded config is used when ``--config`` is not given) and the authors'
released checkpoint layout. Images of the same size (or tiles of the same size, with ``--tile``) are
sampled together, ``--batch`` per network call; see :mod:`samdiffsr.evaluation.tiling`. Each image has its
own generator, seeded from ``--seed`` and its file name (:func:`image_seed`), so an output does not depend
on the batch or on which images were already done: the command is resumable (existing outputs are
skipped) and reruns reproduce it. LR sizes the UNet cannot take are padded (edge replicate) and the
output cropped back to ``scale x`` the input.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..cli import ArgumentParser, UserError, run_cli
from ..config import Config, config_from_dict, deep_merge, load_config, parse_override
from ..images import ImageError, find_images, read_image
from ..imresize import imresize_torch
from ..models.diffusion import GaussianDiffusion, build_model
from ..models.samplers import SAMPLERS
from ..models.weights import extract_state_dict, load_state_strict
from ..models.weights import read_checkpoint as read_weights_file
from .tiling import TileGrid, lr_multiple, sample_tiled

AUTHORS_LR_UP_DIVISOR = 256.0  # what the authors' released weights were trained with
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class InferenceError(UserError, RuntimeError):
    """A user-facing problem with inference inputs or settings."""


# ----------------------------------------------------------------------------------------- model


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when a GPU is there (one process per GPU under torchrun/deepspeed/srun), else CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint as plain data (tensors and containers only; no code is unpickled)."""
    return read_weights_file(path)


@dataclass
class LoadedModel:
    """A model ready to sample, with where it came from."""

    model: GaussianDiffusion
    config: Config
    info: dict[str, Any]  # layout, step, ema, path (see models.weights)
    lr_up_divisor: float


def resolve_config(ckpt: dict[str, Any], config: str | Path | Config | None,
                   overrides: Sequence[str] = ()) -> Config:
    """``config`` (a path or Config) if given, else the config embedded in our weights, else defaults
    (the paper's model); ``key=value`` overrides apply on top."""
    if isinstance(config, Config):
        return config
    if config:
        return load_config(config, overrides)
    embedded = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(embedded, dict):
        return load_config(None, overrides)
    for text in overrides:
        embedded = deep_merge(embedded, parse_override(text))
    return config_from_dict(embedded)


def load_model(ckpt_path: str | Path, config: str | Path | Config | None = None, *,
               overrides: Sequence[str] = (), device: str | torch.device | None = None,
               prefer_ema: bool = True, lr_up_divisor: float | None = None) -> LoadedModel:
    """Build the model for a checkpoint (ours or the authors') and load its weights strictly.

    ``lr_up_divisor`` None: 256 for the authors' checkpoint layout (their weights were trained so),
    otherwise the config's ``model.lr_up_divisor``.
    """
    ckpt = read_checkpoint(ckpt_path)
    cfg = resolve_config(ckpt, config, overrides)
    state, info = extract_state_dict(ckpt, ckpt_path, prefer_ema)
    model = build_model(cfg.model)
    load_state_strict(model, state, str(ckpt_path))
    if lr_up_divisor is None:
        lr_up_divisor = AUTHORS_LR_UP_DIVISOR if info["layout"] == "authors" else cfg.model.lr_up_divisor
    device = torch.device(device) if device is not None else default_device()
    return LoadedModel(model.to(device).eval(), cfg, info, float(lr_up_divisor))


# ------------------------------------------------------------------------------------- sampling


def image_seed(seed: int, key: str) -> int:
    """The per-image seed: a pure function of the run seed and the image's name."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def prepare_lr(lr: np.ndarray, scale: int, lr_up_divisor: float, multiple: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 H x W x 3 LR -> (img_lr, img_lr_up) in [-1, 1], padded to a multiple of ``multiple``.

    The same mapping as the training stream (``data.stream.to_model_inputs``): x / 255 for the LR, MATLAB
    bicubic x``scale`` of ``lr / lr_up_divisor`` for the upsampled one.
    """
    if lr.dtype != np.uint8 or lr.ndim != 3 or lr.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 LR image, got {lr.dtype} {lr.shape}")
    t = torch.from_numpy(np.array(lr)).permute(2, 0, 1)[None].to(device).float()  # a copy: PIL arrays are read-only
    pad_h, pad_w = -t.shape[2] % multiple, -t.shape[3] % multiple
    if pad_h or pad_w:
        t = F.pad(t, (0, pad_w, 0, pad_h), mode="replicate")
    img_lr = t.div(255).sub(0.5).div(0.5)
    img_lr_up = imresize_torch(t / lr_up_divisor, scale=scale).sub(0.5).div(0.5)
    return img_lr, img_lr_up


def to_uint8(sr: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> uint8 H x W x 3, rounded as the authors' ``tensor2img``."""
    img = ((sr.float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255)
    return img[0].permute(1, 2, 0).to(torch.uint8).cpu().numpy()


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
        if self.settings.precision not in PRECISIONS:
            raise InferenceError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.settings.precision}")
        if self.settings.precision == "fp16" and self.device.type == "cpu":
            raise InferenceError("fp16 needs a GPU; use fp32 or bf16 on CPU")
        if self.settings.tile > 0 and not 0 <= self.settings.overlap < self.settings.tile:
            raise InferenceError(f"--overlap must be in [0, tile), got {self.settings.overlap}")

    @property
    def model(self) -> GaussianDiffusion:
        return self.loaded.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
        s, device, scale = self.settings, self.device, self.scale
        inputs = [prepare_lr(lr, scale, self.loaded.lr_up_divisor, lr_multiple(self.model.cfg), device)
                  for lr in lrs]
        gens = [torch.Generator().manual_seed(image_seed(s.seed, k)) for k in keys]
        srs = sample_tiled(self.model, [a for a, _ in inputs], [b for _, b in inputs], gens,
                           steps=s.steps, eta=s.eta, sampler=s.sampler, tile=s.tile, overlap=s.overlap,
                           batch=s.batch, dtype=PRECISIONS[s.precision], progress=s.progress_steps)
        return [to_uint8(sr[..., :lr.shape[0] * scale, :lr.shape[1] * scale]) for sr, lr in zip(srs, lrs, strict=True)]

    def run(self, items: Sequence[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(key, sr)`` for ``(key, lr)`` items, wave by wave (not in input order)."""
        for wave in self.plan_waves([lr.shape[:2] for _, lr in items]):
            srs = self.sample([items[i][1] for i in wave], [items[i][0] for i in wave])
            yield from zip([items[i][0] for i in wave], srs, strict=True)


# ---------------------------------------------------------------------------------- folder -> folder


def save_png(path: Path, img: np.ndarray) -> None:
    """Write an RGB uint8 PNG atomically (a crash never leaves a half-written output that counts as done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(img).save(tmp, format="PNG")
    os.replace(tmp, path)


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
    bar = tqdm(total=len(todo), desc="super-resolving", unit="img", disable=not progress)
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


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="infer", description="Super-resolve a folder of LR images with a SAM-DiffSR checkpoint "
        "(ours or the authors' model_ckpt_steps_400000.ckpt).")
    p.add_argument("--config", help="model config YAML (default: the config saved in the weights file, "
                   "else the paper's model)")
    p.add_argument("--ckpt", required=True, help="weights file: ours (weights/stepN.pt) or the authors' .ckpt")
    p.add_argument("--img-dir", required=True, help="folder of LR images (searched recursively)")
    p.add_argument("--save-dir", required=True, help="where SR PNGs go (same relative paths)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps; fewer than the model's T "
                   "uses the respaced DDIM sampler (default: all T, ancestral DDPM)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta with --steps (0: deterministic)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="ddpm (the paper's T-step chain, the "
                   "default), ddim, or dpmpp_2m (DPM-Solver++ 2M: 10-20 steps keep the full chain's quality)")
    p.add_argument("--seed", type=int, default=0, help="run seed (each image's noise is seeded from it and "
                   "its file name)")
    p.add_argument("--batch", type=int, default=1, help="images (or tiles) per network call")
    p.add_argument("--tile", type=int, default=0, help="tile size in LR pixels (0: whole images); memory "
                   "then stays flat in image size")
    p.add_argument("--overlap", type=int, default=16, help="tile overlap in LR pixels, blended smoothly")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: GPU if present)")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                   help="network precision (autocast); bf16/fp16 on GPU")
    p.add_argument("--lr-up-divisor", type=float, default=None, help="bicubic_up(LR / this): default 256 "
                   "for the authors' checkpoint, else the config's model.lr_up_divisor")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the file has an EMA")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.timesteps=100")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``launcher/infer.py``: 0 done, 1 some images failed, 2 a user error (one line; samdiffsr.cli)."""
    return run_cli("infer", lambda: _infer_folder_cli(argv))


def _infer_folder_cli(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    loaded = load_model(args.ckpt, args.config, overrides=args.overrides, device=args.device,
                        prefer_ema=not args.no_ema, lr_up_divisor=args.lr_up_divisor)
    settings = SamplerSettings(steps=args.steps, eta=args.eta, sampler=args.sampler, seed=args.seed,
                               tile=args.tile, overlap=args.overlap, precision=args.precision,
                               batch=args.batch, progress_steps=not args.quiet)
    info = loaded.info
    print(f"loaded {info['path']} ({info['layout']} layout, step {info.get('step')}, "
          f"{'EMA' if info.get('ema') else 'raw'} weights) on {next(loaded.model.parameters()).device}; "
          f"bicubic_up uses LR/{loaded.lr_up_divisor:g}", file=sys.stderr)
    summary = infer_folder(loaded, args.img_dir, args.save_dir, settings, overwrite=args.overwrite,
                           progress=not args.quiet)
    for path, reason in summary["failed"]:
        print(f"failed: {path}: {reason}", file=sys.stderr)
    print(f"{summary['done']} images written to {summary['save_dir']}, {summary['skipped']} already done, "
          f"{len(summary['failed'])} failed ({summary['seconds']:.1f} s)")
    return 1 if summary["failed"] else 0
