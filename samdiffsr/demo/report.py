"""What the demo shows at the end: three rows side by side, a verdict, and a comparison picture.

    bicubic                  MATLAB bicubic x4 of the LR (what every SR method must beat)
    RRDB alone (regression)  the frozen LR encoder's own output: the regression baseline
    SAM-DiffSR <checkpoint>  one diffusion sample per image from the best checkpoint

then SAM-DiffSR minus bicubic and minus the RRDB alone as mean paired differences over the held-out images
with 95% bootstrap intervals, and the verdict: "beats bicubic" only where both intervals lie above 0.

Every figure uses the benchmark's pairs and metrics (BasicSR protocol: Y channel, border = scale).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from samdiffsr.config import Config
from samdiffsr.data.pairs import Pair
from samdiffsr.evaluation.metrics import pixel_metrics
from samdiffsr.evaluation.stats import PairedDifference, bootstrap_mean, format_difference
from samdiffsr.imresize import imresize
from samdiffsr.models.inputs import prepare_lr, to_uint8
from samdiffsr.models.rrdb import RRDBNet
from samdiffsr.models.weights import load_rrdb_weights

TABLE_METRICS = ("psnr_y", "ssim_y")
METRIC_NAMES = {"psnr_y": "PSNR-Y", "ssim_y": "SSIM-Y"}


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


def per_image_metrics(srs: list[np.ndarray], pairs: list[Pair], scale: int) -> dict[str, dict[str, float]]:
    """``{image key: {metric: value}}`` of SR images against their pairs' HR."""
    return {p.key: pixel_metrics(sr, p.hr, scale) for sr, p in zip(srs, pairs, strict=True)}


def mean_metrics(per_image: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean of every metric over the images of ``per_image``."""
    first = next(iter(per_image.values()))
    return {k: float(np.mean([m[k] for m in per_image.values()])) for k in first}


def side_by_side(rows: list[tuple[str, dict[str, float]]], metrics: tuple[str, ...] = TABLE_METRICS) -> str:
    """A Markdown table: one row per method, one column per metric."""
    lines = ["| method | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, scores in rows:
        cells = [f"{scores[m]:.4f}" if m.startswith("ssim") else f"{scores[m]:.2f}" for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(method: dict[str, dict[str, float]], baseline: dict[str, dict[str, float]],
                       metrics: tuple[str, ...] = TABLE_METRICS) -> dict[str, PairedDifference]:
    """``method - baseline`` per metric: the mean over the images both scored, with its 95% bootstrap interval
    (the ablation's statistics, one seed)."""
    keys = sorted(method.keys() & baseline.keys())
    if len(keys) != len(method) or len(keys) != len(baseline):
        raise ValueError(f"the two methods scored different images: {sorted(method.keys() ^ baseline.keys())}")
    return {m: bootstrap_mean(np.array([[method[k][m] - baseline[k][m] for k in keys]])) for m in metrics}


def difference_line(name: str, baseline: str, diffs: dict[str, PairedDifference]) -> str:
    """One line: ``name - baseline`` in every metric, with intervals and the number of images."""
    images = next(iter(diffs.values())).images
    figures = ", ".join(f"{METRIC_NAMES[m]} {format_difference(m, d)}" for m, d in diffs.items())
    return f"{name} - {baseline}: {figures} (mean over {images} held-out images, 95% bootstrap interval)"


def recipe(cfg: Config) -> str:
    """The diffusion recipe in one line: what the demo trained with, convergence levers on and off."""
    t, o = cfg.train, cfg.optim
    decay = (f"x{o.decay_gamma:g} every {o.decay_steps} steps" if o.decay_steps and o.decay_gamma != 1
             else "constant")
    levers = []
    if t.timestep_sampling == "low_noise":
        levers.append(f"low-noise timestep sampling (k = {t.timestep_power:g})")
    if t.snr_gamma:
        levers.append(f"Min-SNR weighting (gamma = {t.snr_gamma:g})")
    if t.ema_warmup_power:
        levers.append(f"EMA warm-up (power {t.ema_warmup_power:g})")
    if o.warmup_steps:
        levers.append(f"lr warm-up ({o.warmup_steps} steps)")
    ema = f"EMA {t.ema_decay:g}" if t.ema_decay else "no EMA"
    return (f"recipe: {t.max_steps} steps, batch {t.batch_size} of {cfg.data.patch_size}-pixel patches, lr "
            f"{o.lr:g} ({decay}), {ema}; levers: {', '.join(levers) or 'none'} (docs/training.md)")


def verdict(vs_bicubic: dict[str, PairedDifference]) -> str:
    """Does SAM-DiffSR beat bicubic? Only where every interval lies above 0."""
    if all(d.low > 0 for d in vs_bicubic.values()):
        return "training beats bicubic: in PSNR-Y and SSIM-Y, both intervals above 0"
    return "training has not beaten bicubic in both metrics yet: an interval includes 0 or lies below it"


def detail_window(hr: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the ``size`` x ``size`` HR window with the most gradient energy (on a 4-px grid)."""
    if size >= min(hr.shape[:2]) - 1:  # the window is (about) the whole image
        return 0, 0
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
