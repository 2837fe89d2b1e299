"""The whole system in one command, on built-in photos: ``python launcher/demo.py``.

    demo shards (skimage photos, Felzenszwalb masks)  ->  RRDB pretraining (2 ranks)
    ->  modulated-diffusion training (2 ranks, DeepSpeed; CPU when there is no GPU)
    ->  benchmark sweep over the checkpoints it wrote, on held-out photos, against plain bicubic
    ->  results table + plots, paths printed at the end.

Every stage resumes: rerunning the command skips finished shards, continues (or skips) finished
training runs from their latest checkpoint, and does not recompute finished benchmark pairs.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from samdiffsr.cli import EXIT_FAILED, EXIT_OK, ArgumentParser, UserError, run_cli

REPO = Path(__file__).resolve().parents[1]


class DemoError(UserError):
    """A stage of the demo failed; the message names the stage and where its log is."""

    exit_code = EXIT_FAILED


def check_settings(rrdb_steps: int | None, steps: int | None, ckpt_every: int | None, ranks: int,
                   bench_steps: int, overrides: tuple[str, ...]) -> None:
    """Refuse bad settings before the first stage runs (ConfigError names the key)."""
    from samdiffsr.config import load_config

    if ranks < 1 or bench_steps < 1:
        raise UserError(f"--ranks and --bench-steps must be >= 1 (got {ranks}, {bench_steps})")
    for config, max_steps in (("demo_rrdb.yaml", rrdb_steps), ("demo.yaml", steps)):
        extra = [f"train.max_steps={max_steps}"] if max_steps is not None else []
        extra += [f"train.ckpt_every={ckpt_every}"] if ckpt_every is not None else []
        load_config(REPO / "configs" / config, [*overrides, *extra])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def launch_training(config: str, overrides: list[str], ranks: int) -> None:
    """Run launcher/train.py under the DeepSpeed launcher with `ranks` data-parallel processes."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    gpus = torch.cuda.device_count()
    if gpus == 0:
        # CPU ranks: DeepSpeed's CPU accelerator + gloo; one thread per rank so the ranks don't fight.
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ranks)))
    else:
        ranks = min(ranks, gpus)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes", "1", "--num_gpus", str(ranks),
           "--master_port", str(_free_port()), str(REPO / "launcher" / "train.py"), "--config", config, *overrides]
    print("$ " + " ".join(cmd[2:]), flush=True)
    if subprocess.run(cmd, env=env, cwd=REPO).returncode != 0:
        raise DemoError(f"training with {config} failed (see the output above)")


def verdict(results_csv: Path, metric: str = "psnr_y") -> str:
    """One line saying whether the best checkpoint beats bicubic upsampling on `metric`."""
    import csv

    rows = [r for r in csv.DictReader(results_csv.open()) if r["metric"] == metric]
    bicubic = [float(r["value"]) for r in rows if r["checkpoint"] == "bicubic"]
    trained = [(float(r["value"]), r["checkpoint"]) for r in rows if r["checkpoint"] != "bicubic"]
    if not bicubic or not trained:
        return f"no {metric} results to compare"
    best, name = max(trained)
    gain = best - bicubic[0]
    if gain > 0:
        return f"training helped: {name} beats bicubic by {gain:+.2f} dB {metric} ({best:.2f} vs {bicubic[0]:.2f})"
    return (f"training has not beaten bicubic yet: best {name} {best:.2f} dB vs bicubic {bicubic[0]:.2f} "
            f"({gain:+.2f} dB {metric}); train longer (--steps, --rrdb-steps) to close the gap")


