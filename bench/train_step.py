"""Time one SAM-DiffSR training step (forward + backward + Adam step, frozen RRDB) per variant and batch.

Each variant is reported as s/step, samples/s and a ratio to fp32 eager measured in the same run, with the
model FLOPs of one step (counted by torch's FlopCounterMode, not guessed), the achieved model FLOP
utilisation against the card's dense bf16 peak (bench/gpu_common.py: PEAK_BF16) and the peak memory.
``--max-batch-cap`` also searches the largest batch one step fits in (doubling, then bisecting).

    python bench/train_step.py --batch 2 --patch 160 --steps 3                    # CPU
    python bench/train_step.py --batch 64,32 --patch 160 --variants gpu --max-batch-cap 4096   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time

import torch
from gpu_common import device_name, gib, peak_bf16, sync, write_json  # bench/gpu_common.py
from torch.utils.flop_counter import FlopCounterMode

from samdiffsr.config import load_config
from samdiffsr.models import build_model

VARIANTS = ("fp32", "bf16", "channels_last", "bf16+channels_last", "bf16+channels_last+compile")
GPU_VARIANTS = ("fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile")  # issue 14's four


def make_step(cfg, variant: str, device: torch.device, batch: int, patch: int, seed: int = 0,
              compile_backend: str = "inductor"):
    """Build the model + optimizer for one variant and return a closure running one training step."""
    torch.manual_seed(seed)
    model = build_model(cfg.model).to(device)
    model.rrdb.requires_grad_(False)
    bf16 = "bf16" in variant
    memory_format = torch.channels_last if "channels_last" in variant else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    optimizer = torch.optim.Adam(params, lr=2e-4, fused=fused) if fused else torch.optim.Adam(params, lr=2e-4)
    loss_fn = model.training_loss
    if "compile" in variant:
        torch._dynamo.reset()  # a fresh, static-shape compile per model and batch (no automatic dynamic shapes)
        loss_fn = torch.compile(model.training_loss, backend=compile_backend)
    s = cfg.model.sr_scale
    g = torch.Generator(device="cpu").manual_seed(seed)
    hr = (torch.rand(batch, 3, patch, patch, generator=g) * 2 - 1).to(device, memory_format=memory_format)
    lr = torch.nn.functional.avg_pool2d(hr, s).contiguous(memory_format=memory_format)
    lr_up = torch.nn.functional.interpolate(lr, scale_factor=s, mode="bicubic").contiguous(memory_format=memory_format)
    mask = torch.rand(batch, 1, patch, patch, generator=g).to(device) * 0.1

    def step() -> torch.Tensor:
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())
        with autocast:
            loss = loss_fn(hr, lr, lr_up, mask=mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def free(device: torch.device) -> None:
    """Release the previous variant's model (compiled graphs hold it too) before the next one is measured."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def time_variant(cfg, variant, device, batch, patch, steps, warmup, backend) -> dict:
    """Median seconds per step of ``steps`` timed steps after ``warmup``; the first step's seconds (with
    torch.compile: the compilation); peak memory allocated (CUDA only)."""
    free(device)
    step = make_step(cfg, variant, device, batch, patch, compile_backend=backend)
    start = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step().detach()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds": sorted(times)[len(times) // 2], "first_step_seconds": first, "peak_bytes": peak}


def count_step_flops(cfg, device, batch, patch) -> int:
    step = make_step(cfg, "fp32", device, batch, patch)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def one_step_fits(cfg, variant, device, batch, patch) -> float | None:
    """Peak bytes of one step at ``batch`` (0 on CPU), or None when it does not run: out of memory, or a
    kernel's limit (cuDNN / 32-bit indexing errors at huge batches are RuntimeErrors; the reason is printed)."""
    free(device)
    try:
        make_step(cfg, variant, device, batch, patch)()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0.0
    except torch.OutOfMemoryError:
        print(f"  batch {batch}: out of memory")
        return None
    except RuntimeError as exc:
        print(f"  batch {batch}: {str(exc).splitlines()[0][:120]}")
        return None
    finally:
        free(device)


def largest_batch(cfg, variant, device, patch, start: int, cap: int, bisections: int = 3) -> dict:
    """Double from ``start`` until a step no longer fits (or ``cap``), then bisect ``bisections`` times."""
    good, bad, peak = 0, None, None
    batch = start
    while batch <= cap:
        got = one_step_fits(cfg, variant, device, batch, patch)
        print(f"  batch {batch}: " + ("does not run" if got is None else f"fits, peak {gib(got)} GiB"), flush=True)
        if got is None:
            bad = batch
            break
        good, peak, batch = batch, got, batch * 2
    for _ in range(bisections if bad else 0):
        mid = (good + bad) // 2
        if mid in (good, bad):
            break
        got = one_step_fits(cfg, variant, device, mid, patch)
        print(f"  batch {mid}: " + ("does not run" if got is None else f"fits, peak {gib(got)} GiB"), flush=True)
        good, peak, bad = (mid, got, bad) if got is not None else (good, peak, mid)
    return {"variant": variant, "largest": good, "first_failing": bad, "cap": cap, "peak_bytes": peak}


