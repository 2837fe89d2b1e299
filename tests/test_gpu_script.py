"""bench/gpu.sh, the prepared GPU acceptance run, end to end in its CPU smoke mode (what CI can run), so that
the script cannot rot before a GPU runs it: every section must finish and write its figures to the log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9]+(?:\.[0-9]+)?"
VARIANTS = ("fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile")


def sections(log: str) -> dict[str, str]:
    parts = re.split(r"^## ", log, flags=re.M)
    return {part.splitlines()[0]: part for part in parts[1:]}


@pytest.mark.slow
def test_smoke_mode_runs_every_section_and_logs_its_figures(tmp_path):
    log_path, work = tmp_path / "gpu.log", tmp_path / "work"
    env = dict(os.environ, DEVICE="cpu", SMOKE="1", WORK=str(work), PATH=f"{Path(sys.executable).parent}:"
               f"{os.environ.get('PATH', '')}")
    done = subprocess.run(["bash", "bench/gpu.sh", str(log_path)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1800)
    log = log_path.read_text()
    assert done.returncode == 0, log[-6000:]
    found = sections(log)
    for title in ("1 training step", "2 training run", "3 sampling", "4 loader", "5 SAM masks", "6 precision matrix",
                  "summary"):
        assert title in found, f"no section {title!r} in the log"
        assert re.search(rf"^\[{re.escape(title)}: exit 0 after {NUMBER} s", found[title], re.M), found[title][-2000:]

    step = found["1 training step"]
    assert len(re.findall(rf"model FLOPs per training step \(counted\): {NUMBER} TFLOP", step)) == 2
    for variant in VARIANTS:  # a row with s/step, samples/s and the ratio, at both batch sizes
        rows = re.findall(rf"^{re.escape(variant)}\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})x", step, re.M)
        assert len(rows) == 2 and all(float(r[0]) > 0 for r in rows), (variant, step)
    assert re.search(r"largest batch that fits: [0-9]+ ", step)

    run = found["2 training run"]
    assert re.search(rf"data-wait fraction {NUMBER}%", run)
    assert "resume check: PASS" in run
    # On CPU the run is deterministic: the killed and restarted run must equal the uninterrupted one bit for bit.
    result = json.loads((work / "gpu_train_run.json").read_text())
    assert result["identical"] == result["steps"] == 12 and result["weights_equal"], result
    assert result["resumed_from"] in (4, 8) and result["kill_at"] in range(5, 9), result  # a checkpoint, not the end

    sampling = found["3 sampling"]
    for label in ("paper: ddpm", "fastest: ddim eta 1"):
        assert re.search(rf"^{label}: {NUMBER} images/s steady", sampling, re.M), sampling
    assert re.search(rf"^(4|8) workers: {NUMBER} samples/s", found["4 loader"], re.M)
    assert len(re.findall(rf"^(?:4|8) workers: {NUMBER} samples/s", found["4 loader"], re.M)) == 2
    sam = found["5 SAM masks"]
    assert re.search(rf"steady {NUMBER} s/image = {NUMBER} images/s", sam)
    assert len(re.findall(rf"make_shards --workers [12]: {NUMBER} s end to end", sam)) == 2
    assert re.search(rf"DF2K \(3450 images of about this size\): {NUMBER} GPU-hours", sam)
    matrix = found["6 precision matrix"]  # smoke: grad_accum 1, fp32 / bf16 x ZeRO 0-2 and fp16 x ZeRO 0 pass
    for cell in ("fp32-zero0", "fp32-zero1", "fp32-zero2", "bf16-zero0", "bf16-zero1", "bf16-zero2", "fp16-zero0"):
        assert re.search(rf"^{cell}-accum1-ranks1 +PASS +loss ", matrix, re.M), matrix
    refused = r"^fp16-zero1-accum1-ranks1 +refused .*'train\.precision'.*'train\.zero_stage'"
    assert re.search(refused, matrix, re.M), matrix
    assert "matrix: 7 cells PASS, 0 FAIL, 2 refused" in matrix
    summary = found["summary"]
    assert "sections without results: none" in summary
    assert len(re.findall(r"^(PASS|FAIL|missing)\s", summary, re.M)) == 5
    assert re.search(r"^PASS +configuration matrix equals the reference", summary, re.M), summary
    assert "sections that did not finish: none" in log
