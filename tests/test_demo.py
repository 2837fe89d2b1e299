"""The README's demo pipeline end to end, at a smaller size: shards -> RRDB (2 ranks) -> diffusion
(2 ranks, DeepSpeed on CPU) -> benchmark sweep vs bicubic -> table and plot."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

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
    out = tmp_path / "runs" / "demo" / "benchmark-ddim2-eta1"
    # Both training runs wrote their checkpoints; the diffusion run used 2 ranks.
    summary = json.loads((tmp_path / "runs" / "demo" / "summary.json").read_text())
    assert summary["step"] == 6 and summary["world_size"] == 2
    assert (tmp_path / "runs" / "demo_rrdb" / "weights" / "latest.pt").exists()
    # The sweep evaluated both checkpoints and the bicubic baseline on the held-out photos.
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["checkpoint", "step", "set", "metric", "value", "images"]
        rows = list(reader)
    metrics = ["psnr_y", "ssim_y", "psnr_y_paper", "ssim_y_paper"]
    assert sorted((r["checkpoint"], r["metric"]) for r in rows) == sorted(
        (c, m) for c in ("bicubic", "step00000003", "step00000006") for m in metrics)
    assert all(r["set"] == "demo_val" and r["images"] == "2" for r in rows)  # the 2 held-out photos
    every = (out / "results.md").read_text()
    assert "| bicubic |" in every and "| step00000003 | 3 |" in every and "| step00000006 | 6 |" in every
    # The three rows side by side, printed and in demo.md: bicubic and the best checkpoint as in results.csv.
    psnr = {r["checkpoint"]: float(r["value"]) for r in rows if r["metric"] == "psnr_y"}
    ssim = {r["checkpoint"]: float(r["value"]) for r in rows if r["metric"] == "ssim_y"}
    best = max((c for c in psnr if c != "bicubic"), key=psnr.get)
    summary = (out / "demo.md").read_text()
    assert summary.strip() in proc.stdout
    table = [line for line in summary.splitlines() if line.startswith("| ")]
    assert table[0] == "| method | psnr_y | ssim_y |"
    assert table[1] == f"| bicubic | {psnr['bicubic']:.2f} | {ssim['bicubic']:.4f} |"
    assert table[2].startswith("| RRDB alone (regression) | ")
    rrdb_psnr, rrdb_ssim = (float(v) for v in table[2].strip("| ").split(" | ")[1:])
    assert 5 < rrdb_psnr < 60 and 0 < rrdb_ssim <= 1 and (rrdb_psnr, rrdb_ssim) != (psnr[best], ssim[best])
    assert table[3] == f"| SAM-DiffSR {best} (ddim, 2 steps, eta 1) | {psnr[best]:.2f} | {ssim[best]:.4f} |"
    # The verdict: exactly the one line the PSNR-Y and SSIM-Y values call for, with those values.
    dp, ds = psnr[best] - psnr["bicubic"], ssim[best] - ssim["bicubic"]
    figures = (f"{psnr[best]:.2f} vs {psnr['bicubic']:.2f} dB PSNR-Y ({dp:+.2f}), "
               f"{ssim[best]:.4f} vs {ssim['bicubic']:.4f} SSIM-Y ({ds:+.4f})")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("training ")]
    expected = "training beats bicubic" if dp > 0 and ds > 0 else "training has not beaten bicubic in both metrics yet"
    assert lines == [f"{expected}: {best} {figures}"]
    # The comparison picture: one row per held-out photo (LR, bicubic, SR, HR), its path printed.
    picture = out / "comparison.png"
    assert f"picture:     {picture}" in proc.stdout
    with Image.open(picture) as img:
        assert img.format == "PNG" and img.width > 1000 and img.height > 400
    assert len(list((out / "images" / best / "demo_val").glob("*.png"))) == 2  # the SR images it shows
    assert [p for p in out.glob("*.png") if p != picture], "no metric plot written"
    assert (tmp_path / "runs" / "demo" / "tb").is_dir()
