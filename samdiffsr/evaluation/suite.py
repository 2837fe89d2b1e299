"""The metrics of a benchmark sweep: names on the command line -> the columns scored for every image.

``fid`` in ``--metrics`` is FID in the sweep's FID mode, and its column is named after the mode: ``fid_clean``
(clean-fid's input pipeline: pyiqa's default, so what the paper's table used) or ``fid_legacy`` (pytorch-fid's).
Both columns can also be asked for by name. LPIPS / FID networks are built up front, so that a missing weight
file stops the sweep before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from samdiffsr.cli import UserError
from samdiffsr.evaluation import metrics as pixel
from samdiffsr.evaluation.results import FID, FID_METRICS, FID_MODES, HR_LABEL, ResultStore, is_fid

LPIPS_ALEX = "lpips_alex"
DEFAULT_FID_MODE = "clean"  # pyiqa's create_metric('fid') default, used by the authors' caculate_iqa.py
ALL_METRICS = (*pixel.PIXEL_METRICS, LPIPS_ALEX, FID, *FID_METRICS)
DEFAULT_METRICS = (*pixel.PIXEL_METRICS, LPIPS_ALEX, FID)


class MetricError(UserError, ValueError):
    """An unknown metric or FID mode."""


def resolve_metrics(names: Sequence[str], fid_mode: str = DEFAULT_FID_MODE) -> list[str]:
    """``--metrics`` names -> column names (``fid`` becomes ``fid_<mode>``), unique, in the order given."""
    if fid_mode not in FID_MODES:
        raise MetricError(f"--fid-mode {fid_mode!r}: choose from {', '.join(FID_MODES)}")
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown:
        raise MetricError(f"unknown metric(s) {unknown} in --metrics; choose from {', '.join(ALL_METRICS)}")
    return list(dict.fromkeys(FID_MODES[fid_mode] if m == FID else m for m in names))


class MetricSuite:
    """The requested metrics of one sweep: per-image scores, and FID features saved per image."""

    def __init__(self, names: Sequence[str], scale: int, *, lpips_weights: Any = None, fid_weights: Any = None,
                 device: Any = "cpu", fid_mode: str = DEFAULT_FID_MODE):
        self.names = resolve_metrics(names, fid_mode)
        self.scale = scale
        self.lpips = None
        self.fid: dict[str, Any] = {}  # FID column -> its feature extractor
        if LPIPS_ALEX in self.names:
            from samdiffsr.evaluation.perceptual import LPIPS

            self.lpips = LPIPS(lpips_weights, device=device)
        fid_names = [m for m in self.names if is_fid(m)]
        if fid_names:
            from samdiffsr.evaluation.fid import FIDFeatures, load_fid_state

            state = load_fid_state(fid_weights)  # read once, shared by both pipelines
            self.fid = {m: FIDFeatures(state, device=device, mode=FID_METRICS[m]) for m in fid_names}

    def score(self, sr: np.ndarray, hr: np.ndarray) -> dict[str, float]:
        """Per-image metrics (all but FID) of a uint8 SR against its uint8 HR."""
        out: dict[str, float] = {}
        fns = {pixel.PSNR_Y: lambda: pixel.psnr_y(sr, hr, self.scale),
               pixel.SSIM_Y: lambda: pixel.ssim_y(sr, hr, self.scale),
               pixel.PSNR_Y_PAPER: lambda: pixel.psnr_y_paper(sr, hr),
               pixel.SSIM_Y_PAPER: lambda: pixel.ssim_y_paper(sr, hr)}
        for m in self.names:
            if m in fns:
                out[m] = float(fns[m]())
            elif m == LPIPS_ALEX:
                out[m] = float(self.lpips(sr, hr)[0])
        return out

    def save_features(self, store: ResultStore, label: str, set_name: str, key: str,
                      sr: np.ndarray, hr: np.ndarray) -> None:
        """Each FID column's features of an SR image, and of its HR once (shared by every row)."""
        for metric, net in self.fid.items():
            if not store.features_path(HR_LABEL, set_name, key, metric).is_file():
                store.save_features(HR_LABEL, set_name, key, metric, net([hr])[0])
            store.save_features(label, set_name, key, metric, net([sr])[0])
