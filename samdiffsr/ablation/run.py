"""Run an ablation on this machine: train every arm x seed (one after another, each with the usual DeepSpeed
ranks), score every run's checkpoints on the same sets with the same sampler noise, then compare.

Every stage resumes: a finished training run is not relaunched, an interrupted one continues from its latest
checkpoint, finished (checkpoint, set) pairs are not scored again, and the comparison is recomputed from files.
"""

from __future__ import annotations

import json
from pathlib import Path

from samdiffsr.ablation.analysis import compare, read_scores, verdict_lines, write_outputs
from samdiffsr.ablation.page import write_page
from samdiffsr.ablation.plan import AblationSpec
from samdiffsr.cli import EXIT_FAILED, UserError
from samdiffsr.io import atomic_write_text

SPEC_FILE = "ablation_spec.json"


class AblationRunError(UserError):
    """A stage failed; the message names the arm, the seed and how to resume."""

    exit_code = EXIT_FAILED


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def pin_spec(spec: AblationSpec) -> None:
    """Write the spec into OUT, or check that OUT holds this same ablation (a rerun resumes it)."""
    path = Path(spec.out) / SPEC_FILE
    wanted = spec.to_dict()
    if path.is_file():
        held = json.loads(path.read_text())
        if held != json.loads(json.dumps(wanted)):
            changed = sorted(k for k in wanted if held.get(k) != json.loads(json.dumps(wanted[k])))
            raise UserError(f"{spec.out} holds another ablation (it differs in: {', '.join(changed)}); "
                            "give another --out, or the same arguments to resume it")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(wanted, indent=1) + "\n")


def train_arms(spec: AblationSpec) -> None:
    from samdiffsr.train.launch import launch_training

    jobs = [(arm, seed) for arm in spec.arms for seed in spec.seed_values()]
    for i, (arm, seed) in enumerate(jobs, 1):
        _banner(f"training {i}/{len(jobs)}: arm {arm.name}, seed {seed} ({' '.join(arm.overrides) or 'as is'})")
        code = launch_training(spec.config, spec.train_overrides(arm, seed), spec.ranks, spec.run_dir(arm, seed))
        if code != 0:
            raise AblationRunError(f"training arm {arm.name} seed {seed} failed (exit status {code}, see above); "
                                   "rerun the same command to resume")


def score_arms(spec: AblationSpec) -> None:
    from samdiffsr.evaluation.benchmark_cli import main as benchmark_main

    jobs = [(arm, seed) for arm in spec.arms for seed in spec.seed_values()]
    for i, (arm, seed) in enumerate(jobs, 1):
        _banner(f"scoring {i}/{len(jobs)}: arm {arm.name}, seed {seed}")
        code = benchmark_main(spec.bench_args(arm, seed))
        if code != 0:
            raise AblationRunError(f"scoring arm {arm.name} seed {seed} failed (exit status {code}, see above); "
                                   "rerun the same command to resume")


def analyse(spec: AblationSpec, resamples: int = 10000) -> list[str]:
    """Compare every arm with the first; write ablation.{json,csv,md} and the plots; return the verdicts."""
    runs = {arm.name: [read_scores(spec.bench_dir(arm, seed) / "results_per_image.csv")
                       for seed in spec.seed_values()] for arm in spec.arms}
    metrics = [m for m in spec.metrics.split(",") if m and not m.startswith("fid")]  # FID has no per-image value
    comparisons, curves = compare(runs, metrics, resamples)
    write_outputs(Path(spec.out), spec.to_dict(), comparisons, curves)
    lines = verdict_lines(comparisons)
    write_page(Path(spec.out), spec.to_dict(), [c.row() for c in comparisons], lines,
               {arm.name: [spec.bench_dir(arm, seed) for seed in spec.seed_values()] for arm in spec.arms})
    return lines


def run_ablation(spec: AblationSpec) -> list[str]:
    """Every stage, in order; returns the verdict lines."""
    for warning in spec.check():
        print(f"warning: {warning}", flush=True)
    pin_spec(spec)
    train_arms(spec)
    score_arms(spec)
    _banner("comparison: every arm against the first, paired per image and seed")
    lines = analyse(spec)
    out = Path(spec.out)
    print("\n".join(lines))
    print(f"\ntable:  {out / 'ablation.md'}  ({out / 'ablation.csv'}, {out / 'ablation.json'})\n"
          f"page:   {out / 'ablation.html'}  (links each run's benchmark page)\n"
          f"plots:  {', '.join(str(p) for p in sorted(out.glob('plot_*.png')))}")
    return lines
