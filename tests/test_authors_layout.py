"""Our paper-config model has exactly the authors' parameter and buffer names and shapes.

The reference is tests/data/authors_paper_state_dict.json: the state dict key names and shapes of the
authors' paper model, obtained by instantiating THEIR model classes (lose4578/SAM-DiffSR, commit and classes
recorded in the file's ``source``) with their paper config, not from our own code. Their released
checkpoints load key for key only if this list and ours agree exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from samdiffsr.config import load_config
from samdiffsr.models import build_model, load_weights

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "authors_paper_state_dict.json"


def authors_keys() -> list[tuple[str, tuple[int, ...]]]:
    data = json.loads(REFERENCE.read_text())
    assert data["source"]["repository"] == "https://github.com/lose4578/SAM-DiffSR"
    assert len(data["source"]["commit"]) == 40
    return [(name, tuple(shape)) for name, shape in data["keys"]]


def paper_model():
    cfg = load_config(REPO / "configs" / "samdiffsr_df2k4x.yaml")
    torch.manual_seed(0)
    return build_model(cfg.model)


def test_paper_model_state_dict_equals_the_authors_key_for_key():
    theirs = authors_keys()
    assert len(theirs) == 666
    assert sum(torch.Size(s).numel() for n, s in theirs if n.startswith("denoise_fn.")) == 12_934_915
    ours = [(name, tuple(t.shape)) for name, t in paper_model().state_dict().items()]
    missing = sorted(set(theirs) - set(ours))
    extra = sorted(set(ours) - set(theirs))
    assert not missing and not extra, f"missing {missing[:10]}, not in the authors' model {extra[:10]}"
    assert dict(ours) == dict(theirs) and len(ours) == len(theirs)  # (the order may differ: names are what load)


def test_a_checkpoint_in_the_authors_layout_loads_into_the_paper_model(tmp_path):
    """A checkpoint built from the authors' names alone (their trainer's {'state_dict': {'model': ...}})."""
    model = paper_model()
    schedule = {k: v for k, v in model.state_dict().items() if not k.startswith(("denoise_fn.", "rrdb."))}
    # Network tensors get values of their own; the schedule buffers must be the diffusion's (they are checked).
    state = {name: schedule[name].clone() if name in schedule else torch.full(shape, float(i))
             for i, (name, shape) in enumerate(authors_keys())}
    assert len(schedule) == 12  # betas ... posterior_mean_coef2
    path = tmp_path / "model_ckpt_steps_400000.ckpt"
    torch.save({"state_dict": {"model": state}, "global_step": 400_000}, path)
    info = load_weights(model, path)
    assert info["layout"] == "authors" and info["step"] == 400_000
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in state.items())
