"""Typed config: YAML layers, overrides, and errors that name the key."""

import pytest

from samdiffsr.config import Config, ConfigError, config_from_dict, load_config


def test_paper_config_holds_the_paper_settings():
    cfg = load_config("configs/samdiffsr_df2k4x.yaml")
    m, o, t, d = cfg.model, cfg.optim, cfg.train, cfg.data
    assert (m.hidden_size, m.dim_mults, m.rrdb_num_block, m.rrdb_num_feat, m.rrdb_growth) == (64, (1, 2, 3, 4), 17,
                                                                                                64, 32)
    assert (m.sr_scale, m.timesteps, m.beta_schedule, m.beta_s, m.res_rescale) == (4, 100, "cosine", 0.008, 2.0)
    assert m.loss_type == "l1" and m.sam_modulation and m.mask_coefficient and m.clip_input
    assert (o.lr, o.decay_steps, o.decay_gamma, o.grad_clip) == (2e-4, 200_000, 0.5, 10.0)
    assert (t.batch_size, t.max_steps, t.task, t.freeze_rrdb) == (64, 400_000, "diffusion", True)
    assert d.patch_size == 160


def test_rrdb_config_inherits_and_overrides():
    cfg = load_config("configs/rrdb_df2k4x.yaml")
    assert cfg.train.task == "rrdb" and cfg.train.max_steps == 100_000 and not cfg.train.freeze_rrdb
    assert cfg.model.rrdb_num_block == 17  # from the base file


def test_overrides_are_typed():
    cfg = load_config("configs/samdiffsr_df2k4x.yaml",
                      ["train.max_steps=10", "optim.lr=1e-3", "model.dim_mults=1,2", "data.hflip=false"])
    assert cfg.train.max_steps == 10 and cfg.optim.lr == 1e-3
    assert cfg.model.dim_mults == (1, 2) and cfg.data.hflip is False
    assert load_config(None, ["model.dim_mults=1|2|2|4"]).model.dim_mults == (1, 2, 2, 4)


@pytest.mark.parametrize("override, fragment", [
    (["train.max_step=3"], "unknown config key 'train.max_step' (did you mean 'max_steps'?)"),
    (["trian.max_steps=3"], "unknown config key 'trian' (did you mean 'train'?)"),
    (["train.max_steps=abc"], "config key 'train.max_steps': expected an integer"),
    (["optim.lr=fast"], "config key 'optim.lr': expected a number"),
    (["data.hflip=maybe"], "config key 'data.hflip': expected true/false"),
    (["train.precision=fp8"], "config key 'train.precision'"),
    (["data.patch_size=161"], "config key 'data.patch_size'"),
    (["train.max_steps"], "is not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("configs/samdiffsr_df2k4x.yaml", override)
    assert fragment in str(err.value)


def test_bad_yaml_key_names_the_file_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_size: 32\n")
    with pytest.raises(ConfigError, match=r"'model.hiden_size' \(did you mean 'hidden_size'\?\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip_through_dict():
    cfg = load_config("configs/samdiffsr_df2k4x.yaml", ["train.zero_stage=1", "deepspeed.zero_optimization={stage: 1}"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again, Config)
    assert again.deepspeed == {"zero_optimization": {"stage": 1}}


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=0", "config key 'train.max_steps': must be >= 1, got 0"),
    ("train.max_steps=-5", "config key 'train.max_steps': must be >= 1, got -5"),
    ("optim.lr=-1e-3", "config key 'optim.lr': must be > 0, got -0.001"),
    ("optim.lr=.nan", "config key 'optim.lr': must be > 0, got nan"),
    ("train.ckpt_every=0", "config key 'train.ckpt_every': must be >= 1, got 0"),
    ("train.log_every=0", "config key 'train.log_every': must be >= 1, got 0"),
    ("optim.decay_steps=0", "config key 'optim.decay_steps': must be >= 1, got 0"),
    ("train.val_every=-1", "config key 'train.val_every': must be >= 0, got -1"),
    ("data.workers=-1", "config key 'data.workers': must be >= 0, got -1"),
    ("optim.betas=[0.9,1.5]", "config key 'optim.betas[1]': must be in [0, 1), got 1.5"),
    ("model.dim_mults=[1,0]", "config key 'model.dim_mults': must be a non-empty list of integers >= 1"),
    ("model.rrdb_num_block=1", "config key 'model.rrdb_num_block': must be >= 2"),
])
def test_values_out_of_range_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert message in str(err.value)


def test_smallest_valid_rrdb_builds_a_unet_with_no_empty_layer():
    import torch

    from samdiffsr.models.diffusion import build_model

    cfg = load_config(None, ["model.rrdb_num_block=2", "model.hidden_size=8", "model.dim_mults=[1,2]",
                             "model.rrdb_num_feat=8", "model.rrdb_growth=4"])
    model = build_model(cfg.model)
    assert all(p.numel() > 0 for p in model.parameters())
    lr = torch.zeros(1, 3, 8, 8)
    assert model.sample(lr, torch.zeros(1, 3, 32, 32), steps=2).shape == (1, 3, 32, 32)
