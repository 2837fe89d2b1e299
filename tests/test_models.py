"""The SAM-DiffSR network: architecture, modulated forward process, sampler, checkpoints."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samdiffsr.config import ModelConfig, load_config
from samdiffsr.models import WeightsError, build_model, load_rrdb_weights, load_weights, save_weights

TINY = ModelConfig(hidden_size=16, dim_mults=(1, 2), rrdb_num_block=2, rrdb_num_feat=16, rrdb_growth=8,
                   timesteps=12)


def tiny_model(seed=0, **changes):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY.__dict__, **changes})
    return build_model(cfg).eval()


def batch(seed=0, b=2, size=32):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    lr = F.avg_pool2d(hr, 4)
    lr_up = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    mask = torch.rand(b, 1, size, size, generator=g) * 0.5
    return hr, lr, lr_up, mask


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_config_parameter_counts():
    model = build_model(ModelConfig())
    assert count(model.denoise_fn) == 12_934_915
    assert count(model.rrdb) == 12_381_443


def test_modulated_noise_equals_formula_and_leaves_noise_alone():
    model = tiny_model()
    hr, lr, lr_up, mask = batch()
    noise = torch.randn_like(hr)
    before = noise.clone()
    t = torch.tensor([0, 7])
    got = model.modulated_noise(noise, mask[:, :, ::2, ::2], t)
    assert torch.equal(noise, before), "the caller's noise tensor must not be mutated"
    betas = model.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    coef = (torch.sqrt(1 - abar) * betas)[t].view(-1, 1, 1, 1)
    m = F.interpolate(mask[:, :, ::2, ::2], size=hr.shape[-2:], mode="bilinear", align_corners=False)
    expected = noise.double() + m.double() * coef  # same value on all 3 channels
    assert torch.allclose(got.double(), expected, atol=1e-6)
    assert not torch.allclose(got, noise)


def test_training_loss_uses_modulated_target():
    model = tiny_model()
    hr, lr, lr_up, mask = batch()
    t = torch.tensor([3, 9])
    noise = torch.randn_like(hr)
    loss = model.training_loss(hr, lr, lr_up, mask=mask, t=t, noise=noise)
    # Recompute independently from the buffers.
    x0 = ((hr - lr_up) * 2).clamp(-1, 1)
    eps = noise + mask * (model.sqrt_one_minus_alphas_cumprod * model.betas)[t].view(-1, 1, 1, 1)
    x_t = model.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0 + model.sqrt_one_minus_alphas_cumprod[t].view(
        -1, 1, 1, 1) * eps
    _, cond = model.rrdb(lr, True)
    expected = (eps - model.denoise_fn(x_t, t, cond)).abs().mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_zero_mask_loss_equals_plain_srdiff():
    hr, lr, lr_up, _ = batch()
    t, noise = torch.tensor([1, 11]), torch.randn_like(hr)
    sam = tiny_model()
    plain = tiny_model(sam_modulation=False)
    zero = torch.zeros_like(hr[:, :1])
    a = sam.training_loss(hr, lr, lr_up, mask=zero, t=t, noise=noise)
    b = plain.training_loss(hr, lr, lr_up, mask=torch.ones_like(zero), t=t, noise=noise)
    c = sam.training_loss(hr, lr, lr_up, mask=None, t=t, noise=noise)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_frozen_rrdb_gets_no_gradient():
    model = tiny_model().train()
    model.rrdb.requires_grad_(False)
    hr, lr, lr_up, mask = batch()
    model.training_loss(hr, lr, lr_up, mask=mask).backward()
    assert all(p.grad is None for p in model.rrdb.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.denoise_fn.parameters())


def test_sampling_is_deterministic_batched_and_respaced():
    model = tiny_model()
    _, lr, lr_up, _ = batch()
    run = lambda seed, **kw: model.sample(lr, lr_up, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    a, b, c = run(1), run(1), run(2)
    assert a.shape == lr_up.shape and torch.equal(a, b) and not torch.equal(a, c)
    x_t = torch.randn_like(lr_up)
    kept = x_t.clone()
    d1 = model.sample(lr, lr_up, noise=x_t, steps=4)
    d2 = model.sample(lr, lr_up, noise=x_t, steps=4)
    assert torch.equal(d1, d2) and torch.equal(x_t, kept)  # DDIM eta=0 is deterministic given x_T
    assert model.timestep_schedule(4) == [11, 7, 4, 0]
    assert model.timestep_schedule(None) == list(range(11, -1, -1))
    # Batched sampling equals per-image sampling given the same per-image noise (eta=0 path).
    single = torch.cat([model.sample(lr[i:i + 1], lr_up[i:i + 1], noise=x_t[i:i + 1], steps=4) for i in range(2)])
    assert torch.allclose(single, d1, atol=1e-5)


def _authors_checkpoint(model, path, prefix="module."):
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": {"model": state}, "global_step": 400_000,
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-4}]}]}, path)


def test_authors_checkpoint_loads_and_reproduces_outputs(tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    path = tmp_path / "model_ckpt_steps_400000.ckpt"
    _authors_checkpoint(source, path)
    info = load_weights(target, path)
    assert info["layout"] == "authors" and info["step"] == 400_000
    hr, lr, lr_up, mask = batch()
    t, noise = torch.tensor([2, 5]), torch.randn_like(hr)
    assert torch.equal(source.training_loss(hr, lr, lr_up, mask, t, noise),
                       target.training_loss(hr, lr, lr_up, mask, t, noise))
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(source.sample(lr, lr_up, generator=gen()), target.sample(lr, lr_up, generator=gen()))


def test_our_weights_round_trip_prefers_ema(tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    ema = {k: v + 1 for k, v in source.state_dict().items() if k.startswith("denoise_fn.")}
    save_weights(tmp_path / "w.pt", source, ema=ema, step=7, config={"model": {}})
    info = load_weights(target, tmp_path / "w.pt")
    assert info["step"] == 7 and info["ema"]
    assert torch.equal(target.denoise_fn.final_conv[1].bias, source.denoise_fn.final_conv[1].bias + 1)
    load_weights(target, tmp_path / "w.pt", prefer_ema=False)
    assert torch.equal(target.denoise_fn.final_conv[1].bias, source.denoise_fn.final_conv[1].bias)


def test_rrdb_checkpoints_in_both_layouts(tmp_path):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    torch.save({"state_dict": {"model": source.rrdb.state_dict()}, "global_step": 100_000}, tmp_path / "rrdb.ckpt")
    load_rrdb_weights(target.rrdb, tmp_path / "rrdb.ckpt")
    assert torch.equal(target.rrdb.conv_first.weight, source.rrdb.conv_first.weight)
    save_weights(tmp_path / "full.pt", tiny_model(seed=4))
    load_rrdb_weights(target.rrdb, tmp_path / "full.pt")  # the rrdb.* part of a full model
    assert torch.equal(target.rrdb.conv_last.bias, tiny_model(seed=4).rrdb.conv_last.bias)


@pytest.mark.parametrize("damage, fragment", [
    (lambda s: s.pop("denoise_fn.mlp.0.weight"), "missing keys: denoise_fn.mlp.0.weight"),
    (lambda s: s.__setitem__("denoise_fn.extra.weight", torch.zeros(1)), "unexpected keys: denoise_fn.extra.weight"),
    (lambda s: s.__setitem__("rrdb.conv_first.bias", torch.zeros(5)), "rrdb.conv_first.bias: file (5,) vs model (16,)"),
    (lambda s: s.__setitem__("betas", s["betas"] * 2), "buffer 'betas' differs"),
])
def test_mismatched_checkpoint_names_the_key(tmp_path, damage, fragment):
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    damage(state)
    torch.save({"state_dict": {"model": state}, "global_step": 1}, tmp_path / "bad.ckpt")
    with pytest.raises(WeightsError) as err:
        load_weights(tiny_model(), tmp_path / "bad.ckpt")
    assert fragment in str(err.value) and "bad.ckpt" in str(err.value)


def test_unreadable_checkpoints_fail_clearly(tmp_path):
    model = tiny_model()
    with pytest.raises(WeightsError, match="weights file not found"):
        load_weights(model, tmp_path / "nope.ckpt")
    save_weights(tmp_path / "w.pt", model)
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.pt: not a readable checkpoint, damaged or truncated"):
        load_weights(model, tmp_path / "cut.pt")
    torch.save({"state_dict": {"model": {"x": np.zeros(2)}}}, tmp_path / "pickle.ckpt")
    with pytest.raises(WeightsError, match="pickle.ckpt"):
        load_weights(model, tmp_path / "pickle.ckpt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError):
        load_weights(model, tmp_path / "cut.pt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf_are_refused_naming_the_tensor(tmp_path, bad):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    with torch.no_grad():
        source.rrdb.conv_last.bias[1] = bad
    save_weights(tmp_path / "w.pt", source)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError, match=r"w.pt: tensor 'rrdb.conv_last.bias' holds NaN or Inf values"):
        load_weights(target, tmp_path / "w.pt")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_authors_checkpoint_of_another_shape_says_which_overrides_fit(tmp_path):
    """The paper's model has 17 RRDB blocks and hidden size 64; built from a smaller config, say so."""
    paper = replace(TINY, rrdb_num_block=5, hidden_size=24, dim_mults=(1, 2, 2), use_attn=True)
    _authors_checkpoint(build_model(paper), tmp_path / "model_ckpt_steps_400000.ckpt")
    with pytest.raises(WeightsError) as err:
        load_weights(tiny_model(), tmp_path / "model_ckpt_steps_400000.ckpt")
    message = str(err.value)
    assert message.endswith("or the overrides model.rrdb_num_block=5 model.hidden_size=24 model.dim_mults=[1,2,2] "
                            "model.use_attn=true"), message
    assert "--config" in message and "configs/samdiffsr_df2k4x.yaml" in message and "\n" not in message
    assert len(message) < 400
    fitted = load_config(None, ["model.hidden_size=24", "model.dim_mults=[1,2,2]", "model.use_attn=true",
                                "model.rrdb_num_block=5", *(f"model.{k}={getattr(TINY, k)}" for k in
                                                            ("rrdb_num_feat", "rrdb_growth", "timesteps"))])
    assert load_weights(build_model(fitted.model), tmp_path / "model_ckpt_steps_400000.ckpt")["layout"] == "authors"
