"""Where a benchmark sweep keeps its results, and how rank 0 gathers them (through files only).

Each rank appends one JSON line per scored image to its own part file; rank 0 reads the parts until every
image of a (checkpoint, set) pair is there, then writes the pair's ordered lines and summary (whose
presence means the pair is done) and removes the parts. The file layout: docs/evaluation.md.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samdiffsr.io import atomic_write, atomic_write_text

FID = "fid"  # in --metrics: FID in the sweep's --fid-mode (the column is then fid_clean or fid_legacy)
# FID columns and FIDFeatures' input pipeline for each; clean is pyiqa's default, so the paper's (docs/evaluation.md).
FID_METRICS = {"fid_clean": "clean", "fid_legacy": "legacy_pytorch"}
FID_MODES = {"clean": "fid_clean", "legacy": "fid_legacy"}  # --fid-mode -> column
HR_LABEL = "hr"  # the features folder of the reference images


def is_fid(metric: str) -> bool:
    """Whether a metric is a per-set FID (no per-image value; features on disk instead)."""
    return metric in FID_METRICS


class SettingsMismatch(ValueError):
    """The output folder holds results computed with other settings."""


class GatherTimeout(TimeoutError):
    """Rank 0 waited too long for the other ranks' results."""


def _safe(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))


class ResultStore:
    """The results of one sweep output folder."""

    def __init__(self, out_dir: str | Path):
        self.out = Path(out_dir)
        self.root = self.out / "results"

    # --- settings -------------------------------------------------------------------------------
    def check_settings(self, settings: dict[str, Any]) -> None:
        """Record the sweep's settings; refuse to mix results computed with different ones."""
        path = self.out / "settings.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old != settings:
                diff = {k: (old.get(k), settings.get(k)) for k in set(old) | set(settings)
                        if old.get(k) != settings.get(k)}
                raise SettingsMismatch(f"{self.out} holds results computed with other settings "
                                 f"(setting: (stored, now) = {diff}); use another --out or delete it")
            return
        write_json(path, settings)

    # --- per pair --------------------------------------------------------------------------------
    def summary_path(self, ckpt: str, set_name: str) -> Path:
        return self.root / _safe(ckpt) / f"{_safe(set_name)}.json"

    def lines_path(self, ckpt: str, set_name: str) -> Path:
        return self.root / _safe(ckpt) / f"{_safe(set_name)}.jsonl"

    def part_path(self, ckpt: str, set_name: str, rank: int, world: int) -> Path:
        return self.root / _safe(ckpt) / f"{_safe(set_name)}.part-{rank}-of-{world}.jsonl"

    def _parts(self, ckpt: str, set_name: str) -> list[Path]:
        return sorted((self.root / _safe(ckpt)).glob(f"{_safe(set_name)}.part-*.jsonl"))

    def features_path(self, ckpt: str, set_name: str, key: str, metric: str) -> Path:
        """An image's FID features for one FID column (the two pipelines give different features)."""
        return self.out / "features" / metric / _safe(ckpt) / _safe(set_name) / f"{_safe(key)}.npy"

    def summary(self, ckpt: str, set_name: str) -> dict[str, Any] | None:
        path = self.summary_path(ckpt, set_name)
        return json.loads(path.read_text()) if path.is_file() else None

    def is_done(self, ckpt: str, set_name: str, metrics: Sequence[str]) -> bool:
        s = self.summary(ckpt, set_name)
        return s is not None and all(m in s["metrics"] for m in metrics)

    def records(self, ckpt: str, set_name: str) -> dict[str, dict[str, Any]]:
        """Every per-image line stored for a pair (final file and parts), by image key.

        Lines are JSON objects ``{"key", "metrics": {...}, ...}``; a torn last line (a rank writing
        right now, or killed) is ignored. When a key appears twice the later line with more metrics wins.
        """
        out: dict[str, dict[str, Any]] = {}
        for path in [self.lines_path(ckpt, set_name), *self._parts(ckpt, set_name)]:
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            for line in text.splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                old = out.get(rec.get("key"))
                if old is None or len(rec.get("metrics", {})) >= len(old.get("metrics", {})):
                    out[rec["key"]] = rec
        return out

    def complete(self, rec: dict[str, Any] | None, ckpt: str, set_name: str, metrics: Sequence[str]) -> bool:
        """Whether an image's line has every requested metric (and its FID features are on disk)."""
        if rec is None:
            return False
        have = rec.get("metrics", {})
        if any(m not in have for m in metrics if not is_fid(m)):
            return False
        return all(self.features_path(ckpt, set_name, rec["key"], m).is_file() for m in metrics if is_fid(m))

    def append(self, ckpt: str, set_name: str, rank: int, world: int, rec: dict[str, Any]) -> None:
        """Append one image's line to this rank's part file (flushed: it survives a kill)."""
        path = self.part_path(ckpt, set_name, rank, world)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+b") as f:
            # A killed run may have left a torn last line: start a fresh line so this one stays whole.
            torn = False
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            f.write((("\n" if torn else "") + json.dumps(rec) + "\n").encode())
            f.flush()

    def save_features(self, ckpt: str, set_name: str, key: str, metric: str, feats: np.ndarray) -> None:
        path = self.features_path(ckpt, set_name, key, metric)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: _save_npy(tmp, feats))

    def load_features(self, ckpt: str, set_name: str, keys: Sequence[str], metric: str) -> np.ndarray:
        return np.stack([np.load(self.features_path(ckpt, set_name, k, metric)) for k in keys])

    # --- gathering (rank 0) -----------------------------------------------------------------------
    def wait_complete(self, ckpt: str, set_name: str, keys: Sequence[str], metrics: Sequence[str],
                      world: int, timeout: float, poll: float = 2.0) -> dict[str, dict[str, Any]]:
        """Poll until every key has a complete line; raise GatherTimeout naming the missing ranks.

        Called by rank 0 after its own share is done, so an image of its own share that is missing
        cannot appear any more: that is an error at once, not a wait.
        """
        deadline = time.monotonic() + timeout
        while True:
            recs = self.records(ckpt, set_name)
            missing = [i for i, k in enumerate(keys) if not self.complete(recs.get(k), ckpt, set_name, metrics)]
            if not missing:
                return recs
            own = [keys[i] for i in missing if i % world == 0]
            if own:
                raise RuntimeError(f"{ckpt}/{set_name}: rank 0 finished but has no results for {own[:5]}")
            if time.monotonic() > deadline:
                ranks = sorted({i % world for i in missing})
                raise GatherTimeout(
                    f"{ckpt}/{set_name}: {len(missing)} of {len(keys)} images have no results after "
                    f"{timeout:.0f} s (owned by rank(s) {ranks} of {world}); rerun the sweep to resume")
            time.sleep(poll)

    def finalize(self, ckpt: str, set_name: str, keys: Sequence[str], metrics: Sequence[str],
                 recs: dict[str, dict[str, Any]], step: int | None, source: str) -> dict[str, Any]:
        """Write the pair's ordered per-image file and summary (means, FID); remove the part files."""
        lines = [recs[k] for k in keys]
        means = {}
        for m in metrics:
            if is_fid(m):
                means[m] = fid_value(self.load_features(ckpt, set_name, keys, m),
                                     self.load_features(HR_LABEL, set_name, keys, m))
                continue
            vals = [float(r["metrics"][m]) for r in lines]
            means[m] = float(np.mean(vals)) if vals else math.nan
        seconds = [r["sr_seconds"] for r in lines if r.get("sr_seconds") is not None]
        summary = {"checkpoint": ckpt, "step": step, "set": set_name, "images": len(keys), "source": source,
                   "metrics": means, "sr_seconds_per_image": float(np.mean(seconds)) if seconds else None}
        atomic_write_text(self.lines_path(ckpt, set_name), "".join(json.dumps(r) + "\n" for r in lines))
        write_json(self.summary_path(ckpt, set_name), summary)
        for part in self._parts(ckpt, set_name):
            part.unlink(missing_ok=True)
        return summary


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.save would add ".npy" to a path's name
        np.save(f, array)


def fid_value(sr_feats: np.ndarray, hr_feats: np.ndarray) -> float:
    """FID between the SR and HR features of a set; NaN for sets of fewer than 2 images (undefined)."""
    from samdiffsr.evaluation.fid import fid_from_features

    if len(sr_feats) < 2:
        return math.nan
    return fid_from_features(sr_feats, hr_feats)
