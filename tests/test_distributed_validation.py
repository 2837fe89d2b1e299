"""Validation shared by the ranks (samdiffsr/train/validation.py).

- The default validation sampler is the fast one of bench/RESULTS.md "Samplers": ddim, 10 steps, eta 1.
- A held-out image's noise depends on (seed, its position) alone: the same whichever images a rank holds.
- slow: 2 ranks validate 3 held-out images as 2 + 1 and log the same metrics, to the bit, as 1 rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import REPO, SCALE, TINY, torchrun, write_rrdb_weights, write_shards

from samdiffsr.config import ConfigError, load_config
from samdiffsr.data.pairs import load_val_images
from samdiffsr.models import build_model

DEMO = REPO / "configs" / "demo.yaml"


def test_the_default_validation_sampler_is_respaced_ancestral_with_10_steps():
    for config in (None, DEMO, REPO / "configs" / "samdiffsr_df2k4x.yaml"):
        t = load_config(config, []).train
        assert (t.val_sampler, t.val_steps, t.val_eta) == ("ddim", 10, 1.0), config
    assert load_config(None, ["train.val_sampler=ddpm", "train.val_steps=0"]).train.val_sampler == "ddpm"
    with pytest.raises(ConfigError, match=r"'train\.val_sampler' and 'train\.val_steps': the ddpm sampler runs all"):
        load_config(None, ["train.val_sampler=ddpm"])  # 10 steps of a 100-step chain


def test_an_images_noise_depends_on_its_position_alone(tmp_path):
    from samdiffsr.train.validation import ValSampler, validate_share

    val = write_shards(tmp_path / "val", sizes=(3,), tile=64, seed=5)
    torch.manual_seed(0)
    model = build_model(load_config(DEMO, TINY).model)
    settings = {"device": torch.device("cpu"), "scale": SCALE, "lr_up_divisor": 255.0, "seed": 7, "crop": 32,
                "sampler": ValSampler("ddim", 4, 1.0)}
    every, images = validate_share(model, "diffusion", load_val_images(val, 0, SCALE), **settings)
    share = load_val_images(val, 0, SCALE, rank=1, world=2)
    assert [b["index"] for b in share] == [1]
    alone, alone_images = validate_share(model, "diffusion", share, **settings)
    assert alone == {1: every[1]}  # image 1 validated after image 0, or alone: the same sample
    assert torch.equal(alone_images["1/sr"], images["1/sr"]) and "2/sr" not in images  # the first 2 are logged
    again, _ = validate_share(model, "diffusion", share, **settings)
    assert again == alone  # the same noise at every validation
    other_seed, _ = validate_share(model, "diffusion", share, **{**settings, "seed": 8})
    assert other_seed[1][:2] != alone[1][:2]  # the noise does come from the seed (bicubic columns do not)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    out = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
           if tag.startswith("val/")}
    return out | {"images": sorted(events.Tags()["images"])}


@pytest.mark.slow
def test_two_ranks_share_validation_and_give_one_ranks_metrics(tmp_path):
    # lr 1e-30: Adam's updates (about lr) vanish below the weights' float32 spacing, so the weights stay the
    # same initial ones (equal in any world size) and any difference between the runs comes from validation.
    base = ["--config", str(DEMO), *TINY, f"data.train_shards={write_shards(tmp_path / 'train')}",
            f"data.val_shards={write_shards(tmp_path / 'val', sizes=(3,), tile=64, seed=5)}", "data.val_images=0",
            f"train.rrdb_ckpt={write_rrdb_weights(tmp_path / 'rrdb.pt')}", "train.max_steps=2", "train.val_every=1",
            "train.val_crop=32", "optim.lr=1e-30"]  # the default validation sampler
    logs = {}
    for ranks in (1, 2):
        torchrun([*base, f"train.run_dir={tmp_path / str(ranks)}"], nproc=ranks)
        logs[ranks] = (tmp_path / str(ranks) / "train.log").read_text()
    # Each rank validated its share: 3 images as 2 + 1 (positions 0, 2 on rank 0; 1 on rank 1).
    for step in (1, 2):
        assert f"validation step {step}: 3 held-out images, per rank 3\n" in logs[1]
        assert f"validation step {step}: 3 held-out images, per rank 2 1\n" in logs[2]
    one, two = scalars(tmp_path / "1"), scalars(tmp_path / "2")
    assert {"val/psnr_y", "val/ssim_y", "val/bicubic_psnr_y", "val/bicubic_ssim_y"} <= one.keys()
    assert one == two  # every metric at every validation, to the bit; images 0 and 1 logged by both
    assert {"val/0/sr", "val/1/sr", "val/1/hr"} <= set(two["images"]) and "val/2/sr" not in two["images"]
    (_, first), (_, second) = one["val/psnr_y"]
    assert first == second  # the same weights and the same noise at every validation: the same figure
