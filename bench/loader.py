"""Item 4 of bench/gpu.sh: can the training loader feed the GPU? ``TrainStream`` (the training run's own
loader: shards -> decode -> crops -> uint8 batches, pinned on CUDA) with 4 and 8 workers on the paper's
data settings, against the GPU's samples/s measured by item 1 (and by the real run of item 2).

Samples/s are counted after ``--warmup`` batches (worker start and shuffle-buffer fill excluded: the run's
data-wait fraction covers those). ``to_model_inputs`` (copy to the device, scaling, batched MATLAB
bicubic there) runs in the training step, so it is timed apart, on the device.

    python bench/loader.py --shards /tmp/w/shards/train --work /tmp/w --workers 4,8
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from itertools import islice

import torch
from gpu_common import gpu_samples_per_s, read_json, sync, write_json  # bench/gpu_common.py

from samdiffsr.config import load_config
from samdiffsr.data.stream import TrainStream
from samdiffsr.models.inputs import to_model_inputs


def loader_rate(cfg, workers: int, batches: int, warmup: int, pin: bool) -> float:
    """Samples/s of the training stream with ``workers`` DataLoader workers."""
    cfg.data.workers = workers
    stream = TrainStream(cfg.data, batch_size=cfg.train.batch_size, scale=cfg.model.sr_scale, seed=0,
                         pin_memory=pin)
    it = stream.iter_epoch(0)
    try:
        for _ in islice(it, warmup):
            pass
        start = time.perf_counter()
        got = sum(1 for _ in islice(it, batches))
        return got * cfg.train.batch_size / (time.perf_counter() - start)
    finally:
        it.close()


def device_seconds(cfg, device: torch.device, reps: int = 10) -> float:
    """Best seconds of ``to_model_inputs`` for one training batch (pinned host memory -> device)."""
    cfg.data.workers = 0
    stream = TrainStream(cfg.data, batch_size=cfg.train.batch_size, scale=cfg.model.sr_scale, seed=0)
    it = stream.iter_epoch(0)
    batch = next(it)
    it.close()
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        to_model_inputs(batch, device, cfg.model.sr_scale, cfg.model.lr_up_divisor)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True)
    p.add_argument("--work", default=None, help="work folder of bench/gpu.sh (reads the GPU's samples/s there)")
    p.add_argument("--config", default="configs/samdiffsr_df2k4x.yaml")
    p.add_argument("--workers", default="4,8")
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose
    cfg = load_config(args.config, [*args.overrides, f"data.train_shards={args.shards}",
                                    f"data.samples_per_epoch={10**7}"])
    device = torch.device(args.device)
    d = cfg.data
    print(f"paper data settings: batch {cfg.train.batch_size}, patch {d.patch_size}, {d.crops_per_tile} crops per "
          f"tile, shuffle buffer {d.shuffle_buffer}, prefetch {d.prefetch_factor}; pinned: {device.type == 'cuda'}")
    gpu = gpu_samples_per_s(args.work)
    run = read_json(args.work, "gpu_train_run")
    if gpu:
        print(f"GPU consumes {gpu[0]:.0f} samples/s (item 1, {gpu[1]})")
    if run and run.get("samples_per_s_steady"):
        print(f"the real run (item 2, bf16 eager, ZeRO-1) trained at {run['samples_per_s_steady']:.0f} samples/s "
              f"with data-wait fraction {run['wait_steady']:.2%}")
    rows = {}
    for w in (int(x) for x in args.workers.split(",")):
        rate = loader_rate(cfg, w, args.batches, args.warmup, device.type == "cuda")
        rows[w] = rate
        verdict = ""
        if gpu:
            need = math.ceil(gpu[0] / (rate / w))
            verdict = (f"; {rate / gpu[0]:.2f}x the GPU's rate: {'keeps up' if rate >= gpu[0] else 'does NOT keep up'}"
                       f" (at {rate / w:.0f} samples/s per worker, {need} worker(s) would)")
        print(f"{w} workers: {rate:.0f} samples/s{verdict}", flush=True)
    sec = device_seconds(cfg, device)
    print(f"to_model_inputs on {device} per batch of {cfg.train.batch_size}: {sec * 1e3:.2f} ms "
          f"(inside the training step)")
    write_json(args.work, "loader", {"samples_per_s": {str(k): v for k, v in rows.items()},
                                     "gpu_samples_per_s": gpu[0] if gpu else None, "to_model_inputs_s": sec})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
