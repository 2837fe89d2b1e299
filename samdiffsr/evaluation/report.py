"""The sweep's human-facing outputs: results.csv / .json, per-image CSV, results.md and one plot per metric."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from samdiffsr.evaluation.results import is_fid

# How each metric is shown, and whether higher is better (for the reader of the table).
METRIC_INFO = {
    "psnr_y": ("PSNR-Y (dB), BasicSR protocol, border = scale", 2, True),
    "ssim_y": ("SSIM-Y, BasicSR protocol, border = scale", 4, True),
    "psnr_y_paper": ("PSNR-Y (dB), paper protocol (pyiqa, no border crop)", 2, True),
    "ssim_y_paper": ("SSIM, paper protocol (pyiqa ycbcr, no border crop)", 4, True),
    "lpips_alex": ("LPIPS (AlexNet v0.1)", 4, False),
    "fid_clean": ("FID, clean-fid pipeline (pyiqa's default, as the paper; InceptionV3, per set)", 2, False),
    "fid_legacy": ("FID, pytorch-fid pipeline (InceptionV3, per set)", 2, False),
}


# SAM-DiffSR's reported 4x results (their 400k-step checkpoint; pyiqa PSNR-Y / SSIM, no border crop, and pyiqa's
# FID, whose default is the clean-fid pipeline: github.com/lose4578/SAM-DiffSR README, "Result"), by set.
PAPER_REPORTED = {
    "set5": (30.99, 0.8731, 48.20), "set14": (27.14, 0.7484, 49.84), "urban100": (25.54, 0.7721, 4.5276),
    "bsds100": (26.47, 0.7003, 60.81), "manga109": (29.43, 0.8899, 2.3994), "general100": (30.30, 0.8353, 38.42),
    "div2kvalid": (29.34, 0.8109, 0.3809),
}
_PAPER_ALIASES = {"b100": "bsds100", "bsd100": "bsds100", "div2k": "div2kvalid", "div2kval": "div2kvalid"}


def paper_reported(set_name: str) -> dict[str, float]:
    """The paper's psnr_y_paper / ssim_y_paper / fid_clean for a set named like one of theirs (else empty)."""
    key = "".join(c for c in set_name.lower() if c.isalnum())
    key = _PAPER_ALIASES.get(key, key)
    if key not in PAPER_REPORTED:
        return {}
    psnr, ssim, fid = PAPER_REPORTED[key]
    return {"psnr_y_paper": psnr, "ssim_y_paper": ssim, "fid_clean": fid}


def fmt(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{METRIC_INFO.get(metric, ('', 4, True))[1]}f}"


def row_order(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """Checkpoint labels: the bicubic baseline first, then by training step, then by name."""
    first: dict[str, dict[str, Any]] = {}
    for s in summaries:
        first.setdefault(s["checkpoint"], s)

    def key(label: str) -> tuple:
        s = first[label]
        step = s.get("step")
        return (s.get("source") != "bicubic", step is None, step if step is not None else 0, label)

    return sorted(first, key=key)


def write_tables(out: Path, summaries: Sequence[dict[str, Any]], per_image: Sequence[dict[str, Any]],
                 sets: Sequence[str], metrics: Sequence[str], settings: dict[str, Any]) -> dict[str, Path]:
    """results.csv (checkpoint x set x metric), results_per_image.csv, results.json and results.md."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "per_image_csv": out / "results_per_image.csv",
             "json": out / "results.json", "md": out / "results.md"}
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "step", "set", "metric", "value", "images"])
        for s in summaries:
            for m in metrics:
                w.writerow([s["checkpoint"], s.get("step"), s["set"], m, s["metrics"].get(m), s["images"]])
    per_image_metrics = [m for m in metrics if not is_fid(m)]
    with paths["per_image_csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "step", "set", "image", *per_image_metrics, "sr_seconds"])
        for r in per_image:
            w.writerow([r["checkpoint"], r.get("step"), r["set"], r["key"],
                        *[r["metrics"].get(m) for m in per_image_metrics], r.get("sr_seconds")])
    paths["json"].write_text(json.dumps({"settings": settings, "metrics": list(metrics), "sets": list(sets),
                                         "summary": list(summaries), "per_image": list(per_image)}, indent=1))
    paths["md"].write_text(markdown_table(summaries, sets, metrics, settings))
    return paths


def markdown_table(summaries: Sequence[dict[str, Any]], sets: Sequence[str], metrics: Sequence[str],
                   settings: dict[str, Any]) -> str:
    """Rows: checkpoints; columns: sets; each cell the metrics joined by ' / ' (as the paper's README)."""
    cell = {(s["checkpoint"], s["set"]): s for s in summaries}
    rows = row_order(summaries)
    head = " / ".join(metrics)
    rows_note = "Rows: checkpoints"
    if any(s.get("source") == "bicubic" for s in summaries):
        rows_note += " (`bicubic` = MATLAB-bicubic upsampling of the same LR, the baseline a trained model must beat)"
    if any(s.get("source") == "folder" for s in summaries):
        rows_note = "Rows: existing SR images (`--sr-dir`), scored against their HR images"
    lines = ["# Benchmark results", "", f"Each cell: {head}. {rows_note}.", "",
             "| checkpoint | step | " + " | ".join(sets) + " |",
             "|---|---:|" + "---:|" * len(sets)]
    for label in rows:
        step = next((s.get("step") for s in summaries if s["checkpoint"] == label), None)
        vals = []
        for set_name in sets:
            s = cell.get((label, set_name))
            vals.append(" / ".join(fmt(m, s["metrics"].get(m)) for m in metrics) if s else "-")
        lines.append(f"| {label} | {'' if step is None else step} | " + " | ".join(vals) + " |")
    paper = {name: paper_reported(name) for name in sets}
    if any(paper[name] and any(m in paper[name] for m in metrics) for name in sets):
        vals = [" / ".join(fmt(m, paper[name].get(m)) for m in metrics) for name in sets]
        lines.append("| paper, reported (400k) | 400000 | " + " | ".join(vals) + " |")
        lines += ["", "`paper, reported`: the SAM-DiffSR paper's own table (their released checkpoint, paper protocol "
                  "only), for comparison; not measured here."]
    lines += ["", "Metrics:"]
    for m in metrics:
        desc, _, higher = METRIC_INFO.get(m, (m, 4, True))
        lines.append(f"- `{m}`: {desc}; {'higher' if higher else 'lower'} is better")
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    return "\n".join(lines)


def write_plots(out: Path, summaries: Sequence[dict[str, Any]], sets: Sequence[str],
                metrics: Sequence[str]) -> list[Path]:
    """One PNG per metric: value against training step, a line per set, bicubic as a dashed level."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    paths = []
    for m in metrics:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        drawn = False
        for i, set_name in enumerate(sets):
            color = f"C{i % 10}"
            pts = sorted((s["step"], s["metrics"].get(m)) for s in summaries
                         if s["set"] == set_name and s.get("step") is not None and s.get("source") == "model"
                         and s["metrics"].get(m) is not None and not math.isnan(s["metrics"][m]))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=set_name)
                drawn = True
            base = [s["metrics"].get(m) for s in summaries if s["set"] == set_name and s.get("source") == "bicubic"]
            if base and base[0] is not None and not math.isnan(base[0]):
                ax.axhline(base[0], color=color, linestyle="--", linewidth=1, label=f"{set_name} bicubic")
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        desc, _, higher = METRIC_INFO.get(m, (m, 4, True))
        ax.set_xlabel("training step")
        ax.set_ylabel(m)
        ax.set_title(f"{desc} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"plot_{m}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
