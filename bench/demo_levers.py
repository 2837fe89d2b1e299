"""The demo's lever sweep: which small-model settings make SAM-DiffSR beat bicubic soonest?

Each variant is the demo's pipeline in one plain-PyTorch process (no DeepSpeed: the learning dynamics are the
same for the same global batch): RRDB pretraining (L1), then modulated-diffusion training on the frozen RRDB,
scored at fixed steps on the held-out photos (whole images, BasicSR protocol) with several samplers. The
variants run in parallel processes, so a GPU machine sweeps a grid in minutes; the chosen settings are then
run for real on 2 CPU cores by ``launcher/demo.py``. One JSON line per evaluation goes to stdout.

    python bench/demo_levers.py --device cuda --grid levers  > levers.jsonl     # 16 variants to 2000 steps
    python bench/demo_levers.py --device cuda --grid long    > long.jsonl       # 8 variants to 4500 steps
    python bench/demo_levers.py --device cpu --grid levers --only base --scale 0.01   # a smoke test

``--shards`` must hold the demo shards (``train/`` and ``val/``, as ``python launcher/make_shards.py`` writes
them); ``--base-shards`` the first demo's 4-photo set for the ``base`` variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from samdiffsr.config import load_config
from samdiffsr.data.pairs import load_val_images
from samdiffsr.data.stream import TrainStream
from samdiffsr.evaluation.metrics import psnr_y, ssim_y
from samdiffsr.evaluation.tiling import lr_multiple
from samdiffsr.imresize import imresize
from samdiffsr.models.diffusion import build_model
from samdiffsr.models.inputs import prepare_lr, to_model_inputs, to_uint8

BASE = dict(shards="demo", hidden=32, mults=(1, 2, 2), rb=4, rf=32, rg=16, patch=64, batch=8, T=100,
            rrdb_steps=500, rrdb_lr=5e-4, rrdb_sched=None, lr=5e-4, sched="const", ema=0.0, steps=2000,
            evals=(250, 500, 1000, 1500, 2000), loss="l1", seed=1, overrides=())
LEVER_SAMPLERS = {"ddim10": dict(steps=10, sampler="ddim"), "dpm10": dict(steps=10, sampler="dpmpp_2m"),
                  "dpm20": dict(steps=20, sampler="dpmpp_2m"), "ddpm": dict(sampler="ddpm")}
LONG_SAMPLERS = {"ddpm": dict(sampler="ddpm"), "ddim10": dict(steps=10, sampler="ddim"),
                 "ddim20": dict(steps=20, sampler="ddim"), "ddim20_eta1": dict(steps=20, sampler="ddim", eta=1.0),
                 "dpm10": dict(steps=10, sampler="dpmpp_2m"), "dpm20": dict(steps=20, sampler="dpmpp_2m")}


def variant(**changes) -> dict:
    v = copy.deepcopy(BASE)
    v.update(changes)
    return v


def levers_grid() -> dict[str, dict]:
    """First sweep: one lever at a time around the first demo's settings, 2000 diffusion steps."""
    ext = dict(shards="demo")
    fast = dict(ext, lr=1e-3, ema=0.995)
    return {
        "base": variant(shards="base"), "ext": variant(**ext),
        "ext_lr1e3_cos": variant(**ext, lr=1e-3, sched="cos"), "ext_lr1e3_ema": variant(**fast),
        "ext_lr2e3_ema_cos": variant(**ext, lr=2e-3, sched="cos", ema=0.99),
        "ext_lr1e3_ema_cos_1k": variant(**ext, lr=1e-3, sched="cos", ema=0.99, steps=1000,
                                        evals=(250, 500, 750, 1000)),
        "ext_b16": variant(**fast, batch=16), "ext_p96": variant(**fast, patch=96),
        "ext_p48_b16": variant(**fast, patch=48, batch=16), "ext_h48": variant(**fast, hidden=48),
        "ext_h16": variant(**fast, hidden=16),
        "ext_rrdb1500": variant(**fast, rrdb_steps=1500, rrdb_lr=1e-3, rrdb_sched="cos"),
        "ext_rb8": variant(**fast, rb=8, rrdb_steps=1000, rrdb_lr=1e-3, rrdb_sched="cos"),
        "ext_T50": variant(**fast, T=50), "ext_nomod": variant(**fast, overrides=("model.sam_modulation=false",)),
        "ext_l2": variant(**fast, loss="l2"),
    }


