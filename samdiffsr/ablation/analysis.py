"""Per-image benchmark results of every arm x seed -> paired differences against the first arm, per step.

Reads each run's ``results_per_image.csv`` (written by the benchmark sweep) and writes ``ablation.json``,
``ablation.csv``, ``ablation.md`` and one ``plot_<metric>.png`` per metric.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samdiffsr.cli import UserError
from samdiffsr.evaluation.stats import PairedDifference, bootstrap_mean, format_difference, images_needed, verdict
from samdiffsr.io import atomic_write, atomic_write_text

# Columns of results_per_image.csv that are not metrics.
_NOT_METRICS = ("checkpoint", "step", "set", "image", "sr_seconds")
BICUBIC = "bicubic"

# (step or BICUBIC) -> "set/image" -> metric -> value
Scores = dict[Any, dict[str, dict[str, float]]]


class AblationError(UserError):
    """Missing or mismatched benchmark results: the message names the file."""


@dataclass(frozen=True)
class Comparison:
    """One arm against the baseline arm, at one step, on one metric."""

    arm: str
    baseline: str
    step: int
    metric: str
    arm_mean: float
    baseline_mean: float
    diff: PairedDifference

    def row(self) -> dict[str, Any]:
        d = self.diff
        return {"arm": self.arm, "baseline": self.baseline, "step": self.step, "metric": self.metric,
                "arm_mean": self.arm_mean, "baseline_mean": self.baseline_mean, "diff": d.mean,
                "ci_low": d.low, "ci_high": d.high, "seeds": d.seeds, "images": d.images,
                "verdict": verdict(self.metric, d)}


def read_scores(path: Path) -> Scores:
    """A benchmark's per-image results, keyed by step (bicubic rows under ``BICUBIC``)."""
    if not path.is_file():
        raise AblationError(f"benchmark results not found: {path}")
    scores: Scores = defaultdict(dict)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            key = BICUBIC if row["checkpoint"] == BICUBIC else int(row["step"]) if row["step"] else None
            if key is None:  # a weights file outside a run: no step to pair on
                continue
            scores[key][f"{row['set']}/{row['image']}"] = {
                k: float(v) for k, v in row.items() if k not in _NOT_METRICS and v not in ("", None)}
    return dict(scores)


def _grid(runs: list[Scores], step: Any, metric: str, images: list[str]) -> np.ndarray:
    return np.array([[run[step][image][metric] for image in images] for run in runs])


def _common(runs: dict[str, list[Scores]], metric: str) -> tuple[list[int], list[str]]:
    """Steps every run scored, and the images every run scored at all of those steps."""
    all_runs = [run for arm_runs in runs.values() for run in arm_runs]
    steps = sorted(set.intersection(*(set(k for k in run if k != BICUBIC) for run in all_runs)))
    images = sorted(set.intersection(*(
        {im for im, m in run[step].items() if metric in m} for run in all_runs for step in steps))) if steps else []
    return steps, images


def compare(runs: dict[str, list[Scores]], metrics: list[str], resamples: int = 10000
            ) -> tuple[list[Comparison], dict[str, Any]]:
    """Paired comparisons of every arm against the first, and every arm's own curve (mean and interval).

    ``runs`` maps arm -> its runs' scores, in seed order (the same seeds for every arm).
    """
    arms = list(runs)
    baseline = arms[0]
    comparisons: list[Comparison] = []
    curves: dict[str, Any] = {"bicubic": {}, "arms": {arm: {} for arm in arms}}
    for metric in metrics:
        steps, images = _common(runs, metric)
        if not images:
            raise AblationError(f"no image has '{metric}' at a step that every arm x seed scored")
        base_bicubic = runs[baseline][0].get(BICUBIC, {})
        values = [base_bicubic[i][metric] for i in images if metric in base_bicubic.get(i, {})]
        curves["bicubic"][metric] = float(np.mean(values)) if values else None
        for arm in arms:
            curves["arms"][arm][metric] = [
                {"step": step, **asdict(bootstrap_mean(_grid(runs[arm], step, metric, images), resamples))}
                for step in steps]
        for arm in arms[1:]:
            for step in steps:
                arm_grid, base_grid = (_grid(runs[a], step, metric, images) for a in (arm, baseline))
                comparisons.append(Comparison(arm, baseline, step, metric, float(arm_grid.mean()),
                                              float(base_grid.mean()),
                                              bootstrap_mean(arm_grid - base_grid, resamples)))
    return comparisons, curves


