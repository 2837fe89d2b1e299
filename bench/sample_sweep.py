"""Item 3 of bench/gpu.sh: the benchmark sweep (launcher/benchmark.py) over a training run's checkpoints, with
the paper's sampler (the 100-step DDPM chain) and the fastest one (respaced ancestral DDIM, 10 steps, eta 1:
bench/RESULTS.md "Samplers"), in batches; images/s per checkpoint.

The set is ``--images`` equal-size HR crops of the demo photos (train and held-out), so that every network
call holds ``--batch`` images: a measure of the batched sampler, not of these weights' quality (the
checkpoints come from a short run). The first checkpoint of each sweep pays the warm-up (cuDNN autotuning,
allocator); the steady rate is the best of the others.

    python bench/sample_sweep.py --run /tmp/w/runs/A --work /tmp/w --images 32 --crop 256 --batch 32 --precision bf16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from gpu_common import write_json  # bench/gpu_common.py
from PIL import Image

from samdiffsr.demo.photos import DEMO_TRAIN, DEMO_VAL, demo_photo

REPO = Path(__file__).resolve().parents[1]
SAMPLERS = (("paper: ddpm", []), ("fastest: ddim eta 1", ["--sampler", "ddim", "--steps", "10", "--eta", "1"]))


def write_crops(out: Path, count: int, crop: int) -> Path:
    """``count`` non-overlapping ``crop`` x ``crop`` HR crops of the demo photos, as PNGs (reused if present)."""
    out.mkdir(parents=True, exist_ok=True)
    have = len(list(out.glob("*.png")))
    if have >= count:
        return out
    written = 0
    while written < count:
        for name in (*DEMO_VAL, *DEMO_TRAIN):
            photo = demo_photo(name)
            for y in range(0, photo.shape[0] - crop + 1, crop):
                for x in range(0, photo.shape[1] - crop + 1, crop):
                    if written < count:
                        Image.fromarray(photo[y:y + crop, x:x + crop]).save(out / f"{written:03d}_{name}.png")
                        written += 1
        if written == 0:
            raise SystemExit(f"sample_sweep: no demo photo holds a {crop} crop")
    return out


def sweep(run: str, crops: Path, out: Path, extra: list[str], args: argparse.Namespace) -> tuple[dict, float]:
    cmd = [sys.executable, str(REPO / "launcher" / "benchmark.py"), "--run", run, "--ckpts", "all",
           "--sets", f"crops={crops}", "--metrics", "psnr_y,ssim_y", "--batch", str(args.batch),
           "--precision", args.precision, "--out", str(out), "--quiet", *extra]
    if args.device:
        cmd += ["--device", args.device]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"sample_sweep: benchmark exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text()), time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="training run folder (its weights/stepN.pt are swept)")
    p.add_argument("--work", required=True)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--crop", type=int, default=256, help="HR crop side (LR = crop / scale)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    work = Path(args.work)
    crops = write_crops(work / f"sample_crops_{args.crop}", args.images, args.crop)
    print(f"set: {args.images} HR crops of {args.crop}x{args.crop} from the demo photos; batch {args.batch}, "
          f"{args.precision}; metrics psnr_y, ssim_y")
    print(f"{'sampler':<24}{'checkpoint':<16}{'s/image':>10}{'images/s':>10}{'PSNR-Y':>9}{'SSIM-Y':>8}")
    result = {}
    for label, extra in SAMPLERS:
        out = work / f"sweep_{label.split(':')[0]}"
        data, seconds = sweep(args.run, crops, out, extra, args)
        rates = []
        for row in data["summary"]:
            if row["source"] != "model":
                continue
            sec = row["sr_seconds_per_image"]
            rates.append(1 / sec)
            print(f"{label:<24}{row['checkpoint']:<16}{sec:>10.4f}{1 / sec:>10.2f}{row['metrics']['psnr_y']:>9.2f}"
                  f"{row['metrics']['ssim_y']:>8.4f}", flush=True)
        steady = max(rates[1:] or rates)
        result[label] = {"images_per_s_steady": steady, "images_per_s_first": rates[0], "checkpoints": len(rates),
                         "sweep_seconds": seconds}
        print(f"{label}: {steady:.2f} images/s steady ({len(rates)} checkpoints, sweep {seconds:.1f} s "
              f"with start-up)", flush=True)
    paper, fast = (result[label]["images_per_s_steady"] for label, _ in SAMPLERS)
    print(f"fastest sampler vs paper's: {fast / paper:.1f}x images/s")
    write_json(work, "sample_sweep", {"samplers": result, "batch": args.batch, "crop": args.crop,
                                      "speedup": fast / paper, "images": args.images})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(None if len(sys.argv) > 1 else ["--help"]))
