"""The authors' released files and the configs that go with them (docs/pretrained.md): the released model's
config, their RRDB checkpoint layout, and the SAM checkpoint errors that say where the official files are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from samdiffsr.bundled import bundled_configs, config_path, shipped_config
from samdiffsr.config import load_config
from samdiffsr.masks.sam import CHECKPOINTS_PAGE, OFFICIAL_CHECKPOINTS, SamCheckpointError, SamMasker
from samdiffsr.models import build_model, load_rrdb_weights
from samdiffsr.models.weights import WeightsError

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "authors_paper_state_dict.json"


def test_the_authors_model_config_is_the_paper_config_with_their_divisor():
    authors = load_config(REPO / "configs" / "authors_samdiffsr_df2k4x.yaml").to_dict()
    paper = load_config(REPO / "configs" / "samdiffsr_df2k4x.yaml").to_dict()
    assert authors["model"].pop("lr_up_divisor") == 256.0 and paper["model"].pop("lr_up_divisor") == 255.0
    assert authors == paper


def test_the_authors_rrdb_config_trains_the_paper_model_on_their_rrdb():
    cfg = load_config(REPO / "configs" / "authors_rrdb_samdiffsr_df2k4x.yaml")
    paper = load_config(REPO / "configs" / "samdiffsr_df2k4x.yaml")
    assert cfg.model == paper.model and cfg.data == paper.data and cfg.optim == paper.optim
    train = cfg.train
    assert (train.task, train.freeze_rrdb, train.rrdb_ckpt) == ("diffusion", True, "weights/rrdb_div2k.ckpt")
    assert cfg.train.run_dir != paper.train.run_dir  # a run of its own: it never resumes the other


def test_shipped_configs_are_found_by_name():
    names = {"authors_samdiffsr_df2k4x.yaml", "authors_rrdb_samdiffsr_df2k4x.yaml", "demo.yaml"}
    assert names <= set(bundled_configs())
    assert shipped_config("authors_samdiffsr_df2k4x") == shipped_config("configs/authors_samdiffsr_df2k4x.yaml")
    assert shipped_config("demo").read_text() == (REPO / "configs" / "demo.yaml").read_text()
    assert config_path("/nowhere/authors_samdiffsr_df2k4x.yaml") == shipped_config("authors_samdiffsr_df2k4x")
    assert config_path("/nowhere/mine.yaml") == Path("/nowhere/mine.yaml")  # left for the loader to report
    with pytest.raises(FileNotFoundError, match="no shipped config mine.yaml"):
        shipped_config("mine")


def authors_rrdb_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with the key names and shapes of the authors' RRDBNet (their rrdb task saves the
    bare RRDBNet: the paper model's ``rrdb.*`` keys without the prefix)."""
    keys = json.loads(REFERENCE.read_text())["keys"]
    gen = torch.Generator().manual_seed(seed)
    rrdb = [(name[len("rrdb."):], shape) for name, shape in keys if name.startswith("rrdb.")]
    assert len(rrdb) > 100
    return {name: torch.randn(shape, generator=gen) for name, shape in rrdb}


def test_the_authors_rrdb_checkpoint_layout_loads_into_the_paper_rrdb(tmp_path):
    state = authors_rrdb_state()
    path = tmp_path / "rrdb_div2k.ckpt"  # their trainer's save_checkpoint layout
    torch.save({"state_dict": {"model": state}, "global_step": 100_000, "checkpoint_callback_best": 0,
                "optimizer_states": []}, path)
    model = build_model(load_config(REPO / "configs" / "authors_rrdb_samdiffsr_df2k4x.yaml").model)
    info = load_rrdb_weights(model.rrdb, path)
    assert info["layout"] == "authors" and info["step"] == 100_000
    loaded = model.rrdb.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    # One key short: refused by name, never a silent partial load.
    state.pop("conv_last.bias")
    torch.save({"state_dict": {"model": state}, "global_step": 1}, tmp_path / "short.ckpt")
    with pytest.raises(WeightsError, match="missing keys: conv_last.bias"):
        load_rrdb_weights(model.rrdb, tmp_path / "short.ckpt")


@pytest.mark.parametrize("model_type", sorted(OFFICIAL_CHECKPOINTS))
def test_a_missing_sam_checkpoint_names_the_official_file_and_where_it_is(tmp_path, model_type):
    missing = tmp_path / "sam.pth"
    with pytest.raises(SamCheckpointError) as info:
        SamMasker(missing, model_type)
    message = str(info.value)
    name = OFFICIAL_CHECKPOINTS[model_type]
    assert message.startswith(f"SAM checkpoint {missing}: file not found; ")
    assert name in message and CHECKPOINTS_PAGE in message
    assert f"https://dl.fbaipublicfiles.com/segment_anything/{name}" in message
    assert "\n" not in message


def test_the_official_names_are_segment_anythings():
    assert dict(OFFICIAL_CHECKPOINTS) == {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth",
                                          "vit_b": "sam_vit_b_01ec64.pth"}
    assert CHECKPOINTS_PAGE == "https://github.com/facebookresearch/segment-anything#model-checkpoints"


def test_make_shards_says_it_in_one_line(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "images" / "a.png")
    proc = subprocess.run([sys.executable, str(REPO / "launcher" / "make_shards.py"), "--images",
                           str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--sam-checkpoint",
                           str(tmp_path / "sam_vit_h.pth"), "--workers", "1", "--no-progress"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "sam_vit_h_4b8939.pth" in line]
    assert len(lines) == 1 and CHECKPOINTS_PAGE in lines[0] and str(tmp_path / "sam_vit_h.pth") in lines[0], proc.stderr
    assert proc.returncode != 0