def verdict_lines(comparisons: list[Comparison]) -> list[str]:
    """At each arm's last step, one line per metric: the difference, its interval, and what it means."""
    last: dict[tuple[str, str], Comparison] = {}
    for c in comparisons:
        if (c.arm, c.metric) not in last or c.step > last[(c.arm, c.metric)].step:
            last[(c.arm, c.metric)] = c
    lines = []
    for c in last.values():
        d, word = c.diff, verdict(c.metric, c.diff)
        text = (f"{c.arm} vs {c.baseline}, step {c.step}, {c.metric}: {format_difference(c.metric, d)} "
                f"(95% CI over {d.seeds} seeds x {d.images} images): ")
        if word == "within noise":
            need = images_needed(d)
            text += "within noise, the interval includes 0" + (
                f"; resolving a difference this size would take about {need} images at {d.seeds} seeds"
                if need else "")
        else:
            text += f"{word}, the interval excludes 0"
        lines.append(text)
    return lines


def write_outputs(out: Path, spec: dict[str, Any], comparisons: list[Comparison], curves: dict[str, Any]) -> None:
    """ablation.json, ablation.csv, ablation.md and the plots, each written atomically."""
    rows = [c.row() for c in comparisons]
    lines = verdict_lines(comparisons)
    atomic_write_text(out / "ablation.json", json.dumps(
        {"spec": spec, "comparisons": rows, "curves": curves, "verdicts": lines}, indent=1) + "\n")
    header = list(rows[0]) if rows else ["arm"]
    body = [",".join(header)] + [",".join(_csv(r[k]) for k in header) for r in rows]
    atomic_write_text(out / "ablation.csv", "\n".join(body) + "\n")
    atomic_write_text(out / "ablation.md", markdown(spec, rows, lines))
    for metric in curves["bicubic"]:
        atomic_write(out / f"plot_{metric}.png", lambda p, m=metric: plot_metric(p, m, curves, comparisons))


def _csv(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def markdown(spec: dict[str, Any], rows: list[dict[str, Any]], lines: list[str]) -> str:
    arms = ", ".join(f"`{name}` ({' '.join(o) or 'the config as is'})" for name, o in spec["arms"].items())
    out = ["# Ablation", "", f"Config `{spec['config']}`; arms {arms}; seeds {spec['seeds']}.",
           "Differences are paired (same images, same sampler noise, same initial weights and batches per seed);",
           "intervals are 95% bootstrap intervals over images and seeds.", "", "## Verdict", ""]
    out += [f"- {line}" for line in lines]
    out += ["", "## Every step", "", "| arm | step | metric | arm | baseline | difference | 95% CI | verdict |",
            "|---|---:|---|---:|---:|---:|---|---|"]
    out += [f"| {r['arm']} | {r['step']} | {r['metric']} | {r['arm_mean']:.4f} | {r['baseline_mean']:.4f} | "
            f"{r['diff']:+.4f} | [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['verdict']} |" for r in rows]
    return "\n".join(out) + "\n"


def plot_metric(path: Path, metric: str, curves: dict[str, Any], comparisons: list[Comparison]) -> None:
    """Left, what the verdict is about: each arm minus the first arm per step, with its paired 95% band (the
    band excludes image-to-image spread, which pairing cancels). Right, for context: every arm's own mean with
    its band (dominated by that spread), and bicubic."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (paired, absolute) = plt.subplots(1, 2, figsize=(11, 4))
    arms = list(curves["arms"])
    for index, arm in enumerate(arms[1:], start=1):  # colour Cn is arm n in both panels
        points = sorted((c for c in comparisons if c.arm == arm and c.metric == metric), key=lambda c: c.step)
        steps = [c.step for c in points]
        paired.plot(steps, [c.diff.mean for c in points], marker="o", color=f"C{index}", label=f"{arm} - {arms[0]}")
        paired.fill_between(steps, [c.diff.low for c in points], [c.diff.high for c in points], color=f"C{index}",
                            alpha=0.25)
    paired.axhline(0.0, color="black", linewidth=0.8)
    paired.set_xlabel("training step")
    paired.set_ylabel(f"{metric} difference")
    paired.set_title(f"paired difference vs {arms[0]}, 95% bootstrap band", fontsize=10)
    paired.legend()
    for index, (arm, by_metric) in enumerate(curves["arms"].items()):
        points = by_metric[metric]
        steps = [p["step"] for p in points]
        absolute.plot(steps, [p["mean"] for p in points], marker="o", color=f"C{index}", label=arm)
        absolute.fill_between(steps, [p["low"] for p in points], [p["high"] for p in points], color=f"C{index}",
                              alpha=0.15)
    if curves["bicubic"].get(metric) is not None:
        absolute.axhline(curves["bicubic"][metric], color="grey", linestyle="--", label="bicubic")
    absolute.set_xlabel("training step")
    absolute.set_ylabel(metric)
    absolute.set_title(f"{metric}: mean over seeds x images, 95% band", fontsize=10)
    absolute.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
