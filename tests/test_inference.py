"""Inference: tiled sampling equals the model's sampler, blending is exact, launcher runs the paper layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from skimage import data as skdata

from samdiffsr.config import load_config
from samdiffsr.evaluation.infer_cli import main as infer_main
from samdiffsr.evaluation.inference import SamplerSettings, SuperResolver, image_seed
from samdiffsr.evaluation.tiling import TileGrid, lr_multiple, sample_tiled, tile_starts
from samdiffsr.imresize import imresize
from samdiffsr.models import build_model, save_weights
from samdiffsr.models.inputs import prepare_lr, to_uint8
from samdiffsr.models.loading import LoadedModel, load_model

REPO = Path(__file__).resolve().parents[1]
# Four UNet levels like the paper's (HR must be a multiple of 8, so odd LR sizes need padding), tiny widths.
TINY = {"model": {"hidden_size": 8, "dim_mults": [1, 1, 2, 2], "rrdb_num_block": 2, "rrdb_num_feat": 8,
                  "rrdb_growth": 4, "timesteps": 10}}


def tiny_model(seed: int = 0):
    cfg = load_config(None, [f"model.{k}={v}" for k, v in TINY["model"].items()])
    torch.manual_seed(seed)
    return build_model(cfg.model).eval(), cfg


def photo_lr(name: str, hw: tuple[int, int]) -> np.ndarray:
    """A real photo, downscaled with MATLAB bicubic to an LR image of size ``hw``."""
    img = getattr(skdata, name)()
    h, w = hw
    return imresize(np.ascontiguousarray(img[: h * 8, : w * 8]), 1 / 8)


def test_tile_starts_cover_and_align():
    assert tile_starts(10, 16, 4) == [0]
    starts = tile_starts(50, 16, 4)
    assert starts[0] == 0 and starts[-1] == 50 - 16
    assert all(b - a <= 12 for a, b in zip(starts, starts[1:], strict=False))  # overlap >= 4
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(50, 16, 16)


def test_blending_reproduces_a_field_exactly():
    """If every tile predicts the crop of one field, the blend is that field (windows sum to one)."""
    grid = TileGrid((18, 26), tile=8, overlap=3, scale=4, multiple=2)
    assert len(grid) > 4 and grid.tile_lr == (8, 8)
    field = torch.randn(1, 3, 72, 104)
    acc = None
    for k in range(len(grid)):
        acc = grid.accumulate(acc, k, grid.hr_crop(field, k).clone())
    torch.testing.assert_close(grid.finish(acc), field, rtol=1e-5, atol=1e-6)
    assert grid.weight_sum().min() > 0
    # the window tapers towards neighbours only: an interior-free corner tile is 1 at the image corner
    assert grid.window(0)[0, 0, 0, 0] == 1.0 and grid.window(0)[0, 0, -1, -1] < 1.0


@pytest.mark.parametrize("steps,eta", [(None, 0.0), (4, 0.0), (4, 1.0)])
def test_tile_covering_image_equals_untiled_sampling(steps, eta):
    model, _ = tiny_model()
    lr = torch.rand(1, 3, 12, 10) * 2 - 1
    up = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic")
    want = model.sample(lr, up, generator=torch.Generator().manual_seed(5), steps=steps, eta=eta)
    for tile in (12, 64):  # exactly the image, and larger
        got = sample_tiled(model, [lr], [up], [torch.Generator().manual_seed(5)], steps=steps, eta=eta,
                           tile=tile, overlap=4)[0]
        assert torch.equal(got, want), f"tile={tile}: max diff {(got - want).abs().max()}"
    # and the real tiling path differs (so the comparison above can fail)
    tiled = sample_tiled(model, [lr], [up], [torch.Generator().manual_seed(5)], steps=steps, eta=eta,
                         tile=6, overlap=2)[0]
    assert not torch.equal(tiled, want)


def test_result_does_not_depend_on_batch_or_companions():
    """Per-image generators: an image sampled alone or with others (same or other size) is the same."""
    model, _ = tiny_model()
    shapes = [(12, 10), (12, 10), (8, 14)]
    lrs = [torch.rand(1, 3, h, w) * 2 - 1 for h, w in shapes]
    ups = [torch.nn.functional.interpolate(x, scale_factor=4, mode="bicubic") for x in lrs]

    def gens():
        return [torch.Generator().manual_seed(100 + i) for i in range(3)]

    for tile, overlap in ((0, 0), (6, 2)):
        together = sample_tiled(model, lrs, ups, gens(), tile=tile, overlap=overlap, batch=5)
        alone = [sample_tiled(model, [lrs[i]], [ups[i]], [gens()[i]], tile=tile, overlap=overlap, batch=1)[0]
                 for i in range(3)]
        for a, b in zip(together, alone, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_resolver_pads_odd_sizes_and_matches_model_sample():
    model, cfg = tiny_model()
    assert lr_multiple(cfg.model) == 2
    loaded = LoadedModel(model, cfg, {"layout": "samdiffsr"}, 255.0)
    resolver = SuperResolver(loaded, SamplerSettings(seed=3, batch=4, tile=0))
    lrs = [photo_lr("astronaut", (13, 9)), photo_lr("coffee", (12, 10)), photo_lr("chelsea", (11, 9))]
    keys = ["a", "b", "c"]
    waves = resolver.plan_waves([x.shape[:2] for x in lrs])
    assert sorted(map(sorted, waves)) == [[0], [1, 2]]  # same padded size (12 x 10) batched together
    out = dict(resolver.run(list(zip(keys, lrs, strict=True))))
    assert out["a"].shape == (52, 36, 3) and out["c"].shape == (44, 36, 3)
    # equals the model's own sampler on the padded inputs, with the image's seed, cropped back
    img_lr, img_up = prepare_lr(lrs[0], 4, 255.0, 2, torch.device("cpu"))
    assert img_lr.shape[-2:] == (14, 10)
    want = model.sample(img_lr, img_up, generator=torch.Generator().manual_seed(image_seed(3, "a")))
    assert np.array_equal(out["a"], to_uint8(want[0])[:52, :36])


def _write_tiny_config(path: Path) -> Path:
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_paper_layout_checkpoint_runs_through_infer_launcher(tmp_path):
    model, _ = tiny_model(seed=1)
    ckpt = tmp_path / "model_ckpt_steps_400000.ckpt"
    torch.save({"state_dict": {"model": model.state_dict()}, "global_step": 400000}, ckpt)
    config = _write_tiny_config(tmp_path / "tiny.yaml")
    lr_dir, out_dir = tmp_path / "LR", tmp_path / "SR"
    (lr_dir / "sub").mkdir(parents=True)
    Image.fromarray(photo_lr("astronaut", (12, 10))).save(lr_dir / "astronaut.png")
    Image.fromarray(photo_lr("chelsea", (11, 13))).save(lr_dir / "sub" / "chelsea.jpg", quality=95)
    (lr_dir / "broken.png").write_bytes(b"this is not a png")
    cmd = [sys.executable, str(REPO / "launcher" / "infer.py"), "--config", str(config), "--ckpt", str(ckpt),
           "--img-dir", str(lr_dir), "--save-dir", str(out_dir), "--seed", "7", "--batch", "2", "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr  # one bad file
    assert "broken.png" in run.stderr and "authors layout, step 400000" in run.stderr
    assert "LR/256" in run.stderr  # the authors' checkpoint gets their bicubic_up scaling
    a = np.asarray(Image.open(out_dir / "astronaut.png"))
    c = np.asarray(Image.open(out_dir / "sub" / "chelsea.png"))
    assert a.shape == (48, 40, 3) and c.shape == (44, 52, 3)
    # the launcher's output is the library's, with the image's own seed
    loaded = load_model(ckpt, config, device="cpu")
    assert loaded.lr_up_divisor == 256.0 and loaded.info["step"] == 400000
    lr = np.asarray(Image.open(lr_dir / "astronaut.png"))
    img_lr, img_up = prepare_lr(lr, 4, 256.0, 2, torch.device("cpu"))
    want = to_uint8(loaded.model.sample(img_lr, img_up, generator=torch.Generator().manual_seed(
        image_seed(7, "astronaut.png")))[0])
    assert np.array_equal(a, want)
    # resumable: a rerun skips what exists
    before = (out_dir / "astronaut.png").stat().st_mtime_ns
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "0 images written" in rerun.stdout and "2 already done" in rerun.stdout
    assert (out_dir / "astronaut.png").stat().st_mtime_ns == before


def test_our_weights_with_embedded_config_and_tiles(tmp_path, capsys):
    model, cfg = tiny_model(seed=2)
    ckpt = tmp_path / "weights" / "step00000100.pt"
    save_weights(ckpt, model, step=100, config=cfg.to_dict())
    lr_dir = tmp_path / "LR"
    lr_dir.mkdir()
    Image.fromarray(photo_lr("coffee", (20, 30))).save(lr_dir / "coffee.png")
    rc = infer_main(["--ckpt", str(ckpt), "--img-dir", str(lr_dir), "--save-dir", str(tmp_path / "SR"),
                     "--tile", "8", "--overlap", "2", "--batch", "4", "--steps", "3", "--quiet"])
    assert rc == 0
    sr = np.asarray(Image.open(tmp_path / "SR" / "coffee.png"))
    assert sr.shape == (80, 120, 3)
    assert "LR/255" in capsys.readouterr().err


def test_mismatched_checkpoint_is_a_clear_error(tmp_path, capsys):
    model, _ = tiny_model()
    ckpt = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"model": model.state_dict()}, "global_step": 1}, ckpt)
    (tmp_path / "LR").mkdir()
    rc = infer_main(["--ckpt", str(ckpt), "--img-dir", str(tmp_path / "LR"), "--save-dir", str(tmp_path / "SR"),
                     "--quiet"])  # no --config: the paper's model, which this file does not fit
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not match the model" in err and "x.ckpt" in err
    # one line saying how to build the model the file holds, not the hundreds of keys that differ
    assert err.count("\n") == 1 and "--config" in err and "model.hidden_size=8 model.dim_mults=[1,1,2,2]" in err
