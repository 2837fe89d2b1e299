"""Every arm of an ablation folder against bicubic, per step: the mean over seeds x images of SR - bicubic for
PSNR-Y and SSIM-Y with its 95% paired bootstrap interval (seeds and images resampled, as bench/RESULTS.md's
lever tables), and the first step at which the arm beats bicubic in both (both intervals above 0).

    python bench/levers_vs_bicubic.py ABLATION_OUT [--md FILE]

Reads OUT/bench/<arm>/seed<s>/results_per_image.csv; arms with a missing seed are reported as such. Used by
bench/gpu_levers.sh; works on a partial ablation (no ablation.md needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from samdiffsr.ablation.analysis import BICUBIC, read_scores
from samdiffsr.evaluation.stats import bootstrap_mean, format_difference

METRICS = ("psnr_y", "ssim_y")


def arm_rows(seed_dirs: list[Path]) -> tuple[list[str], int | None]:
    runs = [read_scores(d / "results_per_image.csv") for d in seed_dirs]
    steps = sorted(set.intersection(*(set(k for k in r if k != BICUBIC) for r in runs)))
    rows, first = [], None
    for step in steps:
        cells, both = [], True
        for metric in METRICS:
            images = sorted(set.intersection(*(
                {i for i, m in r[step].items() if metric in m and metric in r.get(BICUBIC, {}).get(i, {})}
                for r in runs)))
            grid = np.array([[r[step][i][metric] - r[BICUBIC][i][metric] for i in images] for r in runs])
            diff = bootstrap_mean(grid)
            sr = float(np.mean([[r[step][i][metric] for i in images] for r in runs]))
            cells.append(f"{sr:.4f} | {format_difference(metric, diff)}")
            both = both and diff.low > 0
        if both and first is None:
            first = step
        rows.append(f"| {step} | {' | '.join(cells)} | {'yes' if both else 'no'} |")
    return rows, first


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--md", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    bench = args.out / "bench"
    lines = [f"# Each arm against bicubic ({args.out})", "",
             "Mean over seeds x images; 95% paired bootstrap interval of SR - bicubic (seeds and images resampled).",
             ""]
    firsts = []
    for arm_dir in sorted(p for p in bench.glob("*") if p.is_dir()) if bench.is_dir() else []:
        seed_dirs = sorted(d for d in arm_dir.glob("seed*") if (d / "results_per_image.csv").is_file())
        if not seed_dirs:
            lines += [f"## {arm_dir.name}: no results_per_image.csv", ""]
            continue
        try:
            rows, first = arm_rows(seed_dirs)
        except (KeyError, ValueError) as err:
            lines += [f"## {arm_dir.name}: unreadable ({err!r})", ""]
            continue
        firsts.append(f"- {arm_dir.name} ({len(seed_dirs)} seeds): first step beating bicubic in both: "
                      f"{first if first is not None else 'none'}")
        lines += [f"## {arm_dir.name} ({', '.join(d.name for d in seed_dirs)})", "",
                  "| step | PSNR-Y | - bicubic | SSIM-Y | - bicubic | beats bicubic in both? |",
                  "|---:|---:|---|---:|---|---|", *rows, ""]
    text = "\n".join(lines[:4] + firsts + [""] + lines[4:]) + "\n"
    print(text)
    if args.md:
        args.md.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
