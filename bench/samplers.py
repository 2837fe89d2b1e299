"""Sampler quality and speed on a trained model: PSNR-Y / SSIM-Y / seconds per image, spread over seeds.

Every sampler runs on the same held-out pairs with the same per-image seeds (``image_seed(seed, key)``),
through the inference path the CLIs use (``SuperResolver``), one image per call. The baseline is the
paper's T-step DDPM chain, measured in the same run: quality is reported as a difference to it (mean over
seeds) and speed as a ratio to it. LPIPS is added when its weights files are given (``--lpips-weights``).

    python bench/samplers.py --weights runs/demo/weights/latest.pt --set shards/demo/val --crop 256
    python bench/samplers.py ... --write bench/RESULTS.md        # also record the table there
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from results_file import cpu_name, write_section  # bench/results_file.py

from samdiffsr.data.pairs import centre_box, load_share
from samdiffsr.evaluation.inference import SamplerSettings, SuperResolver
from samdiffsr.evaluation.metrics import psnr_y, ssim_y
from samdiffsr.evaluation.sets import parse_set
from samdiffsr.evaluation.tiling import lr_multiple
from samdiffsr.models.loading import load_model

# (label, sampler, steps, eta): the paper's chain first (the baseline), then the fewer-step samplers.
SAMPLERS = [("ddpm", "ddpm", None, 0.0), ("ddim", "ddim", 50, 0.0), ("ddim", "ddim", 25, 0.0),
            ("ddim", "ddim", 10, 0.0), ("ddim eta=1", "ddim", 20, 1.0), ("ddim eta=1", "ddim", 10, 1.0),
            ("dpmpp_2m", "dpmpp_2m", 20, 0.0), ("dpmpp_2m", "dpmpp_2m", 10, 0.0)]


def centre_crop(pair, size: int, scale: int):
    """The central ``size`` x ``size`` HR region of a pair and its LR, cut as validation cuts it (0: whole)."""
    if size <= 0:
        return pair.hr, pair.lr
    y, x, h, w = centre_box(*pair.hr.shape[:2], size, scale)
    return pair.hr[y:y + h, x:x + w], pair.lr[y // scale:(y + h) // scale, x // scale:(x + w) // scale]


def lpips_scorer(files: list[str] | None):
    if not files:
        return None
    from samdiffsr.evaluation.perceptual import LPIPS

    return LPIPS.from_files(files)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a trained weights file (weights/stepN.pt)")
    p.add_argument("--set", required=True, help="held-out pairs: a benchmark shard folder or HR image folder")
    p.add_argument("--crop", type=int, default=0, help="centre-crop each HR image to this size (0: whole)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--lpips-weights", nargs="+", default=None, help="alexnet-owt-7be5be79.pth and alex.pth")
    p.add_argument("--write", type=Path, default=None, help="also write the table into this RESULTS.md")
    return p.parse_args(argv)


def measure(loaded, crops, name: str, steps: int | None, eta: float, seeds: int, lpips) -> dict[str, list[float]]:
    """Per seed, the mean PSNR-Y / SSIM-Y / LPIPS / seconds over ``crops`` for one sampler setting."""
    scale = loaded.config.model.sr_scale
    per_seed = {"psnr_y": [], "ssim_y": [], "lpips": [], "seconds": []}
    for seed in range(seeds):
        resolver = SuperResolver(loaded, SamplerSettings(sampler=name, steps=steps, eta=eta, seed=seed))
        scores = {"psnr_y": [], "ssim_y": [], "lpips": [], "seconds": []}
        for key, hr, lr in crops:
            start = time.perf_counter()
            sr = resolver.sample([lr], [key])[0]
            scores["seconds"].append(time.perf_counter() - start)
            scores["psnr_y"].append(psnr_y(sr, hr, scale))
            scores["ssim_y"].append(ssim_y(sr, hr, scale))
            if lpips is not None:
                scores["lpips"].append(lpips(sr, hr))
        for k, v in scores.items():
            if v:
                per_seed[k].append(float(np.mean(v)))
    return per_seed


def results_table(rows, seeds: int, with_lpips: bool) -> str:
    """The markdown table: each sampler's scores, and their difference / speed-up to the first row's."""
    base = rows[0][2]
    base_psnr, base_ssim = statistics.mean(base["psnr_y"]), statistics.mean(base["ssim_y"])
    base_time = min(base["seconds"])
    lpips_col = " LPIPS |" if with_lpips else ""
    lines = [f"| sampler | steps | s/image | speed-up | PSNR-Y (min-max over {seeds} seeds) | vs ddpm | "
             f"SSIM-Y (min-max) | vs ddpm |{lpips_col}",
             "|---|---:|---:|---:|---|---:|---|---:|" + ("---:|" if with_lpips else "")]
    for label, steps, s in rows:
        psnr, ssim, sec = statistics.mean(s["psnr_y"]), statistics.mean(s["ssim_y"]), min(s["seconds"])
        cells = [label, str(steps), f"{sec:.2f}", f"{base_time / sec:.1f}x",
                 f"{psnr:.3f} ({min(s['psnr_y']):.3f}-{max(s['psnr_y']):.3f})", f"{psnr - base_psnr:+.3f}",
                 f"{ssim:.4f} ({min(s['ssim_y']):.4f}-{max(s['ssim_y']):.4f})", f"{ssim - base_ssim:+.4f}"]
        if with_lpips:
            cells.append(f"{statistics.mean(s['lpips']):.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def record(args: argparse.Namespace, argv: list[str] | None, images: int, table: str, with_lpips: bool) -> None:
    """Write the table, with the command and the machine, into the ``--write`` RESULTS.md."""
    command = "python bench/samplers.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    where = (f"{images} held-out images" + (f", central {args.crop}x{args.crop} HR crops" if args.crop
                                            else ", whole") + f", {args.seeds} seeds each")
    lpips_note = "" if with_lpips else " LPIPS: not measured (its weights files are not on this machine)."
    body = (f"`{command}`\n\n{datetime.date.today()}, {cpu_name()}, {platform.system()}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads; {where}; s/image is the fastest seed."
            f"{lpips_note}\n\n{table}")
    write_section(args.write, "Samplers on the trained demo model", body)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.weights, device="cpu")
    scale = loaded.config.model.sr_scale
    _, pairs = load_share(parse_set(args.set), scale, scale * lr_multiple(loaded.config.model))
    crops = [(pair.key, *centre_crop(pair, args.crop, scale)) for pair in pairs]
    lpips = lpips_scorer(args.lpips_weights)

    rows = []
    for label, name, steps, eta in SAMPLERS:
        per_seed = measure(loaded, crops, name, steps, eta, args.seeds, lpips)
        rows.append((label, steps or loaded.config.model.timesteps, per_seed))
        print(f"{label:>11} {rows[-1][1]:>4} steps: psnr_y {statistics.mean(per_seed['psnr_y']):.3f}"
              f"  ssim_y {statistics.mean(per_seed['ssim_y']):.4f}  {min(per_seed['seconds']):.2f} s/image",
              flush=True)

    table = results_table(rows, args.seeds, lpips is not None)
    print(table)
    if args.write:
        record(args, argv, len(crops), table, lpips is not None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
