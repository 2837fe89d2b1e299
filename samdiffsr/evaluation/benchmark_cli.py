"""Benchmark sweeps: checkpoints x sets x metrics -> results.csv/.json/.md/.html and a plot per metric.

    python launcher/benchmark.py --run runs/x --sets Set5=shards/benchmark/set5 HR/Set14 --ckpts every:10000
    python launcher/benchmark.py --weights model_ckpt_steps_400000.ckpt --sets ... --out bench_paper --html-crops
    torchrun --nproc_per_node 8 launcher/benchmark.py --run runs/x --sets ...     (one process per GPU)
    python launcher/benchmark.py --sr-dir Set5=SR --hr-dir HR --out eval        (score existing outputs)

Rows are the checkpoints plus ``bicubic`` (MATLAB-bicubic upsampling of the same LR: the baseline; not with
``--sr-dir``, whose one row ``sr_dir`` is the folder's images). results.html shows the table, the plots and,
with ``--html-crops`` or ``--save-images``, the same crop of every image from every row. Work is
shared image by image between the processes (``RANK`` / ``WORLD_SIZE`` from torchrun or deepspeed, or
Slurm's ``SLURM_PROCID`` / ``SLURM_NTASKS``); rank 0 gathers through files and writes the report (see
:mod:`samdiffsr.evaluation.results`). Batching: images whose (padded) size is equal, or with ``--tile``
all tiles of equal size from any images, share network calls, ``--batch`` at a time; no padding between
images, so a score never depends on the batch (see :mod:`samdiffsr.evaluation.tiling`). Finished
(checkpoint, set) pairs and scored images are not recomputed on a rerun.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from samdiffsr.cli import ArgumentParser, UserError, run_cli
from samdiffsr.config import Config, load_config
from samdiffsr.data.pairs import SetSource
from samdiffsr.distributed import rank_and_world
from samdiffsr.evaluation.crops import DEFAULT_CROP
from samdiffsr.evaluation.inference import SamplerSettings
from samdiffsr.evaluation.results import FID_MODES, GatherTimeout, SettingsMismatch
from samdiffsr.evaluation.sets import parse_set
from samdiffsr.evaluation.suite import ALL_METRICS, DEFAULT_FID_MODE, DEFAULT_METRICS
from samdiffsr.evaluation.sweep import (
    BenchmarkError,
    SweepRow,
    SweepSpec,
    run_checkpoints,
    run_sweep,
    weight_rows,
)
from samdiffsr.models.inputs import PRECISION_DTYPES
from samdiffsr.models.loading import default_device, resolve_config
from samdiffsr.models.samplers import SAMPLERS
from samdiffsr.models.weights import read_checkpoint

SR_DIR_ROW = "sr_dir"  # the row label of --sr-dir's images
SAMPLING_ONLY = ("steps", "eta", "sampler", "seed", "tile", "overlap", "precision", "lr_up_divisor", "no_ema")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="benchmark", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate checkpoints of a run (and/or weight files, e.g. the authors' "
        "model_ckpt_steps_400000.ckpt) on benchmark sets, next to plain bicubic upsampling.",
        epilog=__doc__)
    _input_options(p.add_argument_group("what to evaluate"))
    _metric_options(p.add_argument_group("metrics"))
    _sampling_options(p.add_argument_group("sampling (not with --sr-dir)"))
    _output_options(p.add_argument_group("output"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (default: none)")
    return p


def _input_options(src: argparse._ArgumentGroup) -> None:
    src.add_argument("--run", help="training run folder: reads <run>/weights/stepN.pt and <run>/config.yaml "
                     "(default: none)")
    src.add_argument("--ckpts", nargs="+", default=["all"],
                     help="with --run: all | latest | every:K | step numbers (default: all)")
    src.add_argument("--weights", nargs="+", default=[],
                     help="explicit weights files, ours or the authors' (default: none)")
    src.add_argument("--sets", nargs="+", default=[], help="NAME=PATH or PATH: benchmark shards (folder or "
                     "pattern, from make_shards --benchmark) or a folder of HR images (default: none)")
    src.add_argument("--sr-dir", metavar="[NAME=]PATH", help="instead: score the existing SR images of this "
                     "folder against --hr-dir, matched by file name; the set is named NAME, else after the SR "
                     "folder; no bicubic row, no sampling (default: none)")
    src.add_argument("--hr-dir", help="the HR folder for --sr-dir (default: none)")
    src.add_argument("--no-bicubic", action="store_true",
                     help="leave out the bicubic baseline row (default: off, the row is there)")


def _metric_options(m: argparse._ArgumentGroup) -> None:
    m.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated, from {', '.join(ALL_METRICS)}; fid means FID in --fid-mode "
                   f"(default: {','.join(DEFAULT_METRICS)})")
    m.add_argument("--fid-mode", choices=tuple(FID_MODES), default=DEFAULT_FID_MODE,
                   help="FID's input pipeline and column name: clean (clean-fid, pyiqa's default: the paper's "
                   "protocol; column fid_clean) or legacy (pytorch-fid; column fid_legacy) (default: %(default)s)")
    m.add_argument("--lpips-weights", nargs="+", default=None,
                   help="alexnet-owt-7be5be79.pth and alex.pth, files or a folder "
                   "(default: the torch hub cache, $TORCH_HOME/hub/checkpoints)")
    m.add_argument("--fid-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth, file or folder "
                   "(default: the torch hub cache, $TORCH_HOME/hub/checkpoints)")


def _sampling_options(s: argparse._ArgumentGroup) -> None:
    s.add_argument("--config", help="model config (default: <run>/config.yaml, else the weights' own)")
    s.add_argument("--steps", type=int, default=None,
                   help="sampler steps; fewer than T: respaced DDIM (default: all T steps)")
    s.add_argument("--eta", type=float, default=0.0,
                   help="DDIM eta: 0 deterministic, 1 respaced ancestral (default: %(default)s)")
    s.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddpm (all T steps), ddim or dpmpp_2m (DPM-Solver++ 2M), with --steps "
                   "(default: ddpm, or ddim when --steps is given)")
    s.add_argument("--seed", type=int, default=0, help="noise seed, with each image's name (default: %(default)s)")
    s.add_argument("--batch", type=int, default=4, help="images (or tiles) per network call (default: %(default)s)")
    s.add_argument("--tile", type=int, default=0, help="tile size in LR pixels, 0: whole images (default: 0)")
    s.add_argument("--overlap", type=int, default=16, help="tile overlap in LR pixels (default: %(default)s)")
    s.add_argument("--precision", default="fp32", choices=tuple(PRECISION_DTYPES),
                   help="sampling precision (default: %(default)s)")
    s.add_argument("--lr-up-divisor", type=float, default=None,
                   help="LR is divided by this (255 or 256) for the model's bicubic input "
                   "(default: 256 for the authors' checkpoint, else the config's model.lr_up_divisor)")
    s.add_argument("--no-ema", action="store_true",
                   help="use the raw weights, not the EMA ones (default: off, EMA when the file has them)")
    s.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _output_options(o: argparse._ArgumentGroup) -> None:
    o.add_argument("--out", help="output folder (default: <run>/benchmark)")
    o.add_argument("--save-images", action="store_true",
                   help="also write the SR images under <out>/images, and the crops of results.html (default: off)")
    o.add_argument("--html-crops", action="store_true",
                   help="write the crops that results.html compares side by side, under <out>/crops "
                   "(default: off; on with --save-images)")
    o.add_argument("--crop-size", type=int, default=DEFAULT_CROP,
                   help="side of those crops in HR pixels (default: %(default)s)")
    o.add_argument("--gather-timeout", type=float, default=6 * 3600.0,
                   help="seconds rank 0 waits for the other ranks' results (default: %(default)s)")
    o.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")


def _base_config(args: argparse.Namespace) -> tuple[Config, str | None]:
    """The config that fixes scale and crop for every row, and the path models are built from."""
    if args.config:
        return load_config(args.config, args.overrides), args.config
    if args.run and (Path(args.run) / "config.yaml").is_file():
        path = str(Path(args.run) / "config.yaml")
        return load_config(path, args.overrides), path
    if args.weights:
        return resolve_config(read_checkpoint(args.weights[0]), None, args.overrides), None
    if args.run:
        first = run_checkpoints(args.run, "latest")[0].path
        return resolve_config(read_checkpoint(first), None, args.overrides), None
    return load_config(None, args.overrides), None


def sr_dir_inputs(args: argparse.Namespace) -> tuple[list[SweepRow], list[SetSource]]:
    """``--sr-dir [NAME=]PATH --hr-dir HR``: one row of existing SR images, one set named NAME or after PATH."""
    if not args.hr_dir or args.run or args.weights or args.sets:
        raise BenchmarkError("--sr-dir goes with --hr-dir only (no --run / --weights / --sets)")
    given = [f"--{k.replace('_', '-')}" for k in SAMPLING_ONLY if getattr(args, k) != build_parser().get_default(k)]
    if given:
        raise BenchmarkError(f"--sr-dir scores existing images: {', '.join(given)} do(es) not apply")
    name, sep, path = args.sr_dir.partition("=")
    if not sep or not name or not path:  # a plain path (which may itself contain '=')
        name, path = "", args.sr_dir
    if not Path(path).is_dir():
        raise BenchmarkError(f"--sr-dir: not a folder: {path}")
    if not Path(args.hr_dir).is_dir():
        raise BenchmarkError(f"--hr-dir: not a folder: {args.hr_dir}")
    name = name or Path(path).resolve().name
    return [SweepRow(SR_DIR_ROW, "folder", path)], [SetSource(name, args.hr_dir, "folder")]


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    rank, world = rank_and_world(BenchmarkError)
    cfg, config_path = _base_config(args)
    rows: list[SweepRow] = []
    if args.sr_dir:
        rows, sets = sr_dir_inputs(args)
    else:
        if args.run:
            rows += run_checkpoints(args.run, args.ckpts)
        rows += weight_rows(args.weights)
        if not rows and args.no_bicubic:
            raise BenchmarkError("nothing to evaluate: give --run, --weights or --sr-dir")
        if not args.sets:
            raise BenchmarkError("give the benchmark sets with --sets NAME=PATH ...")
        sets = [parse_set(s) for s in args.sets]
        if not args.no_bicubic:
            rows.insert(0, SweepRow("bicubic", "bicubic"))
    out = args.out or (str(Path(args.run) / "benchmark") if args.run else None)
    if not out:
        raise BenchmarkError("give --out (the default, <run>/benchmark, needs --run)")
    if args.crop_size < 1:
        raise BenchmarkError(f"--crop-size must be at least 1 (HR pixels), got {args.crop_size}")
    sampler = None if args.sr_dir else SamplerSettings(
        steps=args.steps, eta=args.eta, sampler=args.sampler, seed=args.seed, tile=args.tile,
        overlap=args.overlap, precision=args.precision, batch=args.batch)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    return SweepSpec(out=out, rows=rows, sets=sets, metrics=metrics,
                     config=cfg, config_path=config_path, overrides=tuple(args.overrides), sampler=sampler,
                     lr_up_divisor=args.lr_up_divisor, prefer_ema=not args.no_ema,
                     lpips_weights=args.lpips_weights, fid_weights=args.fid_weights, device=args.device,
                     save_images=args.save_images, sr_dir=args.sr_dir, rank=rank, world=world,
                     crop_size=args.crop_size if (args.html_crops or args.save_images) else 0,
                     fid_mode=args.fid_mode, gather_timeout=args.gather_timeout, progress=not args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """``launcher/benchmark.py``: 0 done, 2 a user error (one line by rank 0; samdiffsr.cli)."""
    return run_cli("benchmark", lambda: _sweep_cli(argv))


def _sweep_cli(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        if spec.world > 1 and (spec.device or str(default_device())) == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            import torch

            # Several CPU processes on one machine: split the cores instead of oversubscribing them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
        result = run_sweep(spec)
    except (GatherTimeout, SettingsMismatch) as exc:
        raise UserError(str(exc)) from exc
    if result is None:
        return 0
    print(Path(result["paths"]["md"]).read_text())
    print("written:", *[str(p) for p in result["paths"].values()], *[str(p) for p in result["plots"]], sep="\n  ")
    return 0
