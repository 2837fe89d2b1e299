"""What the demo shows at the end: three rows side by side, a verdict, and a comparison picture.

    bicubic                  MATLAB bicubic x4 of the LR (what every SR method must beat)
    RRDB alone (regression)  the frozen LR encoder's own output: the regression baseline
    SAM-DiffSR <checkpoint>  one diffusion sample per image from the best checkpoint

Every figure uses the benchmark's pairs and metrics (BasicSR protocol: Y channel, border = scale).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from samdiffsr.data.pairs import Pair
from samdiffsr.evaluation.metrics import pixel_metrics
from samdiffsr.imresize import imresize
from samdiffsr.models.inputs import prepare_lr, to_uint8
from samdiffsr.models.rrdb import RRDBNet
from samdiffsr.models.weights import load_rrdb_weights

TABLE_METRICS = ("psnr_y", "ssim_y")


def checkpoint_scores(results_csv: Path) -> dict[str, dict[str, float]]:
    """``{checkpoint: {metric: value}}`` from a benchmark's results.csv (one set)."""
    scores: dict[str, dict[str, float]] = {}
    with results_csv.open() as f:
        for row in csv.DictReader(f):
            scores.setdefault(row["checkpoint"], {})[row["metric"]] = float(row["value"])
    return scores


def best_checkpoint(scores: dict[str, dict[str, float]], metric: str = "psnr_y") -> str:
    """The trained checkpoint with the highest ``metric`` (bicubic excluded)."""
    trained = {name: s[metric] for name, s in scores.items() if name != "bicubic"}
    if not trained:
        raise ValueError(f"no trained checkpoint has a {metric} result")
    return max(trained, key=trained.__getitem__)


@torch.no_grad()
def rrdb_outputs(weights: Path, pairs: list[Pair], *, num_feat: int, num_block: int, growth: int,
                 scale: int) -> list[np.ndarray]:
    """The RRDB's own SR image (uint8) of every pair: the regression baseline the diffusion builds on."""
    rrdb = RRDBNet(3, 3, num_feat, num_block, growth, sr_scale=scale)
    load_rrdb_weights(rrdb, weights)
    rrdb.eval()
    # The RRDB is fully convolutional: no padding (multiple 1); the bicubic input prepare_lr also makes is unused.
    return [to_uint8(rrdb(prepare_lr(pair.lr, scale, 255.0, 1, torch.device("cpu"))[0])[0]) for pair in pairs]


def mean_metrics(srs: list[np.ndarray], pairs: list[Pair], scale: int) -> dict[str, float]:
    per_image = [pixel_metrics(sr, p.hr, scale) for sr, p in zip(srs, pairs, strict=True)]
    return {k: float(np.mean([m[k] for m in per_image])) for k in per_image[0]}


def side_by_side(rows: list[tuple[str, dict[str, float]]], metrics: tuple[str, ...] = TABLE_METRICS) -> str:
    """A Markdown table: one row per method, one column per metric."""
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, scores in rows:
        cells = [f"{scores[m]:.4f}" if m.startswith("ssim") else f"{scores[m]:.2f}" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(name: str, sr: dict[str, float], bicubic: dict[str, float]) -> str:
    """One line: does the best checkpoint beat bicubic in both PSNR-Y and SSIM-Y?"""
    dp, ds = sr["psnr_y"] - bicubic["psnr_y"], sr["ssim_y"] - bicubic["ssim_y"]
    figures = (f"{sr['psnr_y']:.2f} vs {bicubic['psnr_y']:.2f} dB PSNR-Y ({dp:+.2f}), "
               f"{sr['ssim_y']:.4f} vs {bicubic['ssim_y']:.4f} SSIM-Y ({ds:+.4f})")
    if dp > 0 and ds > 0:
        return f"training beats bicubic: {name} {figures}"
    return f"training has not beaten bicubic in both metrics yet: {name} {figures}"


def detail_window(hr: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the ``size`` x ``size`` HR window with the most gradient energy (on a 4-px grid)."""
    y = hr.astype(np.float32).mean(axis=2)
    energy = np.abs(np.diff(y, axis=0))[:, :-1] + np.abs(np.diff(y, axis=1))[:-1, :]
    pooled = F.avg_pool2d(torch.from_numpy(energy)[None, None], size, stride=4)[0, 0]
    row, col = divmod(int(pooled.argmax()), pooled.shape[1])
    return row * 4, col * 4


def comparison_picture(path: Path, pairs: list[Pair], srs: list[np.ndarray], sr_label: str, scale: int,
                       size: int = 96) -> Path:
    """For each pair, the same zoomed crop as LR (nearest), bicubic, SR and HR, side by side with labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ("LR (nearest)", "bicubic", sr_label, "HR")
    fig, axes = plt.subplots(len(pairs), 4, figsize=(13, 3.4 * len(pairs)), squeeze=False)
    for row, (pair, sr) in enumerate(zip(pairs, srs, strict=True)):
        size_i = min(size, pair.hr.shape[0], pair.hr.shape[1]) // scale * scale
        y, x = detail_window(pair.hr, size_i)
        y, x = y // scale * scale, x // scale * scale
        lr_crop = pair.lr[y // scale:(y + size_i) // scale, x // scale:(x + size_i) // scale]
        crops = (np.repeat(np.repeat(lr_crop, scale, axis=0), scale, axis=1), imresize(pair.lr, scale),
                 sr, pair.hr)
        for col, (title, img) in enumerate(zip(columns, crops, strict=True)):
            ax = axes[row][col]
            ax.imshow(img if col == 0 else img[y:y + size_i, x:x + size_i], interpolation="nearest")
            ax.set_title(f"{pair.key}: {title}" if col == 0 else title, fontsize=10)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
