"""Item 5 of bench/gpu.sh: SAM masks at scale. ``make_shards --sam-checkpoint`` with a ViT-H SAM on photos of
DF2K's size, with the paper's mask-generator settings (the authors ran segment-anything's amg.py with no
generator options: its defaults, 32 x 32 prompt points), and what that means for DF2K (3,450 images).

Nothing can be downloaded, so the checkpoint is a randomly initialised ViT-H built by segment-anything's own
``sam_model_registry`` and saved; it loads and runs exactly as the released one. Its masks mean nothing:
how many pass the quality filters, and with them the post-processing time (mask upsampling, NMS, RLE
encoding), will differ with the real weights. ``--model-type vit_tiny`` (smoke runs) takes the same path.

Steps: (1) the masker in this process (load once, then seconds per image: the steady rate), with the
allocator's peak, with the paper's settings and again with the quality filters off (pred_iou_thresh and
stability_score_thresh 0: many more masks kept, the post-processing load that random weights may not
show); (2) the real command, ``make_shards --workers 1`` and ``--workers 2`` (two SAM processes on one GPU),
timed end to end with the device's memory polled by nvidia-smi.

    python bench/sam_masks.py --work /tmp/w                                   # GPU: ViT-H, 4 photos at 2040
    python bench/sam_masks.py --work /tmp/w --model-type vit_tiny --long-side 256 --device cpu --amg points_per_side=4
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gpu_common import GpuPoller, device_name, gib, sync, write_json  # bench/gpu_common.py
from PIL import Image

from samdiffsr.demo.photos import DEMO_TRAIN, demo_photo
from samdiffsr.masks.sam import AMG_DEFAULTS, MODEL_BUILDERS, SamMasker

REPO = Path(__file__).resolve().parents[1]
DF2K_IMAGES = 3450


def random_checkpoint(path: Path, model_type: str) -> Path:
    """A seeded random SAM of ``model_type`` from segment-anything's registry (vit_tiny: our builder), saved."""
    if not path.is_file():
        start = time.perf_counter()
        torch.manual_seed(0)
        model = MODEL_BUILDERS[model_type]()
        torch.save(model.state_dict(), path)
        print(f"built a random {model_type} SAM ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
              f"parameters) and saved it in {time.perf_counter() - start:.1f} s: {path}", flush=True)
    return path


def write_photos(out: Path, count: int, long_side: int) -> list[np.ndarray]:
    """The first ``count`` demo training photos, bicubic-upscaled to ``long_side`` on their long side."""
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for name in DEMO_TRAIN[:count]:
        photo = Image.fromarray(demo_photo(name))
        f = long_side / max(photo.size)
        photo = photo.resize((round(photo.size[0] * f), round(photo.size[1] * f)), Image.BICUBIC)
        if not (out / f"{name}.png").exists():
            photo.save(out / f"{name}.png")
        images.append(np.asarray(photo))
    return images


def in_process(ckpt: Path, args: argparse.Namespace, images: list[np.ndarray], settings: dict, label: str) -> dict:
    """Load the masker once, then time it image by image (the first one warms up)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    masker = SamMasker(ckpt, args.model_type, device=args.device, **settings)
    load = time.perf_counter() - start
    seconds, counts = [], []
    for image in images:
        sync(device)
        start = time.perf_counter()
        counts.append(len(masker(image)))
        sync(device)
        seconds.append(time.perf_counter() - start)
    steady = sorted(seconds[1:] or seconds)[len(seconds[1:] or seconds) // 2]
    peak = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    print(f"masker in one process, {label}: load {load:.1f} s; per image {', '.join(f'{s:.2f}' for s in seconds)} s "
          f"(first warms up); steady {steady:.2f} s/image = {1 / steady:.2f} images/s; masks kept per image "
          f"{counts}; allocator peak (reserved) {gib(peak)} GiB", flush=True)
    del masker
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"load_s": load, "seconds": seconds, "steady_s": steady, "masks": counts, "reserved_peak_bytes": peak}


def amg_settings(pairs: list[str]) -> dict:
    """``--amg key=value`` pairs -> SamMasker keyword arguments (numbers)."""
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in AMG_DEFAULTS:
            raise SystemExit(f"sam_masks: --amg {pair}: not a mask-generator setting ({', '.join(AMG_DEFAULTS)})")
        out[key] = type(AMG_DEFAULTS[key])(float(value)) if isinstance(AMG_DEFAULTS[key], int) else float(value)
    return out


def make_shards(ckpt: Path, photos: Path, out: Path, workers: int, args: argparse.Namespace) -> dict:
    """The real command, timed end to end (model loads included), the device's memory polled meanwhile."""
    shutil.rmtree(out, ignore_errors=True)  # no mask cache from an earlier run
    cmd = [sys.executable, str(REPO / "launcher" / "make_shards.py"), "--images", str(photos), "--out", str(out),
           "--sam-checkpoint", str(ckpt), "--sam-model-type", args.model_type, "--sam-device", args.device,
           "--workers", str(workers), "--no-progress"]
    for key, value in amg_settings(args.amg).items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    start = time.perf_counter()
    with GpuPoller() as poll:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"sam_masks: make_shards exited with {done.returncode}:\n{done.stderr[-3000:]}")
    line = done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
    peak, util = poll.peak_over_baseline_gib(), poll.mean_util()
    print(f"make_shards --workers {workers}: {seconds:.1f} s end to end (model loads included) = "
          f"{args.images / seconds:.2f} images/s; device memory peak over idle "
          f"{'-' if peak is None else f'{peak:.1f}'} GiB; mean GPU utilisation "
          f"{'-' if util is None else f'{util:.0f}%'}\n  {line}", flush=True)
    return {"seconds": seconds, "images_per_s": args.images / seconds, "device_peak_gib": peak, "util": util}


