"""``python launcher/infer.py``: super-resolve a folder of LR images with a SAM-DiffSR checkpoint.

    python launcher/infer.py --ckpt runs/x/weights/latest.pt --img-dir LR --save-dir SR
    python launcher/infer.py --config configs/authors_samdiffsr_df2k4x.yaml --ckpt model_ckpt_steps_400000.ckpt \\
        --img-dir LR --save-dir SR --steps 25 --tile 64 --batch 8 --precision bf16

Reads our weights files (their embedded config is used when ``--config`` is not given) and the authors'
released checkpoint layout; the command is resumable (existing outputs are skipped). The library is
:mod:`samdiffsr.evaluation.inference`; details in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from samdiffsr.cli import ArgumentParser, run_cli
from samdiffsr.evaluation.inference import SamplerSettings, SuperResolver, infer_folder
from samdiffsr.models.inputs import PRECISION_DTYPES
from samdiffsr.models.loading import load_model
from samdiffsr.models.samplers import SAMPLERS


def build_parser() -> argparse.ArgumentParser:
    """Every option says its default (tests/test_cli_help.py checks it)."""
    p = ArgumentParser(
        prog="infer", description="Super-resolve a folder of LR images with a SAM-DiffSR checkpoint "
        "(ours or the authors' model_ckpt_steps_400000.ckpt, see docs/pretrained.md).")
    p.add_argument("--config", help="model config: a YAML path or a shipped config's name, e.g. "
                   "authors_samdiffsr_df2k4x (default: the config saved in the weights file, else the paper's model)")
    p.add_argument("--ckpt", required=True, help="weights file: ours (weights/stepN.pt) or the authors' .ckpt "
                   "(required)")
    p.add_argument("--img-dir", required=True, help="folder of LR images, searched recursively (required)")
    p.add_argument("--save-dir", required=True, help="where SR PNGs go, same relative paths (required)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps; fewer than the model's T "
                   "uses the respaced DDIM sampler (default: all T, ancestral DDPM)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta with --steps, 0: deterministic, 1: respaced "
                   "ancestral (default: 0)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="ddpm (the paper's T-step chain), ddim, or "
                   "dpmpp_2m (DPM-Solver++ 2M: 10-20 steps keep the full chain's quality) (default: ddpm, or "
                   "ddim when --steps is below T)")
    p.add_argument("--seed", type=int, default=0, help="run seed; each image's noise is seeded from it and "
                   "its file name (default: 0)")
    p.add_argument("--batch", type=int, default=1, help="images (or tiles) per network call (default: 1)")
    p.add_argument("--tile", type=int, default=0, help="tile size in LR pixels, 0: whole images; with tiles "
                   "memory stays flat in image size (default: 0)")
    p.add_argument("--overlap", type=int, default=16, help="tile overlap in LR pixels, blended smoothly "
                   "(default: 16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the GPU if present, else cpu)")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISION_DTYPES),
                   help="network precision (autocast); bf16/fp16 on GPU (default: fp32)")
    p.add_argument("--lr-up-divisor", type=float, default=None, help="bicubic_up(LR / this) (default: 256 "
                   "for the authors' checkpoint, else the config's model.lr_up_divisor)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if the file has an EMA "
                   "(default: the EMA when there is one)")
    p.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist (default: "
                   "skip them, i.e. resume)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: progress bars on)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.timesteps=100 "
                   "(default: none)")
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
    SuperResolver(loaded, settings)  # refuses settings that do not fit the model, before anything is printed
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