def run_demo(workdir: str = "runs", shards: str = "shards/demo", ranks: int = 2, rrdb_steps: int | None = None,
             steps: int | None = None, ckpt_every: int | None = None, overrides: tuple[str, ...] = (),
             bench_steps: int = 10) -> Path:
    """Run every stage; returns the benchmark output folder."""
    from samdiffsr.data.shardcli import run_demo as make_demo_shards
    from samdiffsr.evaluation.benchmark import main as benchmark_main

    start = time.perf_counter()
    work, shards_dir = Path(workdir), Path(shards)
    rrdb_run, sr_run = work / "demo_rrdb", work / "demo"
    data = [f"data.train_shards={shards_dir / 'train'}", f"data.val_shards={shards_dir / 'val'}"]

    _banner("1/4 demo shards: skimage photos -> Felzenszwalb masks -> SPE -> WebDataset tars")
    code = make_demo_shards(shards_dir)
    if code not in (0, 1):
        raise DemoError(f"make_shards failed with exit status {code}")

    _banner("2/4 RRDB pretraining (the LR encoder), data-parallel")
    rrdb = [*data, f"train.run_dir={rrdb_run}", *overrides]
    if rrdb_steps is not None:
        rrdb.append(f"train.max_steps={rrdb_steps}")
    if ckpt_every is not None:
        rrdb.append(f"train.ckpt_every={ckpt_every}")
    launch_training(str(REPO / "configs" / "demo_rrdb.yaml"), rrdb, ranks)

    _banner("3/4 SAM-DiffSR: modulated-diffusion training on the frozen RRDB, data-parallel")
    sr = [*data, f"train.run_dir={sr_run}", f"train.rrdb_ckpt={rrdb_run / 'weights' / 'latest.pt'}", *overrides]
    if steps is not None:
        sr.append(f"train.max_steps={steps}")
    if ckpt_every is not None:
        sr += [f"train.ckpt_every={ckpt_every}", f"train.val_every={ckpt_every}"]
    launch_training(str(REPO / "configs" / "demo.yaml"), sr, ranks)

    # The full 100-step sampler on whole 400x600 photos takes minutes per image on a CPU; the demo uses the
    # respaced sampler (benchmark.py without --steps runs the full one).
    _banner(f"4/4 benchmark: every checkpoint vs bicubic on the held-out photos ({bench_steps}-step sampler)")
    out = sr_run / "benchmark"
    argv = ["--run", str(sr_run), "--ckpts", "all", "--sets", f"demo_val={shards_dir / 'val'}",
            "--metrics", "psnr_y,ssim_y,psnr_y_paper,ssim_y_paper", "--out", str(out), "--steps", str(bench_steps)]
    if benchmark_main(argv) != 0:
        raise DemoError("the benchmark sweep failed (see the output above)")

    table = out / "results.md"
    _banner(f"results ({time.perf_counter() - start:.0f} s in all)")
    if table.exists():
        print(table.read_text())
        print(verdict(out / "results.csv") + "\n")
    print(f"table:       {table}\n"
          f"per image:   {out / 'results.csv'}  {out / 'results.json'}\n"
          f"plots:       {', '.join(str(p) for p in sorted(out.glob('*.png')))}\n"
          f"weights:     {sr_run / 'weights'}  (python launcher/infer.py --ckpt {sr_run / 'weights' / 'latest.pt'}"
          f" --img-dir LR --save-dir SR)\n"
          f"TensorBoard: tensorboard --logdir {work}   (curves, and LR / bicubic / SR / HR images)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs", help="where the demo's runs go (default: runs/)")
    parser.add_argument("--shards", default="shards/demo", help="where the demo shards go")
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel processes (GPUs, or CPU ranks)")
    parser.add_argument("--rrdb-steps", type=int, default=None, help="RRDB pretraining steps (configs/demo_rrdb)")
    parser.add_argument("--steps", type=int, default=None, help="diffusion training steps (configs/demo)")
    parser.add_argument("--ckpt-every", type=int, default=None, help="checkpoint (and benchmark) interval")
    parser.add_argument("--bench-steps", type=int, default=10, help="sampler steps in the demo's benchmark")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for both runs")
    return run_cli("demo", lambda: _run_demo_cli(parser.parse_args(argv)))


def _run_demo_cli(args: argparse.Namespace) -> int:
    check_settings(args.rrdb_steps, args.steps, args.ckpt_every, args.ranks, args.bench_steps, tuple(args.overrides))
    run_demo(args.workdir, args.shards, args.ranks, args.rrdb_steps, args.steps, args.ckpt_every,
             tuple(args.overrides), args.bench_steps)
    return EXIT_OK