def capacity(args: argparse.Namespace, paper: dict, filters_off: dict, runs: dict[int, dict]) -> dict:
    """How many make_shards workers fit on one GPU, and the GPU-hours for DF2K."""
    device = torch.device(args.device)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    per_worker = runs[1]["device_peak_gib"]
    fit = math.floor(0.9 * total / per_worker) if total and per_worker else None
    # The model loads (timed in this process) are paid once per worker, in parallel: left out of the speed-up.
    speedup = (runs[1]["seconds"] - paper["load_s"]) / max(runs[2]["seconds"] - paper["load_s"], 1e-9)
    hours = [DF2K_IMAGES * r["steady_s"] / 3600 for r in (paper, filters_off)]
    kept = [sum(r["masks"]) / len(r["masks"]) for r in (paper, filters_off)]
    print(f"memory: one SAM worker takes {'-' if per_worker is None else f'{per_worker:.1f}'} GiB of the card's "
          f"{'-' if total is None else f'{total:.0f}'} GiB: {fit if fit else '-'} workers fit (90% of memory); "
          f"2 workers ran {speedup:.2f}x the images/s of 1 (end to end less one model load)")
    print(f"DF2K ({DF2K_IMAGES} images of about this size): {hours[0]:.2f} GPU-hours at the steady one-worker rate"
          + (f", about {hours[0] / speedup:.2f} with 2 workers per GPU" if speedup > 1.05 else "")
          + f". Random weights give meaningless masks: {kept[0]:.0f} per image passed the paper's quality filters "
          f"here, and the post-processing time depends on that. Upper bound: with the filters off every candidate "
          f"is scored, binarised and RLE-encoded before NMS (more than real weights let through; {kept[1]:.0f} per "
          f"image left after NMS): {hours[1]:.2f} GPU-hours.")
    return {"gpu_total_gib": total, "workers_fit_memory": fit, "speedup_2_workers": speedup,
            "df2k_gpu_hours_1_worker": hours[0], "df2k_gpu_hours_filters_off": hours[1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True)
    p.add_argument("--model-type", default="vit_h", choices=sorted(MODEL_BUILDERS))
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--long-side", type=int, default=2040, help="DIV2K / Flickr2K photos are 2040 wide")
    p.add_argument("--amg", nargs="*", default=[], metavar="KEY=VALUE",
                   help="mask-generator settings over the paper's (amg.py's defaults), e.g. points_per_side=4")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = random_checkpoint(work / f"sam_{args.model_type}_random.pth", args.model_type)
    photos = work / f"sam_photos_{args.images}x{args.long_side}"
    images = write_photos(photos, args.images, args.long_side)
    print(f"{args.images} demo photos upscaled to {args.long_side} px on the long side "
          f"({', '.join(f'{i.shape[1]}x{i.shape[0]}' for i in images)}); {args.model_type}, "
          f"generator: amg.py defaults{' with ' + ' '.join(args.amg) if args.amg else ''}; "
          f"{device_name(torch.device(args.device))}", flush=True)
    settings = amg_settings(args.amg)
    paper = in_process(ckpt, args, images, settings, "paper settings")
    off = in_process(ckpt, args, images, {**settings, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
                     "quality filters off")
    runs = {w: make_shards(ckpt, photos, work / f"sam_shards_w{w}", w, args) for w in (1, 2)}
    result = {"steady": paper, "filters_off": off, "make_shards": {str(k): v for k, v in runs.items()},
              **capacity(args, paper, off, runs), "model_type": args.model_type, "long_side": args.long_side}
    write_json(work, "sam_masks", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
