"""The last section of bench/gpu.sh: issue 14's goals against what the sections measured (their JSON files in
the work folder). A section that did not finish shows as missing, never as passed.

Goals on an H100/H200: bf16 + channels_last + compile >= 3x fp32 eager and MFU >= 35% at batch 64; the
loader keeps the real run's data-wait fraction under 5%; the killed-and-restarted run follows the
uninterrupted one within its tolerance.

    python bench/gpu_summary.py /tmp/w
"""

from __future__ import annotations

import sys

from gpu_common import read_json  # bench/gpu_common.py

FAST = "bf16+channels_last+compile"


def verdict(ok: bool | None) -> str:
    return "missing" if ok is None else ("PASS" if ok else "FAIL")


def goals(work: str) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, ok) rows; ok None when the figure is missing."""
    steps, run = read_json(work, "train_step"), read_json(work, "gpu_train_run")
    batch = max((steps or {}).get("batches", {}) or {"0": None}, key=int)
    row = (((steps or {}).get("batches", {}).get(batch) or {}).get("variants") or {}).get(FAST) or {}
    speed, mfu = row.get("vs_fp32"), row.get("mfu")
    wait = (run or {}).get("wait_steady")
    matrix = read_json(work, "gpu_matrix")
    return [
        (f"{FAST} >= 3x fp32 eager (batch {batch})", "-" if speed is None else f"{speed:.2f}x",
         None if speed is None else speed >= 3),
        (f"MFU >= 35% (batch {batch}, {FAST})", "-" if mfu is None else f"{mfu:.1%}",
         None if mfu is None else mfu >= 0.35),
        ("data-wait fraction < 5% (real run, steady)", "-" if wait is None else f"{wait:.2%}",
         None if wait is None else wait < 0.05),
        ("resume after SIGKILL within tolerance", "-" if run is None else
         f"max rel. diff {max(run['max_rel_before'], run['max_rel_after']):.2e} <= {run['tolerance']:.0e}",
         None if run is None else bool(run["passed"])),
        ("configuration matrix equals the reference (every accepted cell)", "-" if matrix is None else
         f"{sum(r['result'] == 'PASS' for r in matrix['rows'])} PASS, {len(matrix['failed'])} FAIL, "
         f"{sum(r['result'] == 'refused' for r in matrix['rows'])} refused", None if matrix is None else
         bool(matrix["passed"])),
    ]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.exit("usage: python bench/gpu_summary.py WORK_FOLDER")
    work = argv[0]
    steps = read_json(work, "train_step") or {}
    print(f"device: {steps.get('device', '?')}")
    for goal, measured, ok in goals(work):
        print(f"{verdict(ok):<8} {goal}: {measured}")
    sweep, sam, loader = read_json(work, "sample_sweep"), read_json(work, "sam_masks"), read_json(work, "loader")
    if sweep:
        print("sampling: " + "; ".join(f"{k} {v['images_per_s_steady']:.2f} images/s"
                                       for k, v in sweep["samplers"].items()) + f" (batch {sweep['batch']})")
    if loader:
        print("loader: " + ", ".join(f"{w} workers {r:.0f} samples/s" for w, r in loader["samples_per_s"].items())
              + (f" vs GPU {loader['gpu_samples_per_s']:.0f}" if loader.get("gpu_samples_per_s") else ""))
    if sam:
        print(f"SAM {sam['model_type']}: {1 / sam['steady']['steady_s']:.2f} images/s steady, one worker; DF2K "
              f"{sam['df2k_gpu_hours_1_worker']:.2f} GPU-hours (random weights: post-processing differs)")
    largest = steps.get("largest_batch")
    if largest:
        print(f"largest batch that fits ({largest['variant']}): {largest['largest']}")
    missing = [name for name in ("train_step", "gpu_train_run", "sample_sweep", "loader", "sam_masks", "gpu_matrix")
               if read_json(work, name) is None]
    print("sections without results: " + (", ".join(missing) if missing else "none"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
