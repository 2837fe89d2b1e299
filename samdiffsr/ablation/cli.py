"""Command line of ``ablate`` (``launcher/ablate.py``; ``launcher/submit.py ablate`` takes the same arguments)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from samdiffsr.ablation.plan import AblationSpec, parse_arm
from samdiffsr.cli import EXIT_OK, ArgumentParser, run_cli

EXAMPLE = """\
example (does SAM modulation help on the demo data? 2 arms x 2 seeds):
  python launcher/ablate.py --config configs/demo.yaml train.rrdb_ckpt=runs/demo_rrdb/weights/latest.pt \\
      --arm sam= --arm plain=model.sam_modulation=false --seeds 2 --sets demo=shards/demo/val \\
      --sampler ddim --steps 10 --eta 1 --out runs/ablate-demo

An arm is NAME= (the config as is) or NAME=key=value[,key=value...]. Arm k with seed s trains with
train.seed=s in OUT/runs/NAME/seed<s>; all arms with seed s start from the same weights and see the same
batches. Results: OUT/ablation.md (.csv, .json) and OUT/plot_<metric>.png. Rerun the same command to resume.
"""


def add_ablation_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config every arm starts from (configs/*.yaml)")
    p.add_argument("--arm", action="append", required=True, metavar="NAME=[key=value,...]",
                   help="an arm: its name and config overrides; the first arm is the baseline (repeat)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per arm (train.seed, +1, ...; default: 1)")
    p.add_argument("--sets", nargs="+", required=True, metavar="NAME=PATH",
                   help="benchmark sets every checkpoint is scored on (shards or image folders)")
    p.add_argument("--out", required=True, help="ablation folder (runs/, bench/, ablation.*, plots)")
    p.add_argument("--ranks", type=int, default=2, help="data-parallel processes per training run (default: 2)")
    p.add_argument("--metrics", default="psnr_y,ssim_y", help="per-image metrics to compare (default: psnr_y,ssim_y)")
    p.add_argument("--sampler", default=None, help="benchmark sampler (default: the paper's full DDPM chain)")
    p.add_argument("--steps", type=int, default=None, help="benchmark sampler steps (default: all T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta of the benchmark sampler (default: 0)")
    p.add_argument("--bench-seed", type=int, default=0, help="sampler noise seed, the same for every arm (default: 0)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every arm")


def spec_from_args(args: argparse.Namespace) -> AblationSpec:
    return AblationSpec(config=args.config, arms=tuple(parse_arm(a) for a in args.arm), seeds=args.seeds,
                        sets=tuple(args.sets), out=args.out, overrides=tuple(args.overrides), ranks=args.ranks,
                        metrics=args.metrics, sampler=args.sampler, steps=args.steps, eta=args.eta,
                        bench_seed=args.bench_seed)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ablate", description="Paired ablation: train arms that differ only in config "
                            "overrides, score them on the same images and noise, and say whether the "
                            "differences are more than noise.", epilog=EXAMPLE,
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_ablation_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``launcher/ablate.py``: 0 done; 2 a user error; 4 a stage failed (rerun to resume)."""
    def run() -> int:
        from samdiffsr.ablation.run import run_ablation

        run_ablation(spec_from_args(build_parser().parse_intermixed_args(argv)))
        return EXIT_OK

    return run_cli("ablate", run)
