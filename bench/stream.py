"""Training-stream throughput per CPU core against the authors' per-sample loader, in one run.

Ours: shards -> decode -> aligned crop + flips -> uint8 batch (``TrainStream``), per worker; the
batched MATLAB-bicubic upsampling and [-1, 1] scaling on the training device (``to_model_inputs``) is
timed separately. Baseline, with the same worker counts: what the authors' ``Df2kDataSet_sam`` does for
each sample (read + unpickle a stored 320 tile, mod-crop, random 160 crop, numpy MATLAB x4 upsampling
of ``lr / 256``, ToTensor + Normalize of three images, mask to tensor) in a ``DataLoader``. All
configurations run interleaved for a few rounds and the best of each is kept (shared, noisy machines).

    python bench/stream.py                               # synthetic shards from skimage.data photos
    python bench/stream.py --shards 'shards/df2k/train-{000000..000099}.tar' --workers 2 --batch 16
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import pickle
import random
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from results_file import cpu_name, write_section  # bench/results_file.py
from torch.utils.data import DataLoader, Dataset

from samdiffsr.config import DataConfig
from samdiffsr.data.reader import encode_mask, read_samples
from samdiffsr.data.shardlist import expand_shards
from samdiffsr.data.stream import TrainStream
from samdiffsr.imresize import imresize
from samdiffsr.models.inputs import to_model_inputs

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
          "stereo_motorcycle", "colorwheel")


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def build_shards(out: Path, n_tiles: int, scale: int, tile: int = 320, per_shard: int = 64) -> str:
    """Shards of real-photo tiles in the reader format: LR by MATLAB bicubic of the whole image, and a
    Felzenszwalb label map with a float32 value table standing in for the SPE mask."""
    import skimage.data
    from skimage.segmentation import felzenszwalb

    tiles = []
    for name in PHOTOS:
        img = getattr(skimage.data, name)()
        img = img[0] if isinstance(img, tuple) else img
        h, w = img.shape[0] - img.shape[0] % scale, img.shape[1] - img.shape[1] % scale
        hr = np.ascontiguousarray(img[:h, :w, :3])
        lr = imresize(hr, 1 / scale)
        labels = felzenszwalb(hr, scale=200, sigma=0.8, min_size=100) + 1
        values = np.random.default_rng(len(tiles)).normal(0, 0.05, labels.max() + 1).astype(np.float32)
        values[0] = 0.0
        step = tile // 2
        for y in range(0, h - tile + 1, step):
            for x in range(0, w - tile + 1, step):
                ly, lx, lt = y // scale, x // scale, tile // scale
                tiles.append((hr[y:y + tile, x:x + tile], lr[ly:ly + lt, lx:lx + lt],
                              encode_mask(labels[y:y + tile, x:x + tile], values), name))
    sizes = {}
    for s in range(-(-n_tiles // per_shard)):
        name = f"train-{s:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            count = min(per_shard, n_tiles - s * per_shard)
            for i in range(s * per_shard, s * per_shard + count):
                hr, lr, mask, src = tiles[i % len(tiles)]
                fields = {"hr.npy": _npy(hr), "lr.npy": _npy(lr), **{k: _npy(v) for k, v in mask.items()}}
                sink.write({"__key__": f"t{i:06d}", **fields, "json": json.dumps({"source": src}).encode()})
        sizes[name] = count
    (out / "sizes.json").write_text(json.dumps(sizes))
    return str(out / f"train-{{000000..{len(sizes) - 1:06d}}}.tar")


class AuthorsTiles(Dataset):
    """The authors' per-sample path: utils_sr IndexedDataset (pickled items at offsets in one file) and
    ``Df2kDataSet_sam.__getitem__`` (paper config: no augmentation, no mask normalisation)."""

    def __init__(self, path: str, offsets: list[int], patch: int, scale: int, seed: int = 0) -> None:
        self.path, self.offsets, self.patch, self.scale = path, offsets, patch, scale
        self.rng = random.Random(seed)
        self.file = None
        from torchvision import transforms

        half = (0.5, 0.5, 0.5)
        self.to_tensor_norm = transforms.Compose([transforms.ToTensor(), transforms.Normalize(half, half)])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k: int) -> dict:
        if self.file is None:  # opened lazily, once per worker, as their IndexedDataset does
            self.file = open(self.path, "rb")
        self.file.seek(self.offsets[k])
        item = pickle.loads(self.file.read(self.offsets[k + 1] - self.offsets[k]))
        s, p = self.scale, self.patch
        img_hr, img_lr, sam_mask = np.uint8(item["img"]), np.uint8(item["img_lr"]), item["sam_mask"]
        h, w, _ = img_hr.shape
        h, w = h - h % (s * 2), w - w % (s * 2)
        img_hr, sam_mask, img_lr = img_hr[:h, :w], sam_mask[:h, :w], img_lr[:h // s, :w // s]
        i = self.rng.randint(0, h - p) // s * s
        j = self.rng.randint(0, w - p) // s * s
        img_hr, sam_mask = img_hr[i:i + p, j:j + p], sam_mask[i:i + p, j:j + p]
        img_lr = img_lr[i // s:i // s + p // s, j // s:j // s + p // s]
        img_lr_up = imresize(img_lr / 256, s)
        hr_t, lr_t, up_t = (self.to_tensor_norm(x).float() for x in (img_hr, img_lr, img_lr_up))
        return {"img_hr": hr_t, "img_lr": lr_t, "img_lr_up": up_t, "item_name": item["item_name"],
                "loc": item["loc"], "loc_bdr": item["loc_bdr"], "sam_mask": torch.FloatTensor(sam_mask)[None]}


def store_pickled(pattern: str, n_tiles: int, path: str) -> list[int]:
    """The baseline's storage: the same tiles as pickled dicts in one file; returns the offsets."""
    offsets = []
    with open(path, "wb") as f:
        for i, s in enumerate(islice(read_samples(expand_shards(pattern)), n_tiles)):
            offsets.append(f.tell())
            item = {"img": s["hr"], "img_lr": s["lr"], "sam_mask": s["mask"], "item_name": s["key"],
                    "loc": np.array([i, 0]), "loc_bdr": np.array([1, 1])}
            f.write(pickle.dumps(item))
        offsets.append(f.tell())
    return offsets


