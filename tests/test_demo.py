"""The README's demo pipeline end to end, at a smaller size: shards -> RRDB (2 ranks) -> diffusion
(2 ranks, DeepSpeed on CPU) -> benchmark sweep vs bicubic -> table and plot."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model.hidden_size=8", "model.dim_mults=[1,2]", "model.rrdb_num_block=2", "model.rrdb_num_feat=8",
         "model.rrdb_growth=4", "model.timesteps=10", "data.patch_size=32", "train.batch_size=4",
         "train.log_every=2", "train.val_crop=32", "train.val_steps=2"]


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    cmd = [sys.executable, str(REPO / "launcher" / "demo.py"), "--workdir", str(tmp_path / "runs"),
           "--shards", str(tmp_path / "shards"), "--rrdb-steps", "4", "--steps", "6", "--ckpt-every", "3",
           "--bench-steps", "2", *SMALL]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    out = tmp_path / "runs" / "demo" / "benchmark"
    # Both training runs wrote their checkpoints; the diffusion run used 2 ranks.
    summary = json.loads((tmp_path / "runs" / "demo" / "summary.json").read_text())
    assert summary["step"] == 6 and summary["world_size"] == 2
    assert (tmp_path / "runs" / "demo_rrdb" / "weights" / "latest.pt").exists()
    # The sweep evaluated both checkpoints and the bicubic baseline on the held-out photos.
    rows = list(csv.DictReader((out / "results.csv").open()))
    checkpoints = {row.get("checkpoint") or row.get("ckpt") for row in rows}
    assert {"bicubic"} < checkpoints and len(checkpoints) >= 3, checkpoints
    table = (out / "results.md").read_text()
    assert "bicubic" in table and "psnr" in table.lower()
    assert table.strip() in proc.stdout  # the table is printed at the end
    assert "training helped" in proc.stdout or "not beaten bicubic" in proc.stdout  # the verdict line
    assert list(out.glob("*.png")), "no metric plot written"
    assert (tmp_path / "runs" / "demo" / "tb").is_dir()