def long_grid() -> dict[str, dict]:
    """Second sweep: the winning patch/batch at the demo's and the long demo's lengths, six samplers."""
    long = dict(shards="demo", batch=16, patch=48, rrdb_steps=2000, rrdb_lr=1e-3, rrdb_sched="cos", lr=1e-3,
                ema=0.995, steps=4500, evals=(1500, 3000, 4500))
    short = dict(shards="demo", patch=48, rrdb_steps=600, rrdb_lr=1e-3, rrdb_sched="cos", lr=1e-3, sched="cos",
                 ema=0.99)
    return {
        "L1": variant(**long), "L2_cos": variant(**dict(long, sched="cos")),
        "L3_ema999": variant(**dict(long, ema=0.999)), "L4_b8": variant(**dict(long, batch=8)),
        "L5_rb8": variant(**dict(long, rb=8)), "L6_lr5e4_ema999": variant(**dict(long, lr=5e-4, ema=0.999)),
        "D1_b8_1500": variant(**short, batch=8, steps=1500, evals=(500, 1000, 1500)),
        "D2_b16_800": variant(**short, batch=16, steps=800, evals=(400, 800)),
    }


def lr_at(base: float, schedule: str, step: int, total: int) -> float:
    if schedule == "cos":
        return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return base


def endless(stream: TrainStream):
    epoch = 0
    while True:
        yield from stream.iter_epoch(epoch)
        epoch += 1


@torch.no_grad()
def score(model, vals, device, samplers: dict[str, dict], scale: int = 4) -> dict[str, list[float]]:
    """Mean PSNR-Y / SSIM-Y over the held-out images for each sampler (and ``rrdb``: the RRDB's own output)."""
    out = {}
    for name, kwargs in samplers.items():
        psnrs, ssims = [], []
        for k, batch in enumerate(vals):
            hr, lr = (batch[key][0].permute(1, 2, 0).numpy() for key in ("hr", "lr"))
            img_lr, img_lr_up = prepare_lr(lr, scale, 255.0, lr_multiple(model.cfg), device)
            if name == "rrdb":
                sr = model.rrdb(img_lr)
            else:
                gen = torch.Generator().manual_seed(k)
                noise = torch.randn(img_lr_up.shape, generator=gen).to(device)
                sr = model.sample(img_lr, img_lr_up, noise=noise, generator=gen, **kwargs)
            sr8 = to_uint8(sr[0, :, :hr.shape[0], :hr.shape[1]])
            psnrs.append(psnr_y(sr8, hr, scale))
            ssims.append(ssim_y(sr8, hr, scale))
        out[name] = [float(np.mean(psnrs)), float(np.mean(ssims))]
    return out


