"""Item 6 of bench/gpu.sh: the configuration matrix of tests/test_training_matrix.py on the device.

Each accepted cell of precision x ZeRO stage x grad_accum (1 rank; 2 ranks too when the machine has 2 GPUs)
trains the tiny SAM-DiffSR for 3 real engine steps and is compared with the plain PyTorch reference of
tests/matrix_reference.py on the same device and batches: per-step loss, logged lr, the true gradient norm
clipping sees (clipping active), and the weight update. Refused cells are listed with their one-line reason.

TF32: "fp32" cells run with TF32 disabled for matmuls and cuDNN convolutions, in the engine and the reference
(torch.backends.*.allow_tf32 = False), so fp32 means 24-bit mantissas end to end; one extra informational row
runs the engine with TF32 on against the TF32-off reference, to show what TF32 alone moves (no verdict).
Nondeterminism: cuDNN's backward kernels accumulate with atomics in a run-to-run order, so even fp32 differs
from the reference by reassociation, and Adam turns a noise-sized gradient's rounding into a +-lr move of that
weight. GPU_TOLERANCES are CPU's (tests/test_training_matrix.py TOLERANCES, measured there bit-near for ZeRO 0)
widened for that: fp32 x10, bf16 / fp16 x2 in grad norm and update. Every bug the matrix is for stays far
outside: a wrong lr at the decay boundary moves the update by ~0.33, clipping loss-scaled gradients by ~1.
fp16's grad-norm tolerance is 5e-3, not CPU's x2: on an H200 (2026-12-04) fp16 ZeRO 0 with accumulation 3 came
out at 1.6e-3, and so did the informational fp32+TF32 row with accumulation 3, which shares fp16's 10-bit
mantissa (eps 9.8e-4), while accumulation 1 gave 1.2e-6 and 6.6e-6 and fp32 without TF32 9.5e-8. The likely
cause (not proven: no second GPU run) is that the two processes ran different cuDNN kernels for micro-batches
of 2, and a 10-bit rounding then shows; a bug would not spare the fp32 row. 5e-3 is bf16's 4e-2 scaled by
the mantissas (2^-10 / 2^-7); a loss-scaled clip stays ~1 away.

    python bench/gpu_matrix.py --work /tmp/w                          # CUDA
    python bench/gpu_matrix.py --work /tmp/w --device cpu --accums 1  # smoke (bench/gpu.sh SMOKE=1)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GPU_TOLERANCES = {
    "fp32": {"loss": 1e-5, "grad_norm": 2e-4, "update": 5e-4},
    "bf16": {"loss": 1e-3, "grad_norm": 4e-2, "update": 0.1},
    "fp16": {"loss": 1e-4, "grad_norm": 5e-3, "update": 1e-2},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--work", required=True, help="folder for the runs and gpu_matrix.json")
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--stages", default="0,1,2")
    parser.add_argument("--accums", default="1,3")
    return parser.parse_args(argv)


def set_tf32(on: bool) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def verdict(matrix, engine: dict, ref: dict, precision: str, tolerances: dict | None) -> tuple[dict, str]:
    """The differences and PASS / FAIL (None tolerances: informational, no verdict)."""
    found = matrix.differences(engine, ref)
    lr_ok = all(abs(a - b) <= 1e-12 * b for a, b in zip(engine["lr"], ref["lr_next"], strict=True))
    if tolerances is None:
        return found, "info"
    ok = (engine["error"] is None and engine["skipped"] == ref["skipped"] and lr_ok
          and all(found[k] <= t for k, t in tolerances.items()))
    return found, "PASS" if ok else "FAIL"


def run_cells(matrix, cases: list[tuple], work: Path, device, rrdb: str) -> list[dict]:
    """One rank, in this process: each case through the engine and the reference."""
    batches = matrix.make_batches()
    rows = []
    for case in cases:
        precision = case[0]
        for tf32 in ([False, True] if precision == "fp32" and device.type == "cuda" else [False]):
            cfg = matrix.case_config(case, rrdb)
            started = time.perf_counter()
            set_tf32(tf32)
            engine = matrix.engine_run(cfg, 0, 1, batches, device, str(work / f"{matrix.case_name(case)}-{tf32}"))
            set_tf32(False)
            ref = matrix.reference_run(cfg, case[3], batches, device)
            found, result = verdict(matrix, engine, ref, precision, None if tf32 else GPU_TOLERANCES[precision])
            rows.append({"case": matrix.case_name(case) + ("+tf32" if tf32 else ""), "result": result, **found,
                         "seconds": time.perf_counter() - started})
            print(format_row(rows[-1]), flush=True)
    return rows


def run_two_ranks(matrix, cases: list[tuple], work: Path, rrdb: str) -> list[dict]:
    """The 2-rank cases in one torchrun launch (tests/matrix_ranks.py), compared here (needs 2 GPUs)."""
    import torch

    out = work / "ranks.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(REPO / "tests" / "matrix_ranks.py"),
           str(out), rrdb, *(",".join(map(str, c)) for c in cases)]
    subprocess.run(cmd, check=True, cwd=REPO)
    records, batches, rows = torch.load(out, weights_only=False), matrix.make_batches(), []
    for case in cases:
        ref = matrix.reference_run(matrix.case_config(case, rrdb), 2, batches, torch.device("cuda"))
        found, result = verdict(matrix, records[matrix.case_name(case)], ref, case[0], GPU_TOLERANCES[case[0]])
        rows.append({"case": matrix.case_name(case), "result": result, **found, "seconds": None})
        print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row: dict) -> str:
    if row["result"] == "refused":
        return f"{row['case']:<28} refused  {row['reason']}"
    return (f"{row['case']:<28} {row['result']:<8} loss {row['loss']:.1e}  grad_norm {row['grad_norm']:.1e}  "
            f"update {row['update']:.1e}  weights max abs {row['weights_max_abs']:.1e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "bench"))
    import matrix_reference as matrix  # tests/matrix_reference.py
    import torch
    from gpu_common import device_name, write_json
    from train_helpers import write_rrdb_weights

    from samdiffsr.config import ConfigError
    from samdiffsr.train.collective import init_distributed

    if args.device == "cpu":
        torch.set_num_threads(1)  # a loaded CPU: see tests/test_training_matrix.py one_thread
    set_tf32(False)
    _, _, device = init_distributed()
    work = Path(args.work) / "matrix"
    work.mkdir(parents=True, exist_ok=True)
    rrdb = write_rrdb_weights(work / "rrdb.pt")
    print(f"device: {device_name(device)}; {matrix.STEPS} steps, global batch {matrix.GLOBAL_BATCH}, "
          f"clip {matrix.CLIP} (active), tolerances {GPU_TOLERANCES}", flush=True)
    cases = [(p, int(z), int(a), 1) for p in args.precisions.split(",") for z in args.stages.split(",")
             for a in args.accums.split(",")]
    accepted, rows = [], []
    for case in cases:
        try:
            matrix.case_config(case, rrdb)
            accepted.append(case)
        except ConfigError as exc:
            rows.append({"case": matrix.case_name(case), "result": "refused", "reason": str(exc)})
            print(format_row(rows[-1]), flush=True)
    rows += run_cells(matrix, accepted, work, device, rrdb)
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        rows += run_two_ranks(matrix, [c[:3] + (2,) for c in accepted], work, rrdb)
    failed = [r["case"] for r in rows if r["result"] == "FAIL"]
    write_json(args.work, "gpu_matrix", {"device": device_name(device), "tolerances": GPU_TOLERANCES, "rows": rows,
                                         "failed": failed, "passed": not failed})
    print(f"matrix: {sum(r['result'] == 'PASS' for r in rows)} cells PASS, {len(failed)} FAIL"
          + (f" ({', '.join(failed)})" if failed else "") + f", {sum(r['result'] == 'refused' for r in rows)} refused")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
