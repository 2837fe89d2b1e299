"""The README's demo pipeline end to end, at a smaller size: shards -> RRDB (2 ranks) -> diffusion
(2 ranks, DeepSpeed on CPU) -> benchmark sweep vs bicubic -> table and plot."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samdiffsr.data.pairs import read_pairs
from samdiffsr.data.reader import read_samples
from samdiffsr.demo.photos import (
    DEMO_TRAIN,
    DEMO_VAL,
    HELD_OUT_CROP,
    HELD_OUT_MARGIN,
    demo_photo,
    held_out_boxes,
    held_out_split,
)
from samdiffsr.evaluation.results import ResultStore

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
    assert all(r["set"] == "demo_val" and r["images"] == "26" for r in rows)  # 2 crops of each of 13 photos
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
    # The paired differences: the mean over the 26 images of the per-image difference, an interval around it,
    # and the verdict the intervals call for.
    results = ResultStore(out)
    per_image = {c: {k: r["metrics"] for k, r in results.records(c, "demo_val").items()} for c in ("bicubic", best)}
    assert len(per_image[best]) == 26 and per_image[best].keys() == per_image["bicubic"].keys()
    lines = summary.splitlines()
    vs_bicubic = next(line for line in lines if line.startswith(f"SAM-DiffSR {best} - bicubic: "))
    assert vs_bicubic.endswith("(mean over 26 held-out images, 95% bootstrap interval)")
    above = []
    for metric, label, unit in (("psnr_y", "PSNR-Y", " dB"), ("ssim_y", "SSIM-Y", "")):
        mean = np.mean([per_image[best][k][metric] - per_image["bicubic"][k][metric] for k in per_image[best]])
        found = re.search(rf"{label} ([-+][0-9.]+){unit} \[([-+][0-9.]+), ([-+][0-9.]+)\]", vs_bicubic)
        assert found, vs_bicubic
        value, low, high = map(float, found.groups())
        assert value == pytest.approx(mean, abs=6e-4 if unit else 6e-5) and low <= value <= high and low < high
        above.append(low > 0)
    assert any(line.startswith(f"SAM-DiffSR {best} - RRDB alone: PSNR-Y ") for line in lines)
    # Which recipe it trained with: in demo.md, and printed before the diffusion stage with its config's name.
    recipe = next(line for line in lines if line.startswith("recipe: "))
    assert recipe.startswith("recipe: 6 steps, batch 4 of 32-pixel patches, lr ") and "; levers: " in recipe
    assert f"demo.yaml {recipe}" in proc.stdout
    expected = ("training beats bicubic" if all(above) else "training has not beaten bicubic in both metrics yet")
    assert [line for line in proc.stdout.splitlines() if line.startswith("training ")] == [
        next(line for line in lines if line.startswith(expected))]
    # The comparison picture: the first 4 held-out images (LR, bicubic, SR, HR), its path printed.
    picture = out / "comparison.png"
    assert f"picture:     {picture}" in proc.stdout
    with Image.open(picture) as img:
        assert img.format == "PNG" and img.width > 1000 and img.height > 400
    assert len(list((out / "images" / best / "demo_val").glob("*.png"))) == 26  # an SR image of each
    assert [p for p in out.glob("*.png") if p != picture], "no metric plot written"
    assert (tmp_path / "runs" / "demo" / "tb").is_dir()
    assert_held_out_is_unseen(tmp_path / "shards")


def blocks(image: np.ndarray, size: int = 8) -> set[bytes]:
    """Every textured ``size`` x ``size`` window of an image, as bytes (to look one up in another image).

    Nearly flat windows (all values within 8 grey levels: saturated white, black corners) occur in many
    photos by chance, so they say nothing about where a pixel came from and are left out.
    """
    windows = np.lib.stride_tricks.sliding_window_view(image, (size, size), axis=(0, 1))
    windows = windows.reshape(-1, *windows.shape[2:])
    textured = np.ptp(windows.reshape(len(windows), -1), axis=1) > 8
    return {w.tobytes() for w in windows[textured]}


def assert_held_out_is_unseen(shards: Path) -> None:
    """No 8 x 8 window of a held-out HR image occurs in any training tile's HR (a pixel-exact search)."""
    held_out = [pair for _, _, pair in read_pairs(str(shards / "val" / "*.tar"), "shards", 4)]
    assert len(held_out) == 26
    trained: set[bytes] = set()
    for sample in read_samples(sorted(str(p) for p in (shards / "train").glob("*.tar"))):
        trained |= blocks(sample["hr"])
    seen = [pair.key for pair in held_out if blocks(pair.hr) & trained]
    assert not seen, f"held-out images whose pixels are in a training shard: {seen}"


def test_held_out_crops_lie_beyond_a_margin_below_the_training_part():
    for name in (*DEMO_TRAIN, *DEMO_VAL):
        photo = demo_photo(name)
        kept, boxes = held_out_boxes(name, photo)
        part, crops = held_out_split(name, photo)
        assert len(boxes) == 2 and crops.keys() == boxes.keys()
        if name in DEMO_VAL:  # never trained on
            assert kept is None and part is None
        else:  # the training part is the top of the photo, every crop starts the margin below it
            assert np.array_equal(part, photo[:kept])
            assert all(top >= kept + HELD_OUT_MARGIN for top, _ in boxes.values()), name
        for key, (top, left) in boxes.items():
            assert crops[key].shape == (HELD_OUT_CROP, HELD_OUT_CROP, 3)
            assert np.array_equal(crops[key], photo[top:top + HELD_OUT_CROP, left:left + HELD_OUT_CROP])
            assert crops[key].std() > 10, f"{key} is nearly flat"


def test_the_recipe_line_names_every_lever_that_is_on():
    from samdiffsr.config import load_config
    from samdiffsr.demo.report import recipe

    plain = load_config(REPO / "configs" / "demo.yaml", ["train.timestep_sampling=uniform", "train.snr_gamma=0",
                                                         "train.ema_warmup_power=0", "optim.warmup_steps=0"])
    assert recipe(plain) == ("recipe: 900 steps, batch 16 of 48-pixel patches, lr 0.001 (x0.5 every 450 steps), "
                             "EMA 0.99; levers: none (docs/training.md)")
    every = load_config(REPO / "configs" / "demo.yaml", [
        "train.timestep_sampling=low_noise", "train.timestep_power=2", "train.snr_gamma=5",
        "train.ema_warmup_power=0.75", "optim.warmup_steps=100", "optim.decay_gamma=1"])
    assert recipe(every).endswith("lr 0.001 (constant), EMA 0.99; levers: low-noise timestep sampling (k = 2), "
                                  "Min-SNR weighting (gamma = 5), EMA warm-up (power 0.75), lr warm-up (100 "
                                  "steps) (docs/training.md)")