def time_batch(cfg, args, device, variants, batch, peak_flops) -> dict:
    """Every variant at one batch size, printed as a table; returns the figures."""
    flops = count_step_flops(cfg, device, batch, args.patch)
    print(f"\nbatch {batch}, patch {args.patch}: model FLOPs per training step (counted): {flops / 1e12:.3f} TFLOP "
          f"({flops / batch / 1e9:.1f} GFLOP per sample)")
    print(f"{'variant':<28}{'s/step':>9}{'samples/s':>11}{'vs fp32':>9}{'TFLOP/s':>9}{'MFU':>7}"
          f"{'peak GiB':>10}{'1st step s':>12}")
    rows, base = {}, None
    for variant in variants:
        try:
            r = time_variant(cfg, variant, device, batch, args.patch, args.steps, args.warmup, args.compile_backend)
        except Exception as exc:  # a variant unsupported on this machine must not hide the others
            print(f"{variant:<28} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}", flush=True)
            rows[variant] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        sec = r["seconds"]
        base = base or (sec if variant == "fp32" else None)
        r.update(samples_per_s=batch / sec, vs_fp32=base / sec if base else None, tflops=flops / sec / 1e12,
                 mfu=flops / sec / peak_flops if peak_flops else None)
        rows[variant] = r
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"{variant:<28}{sec:>9.4f}{batch / sec:>11.1f}{r['vs_fp32'] or float('nan'):>8.2f}x"
              f"{r['tflops']:>9.2f}{mfu:>7}{gib(r['peak_bytes']):>10}{r['first_step_seconds']:>12.1f}", flush=True)
    return {"flops": flops, "variants": rows}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/samdiffsr_df2k4x.yaml")
    parser.add_argument("--batch", default="2", help="batch size(s), comma-separated, timed in this order")
    parser.add_argument("--patch", type=int, default=160)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1; compiles)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="fp32,bf16,channels_last,bf16+channels_last",
                        help=f"comma list from {', '.join(VARIANTS)}, or 'all', or 'gpu' ({', '.join(GPU_VARIANTS)})")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (aot_eager: dynamo + AOT autograd without code generation)")
    parser.add_argument("--max-batch-cap", type=int, default=0,
                        help="also search the largest batch that fits, up to this (0: no search)")
    parser.add_argument("--max-batch-variant", default="bf16+channels_last")
    parser.add_argument("--json", default=None, help="work folder: write train_step.json there (bench/gpu.sh)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    args.warmup = max(1, args.warmup)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    named = {"all": VARIANTS, "gpu": GPU_VARIANTS}
    variants = named.get(args.variants) or tuple(args.variants.split(","))
    variants = ("fp32", *[v for v in variants if v != "fp32"])
    name = device_name(device)
    peak = peak_bf16(name)
    peak_text = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (no MFU)"
    print(f"device: {name}; torch {torch.__version__}; dense bf16 peak for MFU: {peak_text}; "
          f"config {args.config} {' '.join(args.overrides)}")
    if device.type == "cuda":
        print(f"fp32 convolutions in TF32: {torch.backends.cudnn.allow_tf32} (torch's default); "
              f"fp32 matmuls in TF32: {torch.backends.cuda.matmul.allow_tf32}")
    out = {"device": name, "peak_flops": peak, "patch": args.patch, "batches": {}}
    for batch in (int(b) for b in args.batch.split(",")):
        out["batches"][str(batch)] = time_batch(cfg, args, device, variants, batch, peak)
        write_json(args.json, "train_step", out)
    if args.max_batch_cap:
        print(f"\nlargest batch that fits ({args.max_batch_variant}, patch {args.patch}, one step):")
        start = max(int(b) for b in args.batch.split(","))
        found = largest_batch(cfg, args.max_batch_variant, device, args.patch, start, args.max_batch_cap)
        out["largest_batch"] = found
        limit = (f"{found['first_failing']} does not" if found["first_failing"]
                 else f"none failed up to the cap {found['cap']}")
        print(f"largest batch that fits: {found['largest']} (peak {gib(found['peak_bytes'])} GiB; {limit})")
        write_json(args.json, "train_step", out)


if __name__ == "__main__":
    main()