def timed(batches, n: int, batch: int, warmup: int = 2) -> float:
    """Samples/s over ``n`` batches after ``warmup`` (worker start-up and buffer fill excluded)."""
    it = iter(batches)
    for _ in islice(it, warmup):
        pass
    start = time.perf_counter()
    got = sum(1 for _ in islice(it, n))
    return got * batch / (time.perf_counter() - start)


def ours(pattern: str, workers: int, batch: int, crops: int, n: int, scale: int, patch: int) -> float:
    cfg = DataConfig(train_shards=pattern, patch_size=patch, crops_per_tile=crops, workers=workers,
                     samples_per_epoch=(n + 2) * batch)
    return timed(TrainStream(cfg, batch_size=batch, scale=scale, seed=0).iter_epoch(0), n, batch)


def baseline(data: AuthorsTiles, workers: int, batch: int, n: int) -> float:
    loader = DataLoader(data, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    return timed(loader, n, batch)


def device_seconds(pattern: str, device: torch.device, batch: int, scale: int, patch: int, divisor: float,
                   reps: int = 20) -> float:
    """Best seconds per batch of `to_model_inputs` (copy, [-1, 1] scaling, batched MATLAB upsampling)."""
    cfg = DataConfig(train_shards=pattern, patch_size=patch, workers=0)
    b = next(iter(TrainStream(cfg, batch_size=batch, scale=scale, seed=0).iter_epoch(0)))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        to_model_inputs(b, device, scale, divisor)
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def machine() -> str:
    return f"{cpu_name()}, torch {torch.__version__}, numpy {np.__version__}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="", help="shard pattern or folder (default: build synthetic shards)")
    p.add_argument("--tiles", type=int, default=256, help="tiles in the synthetic shards / baseline store")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers, besides 0 (in-process)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crops", default="1,2,4,8", help="crops per decoded tile to measure, comma-separated")
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is kept")
    p.add_argument("--patch", type=int, default=160)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--lr-up-divisor", type=float, default=256.0)
    p.add_argument("--target", type=float, default=2250.0,
                   help="training samples/s one GPU consumes, to size the workers (default: H100 estimate, "
                        "0.154 TFLOP per sample counted by bench/train_step.py at 35%% of 989 TFLOP/s bf16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    return p.parse_args(argv)


def measure(args: argparse.Namespace, crops_list: list[int],
            worker_counts: list[int]) -> tuple[dict[tuple, float], float, torch.device]:
    """Best samples/s per (crops or "base", workers), and the device seconds per batch of the input mapping."""
    best: dict[tuple, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pattern = args.shards or build_shards(Path(tmp), args.tiles, args.scale)
        offsets = store_pickled(pattern, args.tiles, os.path.join(tmp, "items.pkl"))
        data = AuthorsTiles(os.path.join(tmp, "items.pkl"), offsets, args.patch, args.scale)
        # Rounds interleave every configuration so that load from other jobs hits all of them alike.
        for r in range(args.rounds):
            for w in worker_counts:
                rate = baseline(data, w, args.batch, args.batches // 2)
                best["base", w] = max(best.get(("base", w), 0.0), rate)
                print(f"round {r}: baseline workers={w}: {rate:7.1f} samples/s", flush=True)
                for c in crops_list:
                    rate = ours(pattern, w, args.batch, c, args.batches, args.scale, args.patch)
                    best[c, w] = max(best.get((c, w), 0.0), rate)
                    print(f"round {r}: ours crops/tile={c} workers={w}: {rate:7.1f} samples/s", flush=True)
        device = torch.device(args.device)
        sec = device_seconds(pattern, device, args.batch, args.scale, args.patch, args.lr_up_divisor)
    return best, sec, device


def results_table(best: dict[tuple, float], crops_list: list[int], worker_counts: list[int]) -> str:
    rows = []
    for w in worker_counts:
        per = best["base", w] / max(w, 1)
        rows.append(f"| authors' loader | {w} | {best['base', w]:.0f} | {per:.0f} | {1e3 / per:.3f} | 1.0x |")
        for c in crops_list:
            per_ours = best[c, w] / max(w, 1)
            rows.append(f"| ours, {c} crops/tile | {w} | {best[c, w]:.0f} | {per_ours:.0f} "
                        f"| {1e3 / per_ours:.3f} | {per_ours / per:.1f}x |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)  # per-core figures: one thread for the in-process paths
    crops_list = [int(c) for c in args.crops.split(",")]
    worker_counts = sorted({0, args.workers})
    best, sec, device = measure(args, crops_list, worker_counts)
    table = results_table(best, crops_list, worker_counts)
    print(table)
    w = max(args.workers, 1)
    need = {name: math.ceil(args.target / (best[key] / w)) for name, key in
            [("the authors' loader", ("base", w))] + [(f"ours, {c} crops/tile", (c, w)) for c in crops_list]}
    sizing = "; ".join(f"{name}: {n}" for name, n in need.items())
    estimate = (" (one H100 in bf16, an estimate: 0.154 TFLOP per sample, counted by bench/train_step.py, at "
                "35% of the 989 TFLOP/s dense peak; no GPU measured)" if args.target == 2250.0 else "")
    print(f"workers for {args.target:.0f} samples/s: {sizing}")
    print(f"to_model_inputs on {device} (batch {args.batch}): {sec * 1e3:.2f} ms/batch")
    cmd = " ".join(["python bench/stream.py", *(sys.argv[1:] if argv is None else argv)])
    source = args.shards or f"{args.tiles} synthetic 320x320 tiles cut from skimage.data photos"
    body = f"""
`{cmd}` — {datetime.date.today()}, {machine()}; shards: {source}; batch {args.batch}, patch
{args.patch} / {args.patch // args.scale}; best of {args.rounds} interleaved rounds of {args.batches} batches.

Ours: shards -> decode -> aligned crop + flips/rot90 -> uint8 batch (`TrainStream`). The authors' loader:
unpickle a stored 320 tile, random crop, numpy MATLAB x4 upsampling of `lr / 256`, ToTensor/Normalize,
default collate (`DataLoader`, shuffle). Workers 0 = in the main process (one core: the cleanest
per-core figure); ratios compare equal worker counts.

| loader | workers | samples/s | per worker | ms/sample | vs authors' |
|---|---:|---:|---:|---:|---:|
{table}

Workers (DataLoader processes at the per-worker rates above, this CPU) to feed `--target`
{args.target:.0f} samples/s{estimate}: {sizing}.

Device side, `to_model_inputs` on {device} for a batch of {args.batch} (copy, [-1, 1] scaling, batched
MATLAB x{args.scale} upsampling): {sec * 1e3:.2f} ms/batch ({sec * 1e3 / args.batch:.3f} ms/sample).
"""
    if not args.no_write:
        write_section(Path(args.results), "stream", body)
        print(f"wrote the stream section of {args.results}")


if __name__ == "__main__":
    main()
