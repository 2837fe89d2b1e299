"""Time one SAM-DiffSR training step (forward + backward + Adam step, frozen RRDB) per variant.

Each variant is reported as samples/s and as a ratio to fp32 eager measured in the same run, plus the
model FLOPs of one step (counted by torch's FlopCounterMode, not guessed) and, on a GPU, the achieved
model FLOP utilisation against the card's dense bf16 peak.

    python bench/train_step.py --batch 2 --patch 160 --steps 3                # CPU
    python bench/train_step.py --batch 64 --patch 160 --variants all           # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from samdiffsr.config import load_config
from samdiffsr.models import build_model

VARIANTS = ("fp32", "bf16", "channels_last", "bf16+channels_last", "bf16+channels_last+compile")
# Dense bf16 tensor-core peaks (FLOP/s) for the MFU line; unknown cards print FLOPs only.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def make_step(cfg, variant: str, device: torch.device, batch: int, patch: int, seed: int = 0):
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
        loss_fn = torch.compile(model.training_loss)
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variant(cfg, variant, device, batch, patch, steps, warmup) -> float:
    """Seconds per step (median of `steps` timed steps after `warmup`)."""
    step = make_step(cfg, variant, device, batch, patch)
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step().detach()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def count_step_flops(cfg, device, batch, patch) -> int:
    step = make_step(cfg, "fp32", device, batch, patch)
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/samdiffsr_df2k4x.yaml")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--patch", type=int, default=160)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="fp32,bf16,channels_last,bf16+channels_last",
                        help=f"comma list from {', '.join(VARIANTS)}, or 'all'")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    variants = VARIANTS if args.variants == "all" else tuple(args.variants.split(","))
    if "fp32" not in variants:
        variants = ("fp32", *variants)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'} " \
        f"x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}, patch {args.patch}")
    flops = count_step_flops(cfg, device, args.batch, args.patch)
    print(f"model FLOPs per training step (counted): {flops / 1e12:.3f} TFLOP")
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    base = None
    print(f"{'variant':<28}{'s/step':>10}{'samples/s':>12}{'vs fp32':>10}{'MFU':>8}")
    for variant in variants:
        try:
            seconds = time_variant(cfg, variant, device, args.batch, args.patch, args.steps, args.warmup)
        except Exception as exc:  # a variant unsupported on this machine must not hide the others
            print(f"{variant:<28} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            continue
        base = base or seconds
        mfu = f"{flops / seconds / peak:.1%}" if peak else "-"
        print(f"{variant:<28}{seconds:>10.3f}{args.batch / seconds:>12.2f}{base / seconds:>10.2f}{mfu:>8}")


if __name__ == "__main__":
    main()