def run(name: str, v: dict, args: argparse.Namespace, samplers: dict[str, dict]) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(v["seed"])
    shards = args.base_shards if v["shards"] == "base" else args.shards
    cfg = load_config("configs/demo.yaml", [
        f"model.hidden_size={v['hidden']}", f"model.dim_mults=[{','.join(map(str, v['mults']))}]",
        f"model.rrdb_num_block={v['rb']}", f"model.rrdb_num_feat={v['rf']}", f"model.rrdb_growth={v['rg']}",
        f"model.timesteps={v['T']}", f"model.loss_type={v['loss']}", f"data.patch_size={v['patch']}",
        "data.workers=0", f"data.train_shards={shards}/train", *v["overrides"]])
    device = torch.device(args.device)
    model = build_model(cfg.model).to(device)
    vals = load_val_images(f"{shards}/val", 0, 4)
    batches = endless(TrainStream(cfg.data, batch_size=v["batch"], scale=4, seed=v["seed"]))

    def emit(record: dict) -> None:
        print(json.dumps({"variant": name, **record}), flush=True)

    bicubic = [(psnr_y(imresize(lr, 4), hr, 4), ssim_y(imresize(lr, 4), hr, 4))
               for hr, lr in ((b[k][0].permute(1, 2, 0).numpy() for k in ("hr", "lr")) for b in vals)]
    emit({"stage": "bicubic", "res": {"bicubic": np.mean(bicubic, axis=0).tolist()}})

    start = time.time()
    opt = torch.optim.Adam(model.rrdb.parameters(), lr=v["rrdb_lr"])
    for step in range(v["rrdb_steps"]):
        for group in opt.param_groups:
            group["lr"] = lr_at(v["rrdb_lr"], v["rrdb_sched"] or v["sched"], step, v["rrdb_steps"])
        inputs = to_model_inputs(next(batches), device, 4)
        loss = F.l1_loss(model.rrdb(inputs["img_lr"]), inputs["img_hr"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    emit({"stage": "rrdb", "steps": v["rrdb_steps"], "res": score(model, vals, device, {"rrdb": {}}),
          "sec": time.time() - start})

    model.rrdb.requires_grad_(False)
    params = list(model.denoise_fn.parameters())
    opt = torch.optim.Adam(params, lr=v["lr"])
    ema = [p.detach().clone() for p in params] if v["ema"] > 0 else None
    start = time.time()
    for step in range(1, v["steps"] + 1):
        model.denoise_fn.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(v["lr"], v["sched"], step - 1, v["steps"])
        inputs = to_model_inputs(next(batches), device, 4)
        loss = model.training_loss(inputs["img_hr"], inputs["img_lr"], inputs["img_lr_up"], inputs["mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        opt.step()
        if ema is not None:  # with the usual warm-up, so that short runs are not dominated by the init
            decay = min(v["ema"], (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step in v["evals"]:
            model.eval()
            raw = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_copy_(params, ema if ema is not None else raw)
            emit({"stage": "diffusion", "steps": step, "loss": float(loss),
                  "res": score(model, vals, device, samplers), "sec": time.time() - start})
            with torch.no_grad():
                torch._foreach_copy_(params, raw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", choices=("levers", "long"), default="long")
    p.add_argument("--only", default="", help="comma-separated variant names (default: the whole grid)")
    p.add_argument("--shards", default="shards/demo")
    p.add_argument("--base-shards", default="shards/demo_base")
    p.add_argument("--threads", type=int, default=1, help="torch threads per variant process")
    p.add_argument("--scale", type=float, default=1.0, help="scale every step count (a smoke test: 0.01)")
    args = p.parse_args(argv)
    grid, samplers = (levers_grid(), LEVER_SAMPLERS) if args.grid == "levers" else (long_grid(), LONG_SAMPLERS)
    names = args.only.split(",") if args.only else list(grid)
    unknown = sorted(set(names) - set(grid))
    if unknown:
        p.error(f"unknown variants {unknown}; the {args.grid} grid has {sorted(grid)}")
    ctx = mp.get_context("spawn")
    procs = []
    for name in names:
        v = grid[name]
        if args.scale != 1:
            v["rrdb_steps"] = max(1, int(v["rrdb_steps"] * args.scale))
            v["steps"] = max(1, int(v["steps"] * args.scale))
            v["evals"] = tuple(sorted({max(1, int(e * args.scale)) for e in v["evals"]}))
        procs.append(ctx.Process(target=run, args=(name, v, args, samplers)))
        procs[-1].start()
    for proc in procs:
        proc.join()
    return max((proc.exitcode or 0) for proc in procs)


if __name__ == "__main__":
    sys.exit(main())
