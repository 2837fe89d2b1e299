"""The Python API as the README shows it: ``SuperResolver.from_pretrained(...).upscale(image)``.

The README's examples are extracted from README.md and run verbatim, on small random weights written where
they expect files; their outputs are checked against the library they are built on (the same numbers as
``launcher/infer.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samdiffsr import InferenceError, SuperResolver, build_model, load_config, save_weights
from samdiffsr.evaluation.inference import SamplerSettings, infer_folder
from samdiffsr.models.loading import load_model

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=8", "model.dim_mults=[1,2]", "model.rrdb_num_block=2", "model.rrdb_num_feat=8",
        "model.rrdb_growth=4", "model.timesteps=10"]


def readme_python_blocks() -> list[str]:
    """The ```python blocks of the README's "Python API" section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def write_our_weights(path: Path, seed: int = 0) -> None:
    """Random weights of a tiny model in our format, with its config inside (as training writes them)."""
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY)
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights(path, build_model(cfg.model), step=7, config=cfg.to_dict())


def lr_image(h: int = 11, w: int = 14, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_the_readme_example_runs_verbatim(tmp_path, monkeypatch):
    blocks = readme_python_blocks()
    assert len(blocks) >= 2 and "SuperResolver.from_pretrained" in blocks[0] and ".upscale(" in blocks[0]
    monkeypatch.chdir(tmp_path)  # the example's relative paths: weights, lr.png, sr.png
    write_our_weights(tmp_path / "runs" / "samdiffsr_df2k4x" / "weights" / "latest.pt")
    lr = lr_image()
    Image.fromarray(lr).save("lr.png")
    scope: dict = {}
    exec(compile(blocks[0], "README.md (Python API)", "exec"), scope)
    out = np.asarray(Image.open("sr.png"))
    assert out.shape == (44, 56, 3) and out.dtype == np.uint8 and scope["out"].shape == (44, 56, 3)
    assert np.array_equal(out, scope["out"])
    # The same numbers as the library underneath (and so as launcher/infer.py) for the same noise key.
    sr = scope["sr"]
    assert sr.loaded.lr_up_divisor == 255 and sr.loaded.info["layout"] == "samdiffsr" and sr.loaded.info["step"] == 7
    (tmp_path / "in").mkdir()
    Image.fromarray(lr).save(tmp_path / "in" / "x.png")
    infer_folder(load_model("runs/samdiffsr_df2k4x/weights/latest.pt"), "in", "cli", SamplerSettings(), progress=False)
    assert np.array_equal(sr.upscale(lr, key="x.png"), np.asarray(Image.open("cli/x.png")))
    assert np.array_equal(sr.upscale(Image.fromarray(lr)), out)  # a PIL image and its array: one output
    assert not np.array_equal(sr.upscale(lr, key="other"), out)  # the key seeds the noise


@pytest.mark.slow  # the paper-size model, sampled on CPU
def test_the_readme_authors_example_runs_verbatim(tmp_path, monkeypatch):
    """The second block: the authors' checkpoint layout with the shipped authors config, by name."""
    block = readme_python_blocks()[1]
    assert 'config="authors_samdiffsr_df2k4x"' in block
    monkeypatch.chdir(tmp_path)
    paper = load_config(REPO / "configs" / "authors_samdiffsr_df2k4x.yaml")
    torch.manual_seed(0)
    state = build_model(paper.model).state_dict()
    torch.save({"state_dict": {"model": state}, "global_step": 400_000}, "model_ckpt_steps_400000.ckpt")
    scope = {"SuperResolver": SuperResolver}
    exec(compile(block, "README.md (Python API, authors)", "exec"), scope)
    sr = scope["sr"]
    assert sr.loaded.info["layout"] == "authors" and sr.loaded.info["step"] == 400_000
    assert sr.loaded.lr_up_divisor == 256  # the authors' scaling, without the user computing anything
    assert (sr.settings.sampler, sr.settings.steps, sr.settings.eta, sr.settings.tile) == ("ddim", 20, 1.0, 64)
    assert sr.loaded.config.model.rrdb_num_block == 17 and sr.loaded.config.model.hidden_size == 64
    out = sr.upscale(lr_image(8, 8))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_from_pretrained_takes_the_cli_settings_and_refuses_bad_ones(tmp_path):
    weights = tmp_path / "w.pt"
    write_our_weights(weights)
    sr = SuperResolver.from_pretrained(weights, overrides=["model.lr_up_divisor=256"], device="cpu", steps=4,
                                       sampler="ddim", eta=1.0, seed=3, tile=8, overlap=2, batch=2)
    assert sr.loaded.lr_up_divisor == 256 and sr.device == torch.device("cpu")
    assert (sr.settings.steps, sr.settings.seed, sr.settings.tile, sr.settings.batch) == (4, 3, 8, 2)
    gray = lr_image()[:, :, 0]
    assert sr.upscale(gray).shape == (44, 56, 3)  # a grey image is taken as RGB
    with pytest.raises(InferenceError, match="unknown sampler setting.*stepz"):
        SuperResolver.from_pretrained(weights, stepz=3)
    with pytest.raises(InferenceError, match="--sampler/--steps"):
        SuperResolver.from_pretrained(weights, sampler="ddpm", steps=3)
    with pytest.raises(InferenceError, match="uint8 array, got a float32"):
        sr.upscale(lr_image().astype(np.float32))
    with pytest.raises(InferenceError, match="H x W x 3 RGB array, got shape"):
        sr.upscale(np.zeros((8, 8, 4), np.uint8))
