"""Seconds per image for SR sampling: the T-step sampler and the fewer-step one, batch 1 and batched.

All variants run in one process on the same random-weight model (speed does not depend on the weights),
and are reported as seconds per image and as a ratio to the baseline measured in the same run: the
model's own ``GaussianDiffusion.sample`` with all T steps at batch 1. The variants are timed in
``--rounds`` interleaved rounds (order rotated each round) and the fastest time of each is kept: shared
machines slow single measurements down by several times, never speed them up. ``ours`` is the inference path
the CLI uses (``evaluation.tiling.sample_tiled``: per-image generators, whole image as one tile).

    python bench/sample.py                                      # CPU: paper model, LR 24x24, batch 2
    python bench/sample.py --lr-size 64 --batch 16 --device cuda --precision bf16
    python bench/sample.py --write bench/RESULTS.md             # also record the table there
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from results_file import write_section  # bench/results_file.py

from samdiffsr.config import load_config
from samdiffsr.evaluation.tiling import sample_tiled
from samdiffsr.models import build_model
from samdiffsr.models.inputs import PRECISION_DTYPES


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def inputs(batch: int, size: int, scale: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lr = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    return lr, torch.nn.functional.interpolate(lr, scale_factor=scale, mode="bicubic")


def time_model_sample(model, batch, size, steps, device, dtype) -> float:
    """Seconds per image of ``model.sample`` (one generator for the batch)."""
    lr, up = inputs(batch, size, model.cfg.sr_scale, device)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    sync(device)
    start = time.perf_counter()
    with ctx:
        model.sample(lr, up, generator=torch.Generator().manual_seed(1), steps=steps)
    sync(device)
    return (time.perf_counter() - start) / batch


def time_ours(model, batch, size, steps, device, dtype) -> float:
    """Seconds per image of the inference path (per-image generators, images stacked ``batch`` per call)."""
    lr, up = inputs(batch, size, model.cfg.sr_scale, device)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    sync(device)
    start = time.perf_counter()
    sample_tiled(model, list(lr.split(1)), list(up.split(1)), gens, steps=steps, batch=batch, dtype=dtype)
    sync(device)
    return (time.perf_counter() - start) / batch


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/samdiffsr_df2k4x.yaml")
    p.add_argument("--lr-size", type=int, default=24, help="LR side (HR = scale x); Set5 LR images are ~64-128")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest of each is kept")
    p.add_argument("--fast-steps", type=int, default=25, help="steps of the respaced (DDIM) sampler")
    p.add_argument("--batch", type=int, default=2, help="images per batched call")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=sorted(PRECISION_DTYPES))
    p.add_argument("--write", default=None, help="also write the table into this results file (## sample)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    device, dtype = torch.device(args.device), PRECISION_DTYPES[args.precision]
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    T, K, B, n = cfg.model.timesteps, args.fast_steps, args.batch, args.lr_size
    print(f"{machine(device)}; torch {torch.__version__}; {args.precision}; LR {n}x{n} -> HR "
          f"{n * cfg.model.sr_scale}x{n * cfg.model.sr_scale}", flush=True)
    for fn in (time_model_sample, time_ours):  # warm-up (allocator, kernels) of every path and batch size
        for batch in (1, B):
            fn(model, batch, n, 2, device, dtype)
    variants = [
        ("model.sample (baseline)", T, 1, time_model_sample),
        ("ours", T, 1, time_ours),
        ("ours, fewer steps (DDIM)", K, 1, time_ours),
        ("ours, batched", T, B, time_ours),
        ("ours, fewer steps, batched", K, B, time_ours),
    ]
    best = [float("inf")] * len(variants)
    for r in range(args.rounds):
        order = [(i + r) % len(variants) for i in range(len(variants))]
        for i in order:
            name, steps, batch, fn = variants[i]
            sec = fn(model, batch, n, steps, device, dtype)
            best[i] = min(best[i], sec)
            print(f"round {r + 1}: {name:<28} steps {steps:>3}  batch {batch:>2}  {sec:8.3f} s/image", flush=True)
    rows = [(name, steps, batch, sec, best[0] / sec)
            for (name, steps, batch, _), sec in zip(variants, best, strict=True)]
    for name, steps, batch, sec, ratio in rows:
        print(f"{name:<30} steps {steps:>3}  batch {batch:>2}  {sec:8.3f} s/image  {ratio:6.2f}x")
    if args.write:
        write_results(args, argv, model, device, rows)
    return 0


def write_results(args: argparse.Namespace, argv: list[str] | None, model: torch.nn.Module, device: torch.device,
                  rows: list[tuple]) -> None:
    """The ``## sample`` section of ``--write``: the command, the machine and the table."""
    n, scale = args.lr_size, model.cfg.sr_scale
    cmd = "python bench/sample.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        "## sample", "",
        f"`{cmd}` — {machine(device)}, torch {torch.__version__}, {args.precision}, "
        f"{datetime.date.today().isoformat()}. Model: `{args.config}` "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, random weights), "
        f"LR {n}x{n} -> HR {n * scale}x{n * scale}. Fastest of {args.rounds} "
        f"interleaved rounds; speed-up is against the first row, measured in the same run.", "",
        "| variant | steps | batch | s/image | speed-up |", "|---|---:|---:|---:|---:|",
        *[f"| {name} | {steps} | {batch} | {sec:.3f} | {ratio:.2f}x |" for name, steps, batch, sec, ratio in rows],
        "",
    ]
    if device.type == "cpu":
        lines += ["On CPU batching gains little (the convolutions already use every core). On a GPU: "
                  "`python bench/sample.py --device cuda --lr-size 64 --batch 16 --precision bf16` "
                  "(bench/gpu.sh sweeps checkpoints with the batched sampler: bench/sample_sweep.py).", ""]
    write_section(Path(args.write), "sample", "\n".join(lines[1:]))
    print(f"written to {args.write}")

if __name__ == "__main__":
    raise SystemExit(main())
