"""LPIPS and FID: the real architectures with seeded random weights, and the weight-file paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from skimage import data
from torchvision.models import inception

from samdiffsr.evaluation.fid import (
    FID_WEIGHTS,
    FIDFeatures,
    FIDInception,
    _FIDInceptionA,
    _FIDInceptionE,
    fid_from_features,
    frechet_distance,
)
from samdiffsr.evaluation.perceptual import ALEXNET_WEIGHTS, LPIPS, LPIPS_HEADS_WEIGHTS
from samdiffsr.evaluation.weights_files import MissingWeightsError, load_state


def crops(img: np.ndarray, size: int, n: int) -> list[np.ndarray]:
    step = (img.shape[1] - size) // max(n - 1, 1)
    return [np.ascontiguousarray(img[:size, i * step : i * step + size]) for i in range(n)]


def noisy(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, img.shape).round().astype(np.int64)
    return np.clip(img.astype(np.int64) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    return LPIPS.random_init(seed=0)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return data.astronaut()[100:196, 150:278]  # 96 x 128, a face


# --------------------------------------------------------------------------- LPIPS


def test_lpips_backbone_is_torchvision_alexnet(lpips):
    with torch.device("meta"):
        reference = torchvision.models.alexnet().features[:12]
    assert repr(lpips.net.features) == repr(reference)


def test_lpips_equals_its_published_formula(lpips, photo):
    """d(x, y) = sum_l mean_hw( w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2 ), f_l = AlexNet ReLU l."""
    with torch.device("meta"):
        alex = torchvision.models.alexnet()
    alex.to_empty(device="cpu")
    state = lpips.net.state_dict()
    backbone = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    alex.features.load_state_dict(backbone)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img: np.ndarray) -> list[torch.Tensor]:
        h = (torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1 - shift) / scale
        out = []
        for layer in alex.features:
            h = layer(h)
            if isinstance(layer, torch.nn.ReLU):
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    other = noisy(photo, 12)
    with torch.inference_mode():
        expected = sum(
            ((a - b) ** 2 * state[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)).sum(1).mean()
            for k, (a, b) in enumerate(zip(taps(other), taps(photo), strict=True))
        )
    assert float(lpips(other, photo)) == pytest.approx(float(expected), rel=1e-5)


def test_lpips_identical_symmetric_positive(lpips, photo):
    other = data.astronaut()[200:296, 150:278]
    assert float(lpips(photo, photo)) == 0.0
    d_ab, d_ba = float(lpips(photo, other)), float(lpips(other, photo))
    assert d_ab > 0
    assert d_ab == pytest.approx(d_ba, rel=1e-5)


def test_lpips_grows_with_noise(lpips, photo):
    small, large = float(lpips(noisy(photo, 4), photo)), float(lpips(noisy(photo, 30), photo))
    assert 0 < small < large


def test_lpips_input_forms_agree(lpips, photo):
    other = noisy(photo, 10)
    as_tensor = [torch.from_numpy(x).permute(2, 0, 1).float() / 127.5 - 1 for x in (other, photo)]
    from_uint8 = lpips(other, photo)
    assert from_uint8.shape == (1,)
    assert torch.allclose(lpips(*as_tensor), from_uint8, atol=1e-6)
    batch = lpips(np.stack([other, photo]), np.stack([photo, photo]))
    assert batch.shape == (2,)
    assert torch.allclose(batch, torch.cat([from_uint8, torch.zeros(1)]), atol=1e-6)
    with pytest.raises(ValueError):
        lpips(photo, photo[:64])
    with pytest.raises(TypeError):
        lpips(photo.astype(np.float32), photo.astype(np.float32))


def test_lpips_weights_files_round_trip(lpips, photo, tmp_path, monkeypatch):
    other = noisy(photo, 10)
    expected = lpips(other, photo)
    paths = lpips.export_weights(tmp_path / "w")
    assert [p.name for p in paths] == ["alexnet-owt-7be5be79.pth", "alex.pth"]
    assert "lin0.model.1.weight" in load_state(paths[1]) and "features.0.weight" in load_state(paths[0])
    for weights in (tmp_path / "w", paths, [str(p) for p in reversed(paths)]):
        assert torch.equal(LPIPS(weights=weights)(other, photo), expected)
    # The torch hub cache, where torchvision would have downloaded the backbone.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    lpips.export_weights(hub)
    assert torch.equal(LPIPS()(other, photo), expected)


def test_lpips_pyiqa_single_file_layout(lpips, photo, tmp_path):
    state = lpips.net.state_dict()
    slice_of = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features":
            renamed[f"net.slice{slice_of[int(parts[1])]}.{parts[1]}.{parts[2]}"] = value
        else:
            renamed[f"lins.{key[3]}.model.1.weight"] = value
    renamed["scaling_layer.shift"] = torch.tensor([-0.030, -0.088, -0.188])
    path = tmp_path / "LPIPS_v0.1_alex-df73285e.pth"
    torch.save(renamed, path)
    other = noisy(photo, 10)
    assert torch.equal(LPIPS(weights=path)(other, photo), lpips(other, photo))


def test_lpips_missing_weights_name_the_files(lpips, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match=r"alexnet-owt-7be5be79\.pth") as err:
        LPIPS(weights=empty)
    assert ALEXNET_WEIGHTS.url in str(err.value) and "--lpips-weights" in str(err.value)
    backbone_only = tmp_path / "half"
    paths = lpips.export_weights(backbone_only)
    paths[1].unlink()
    with pytest.raises(MissingWeightsError, match=r"'alex\.pth'") as err:
        LPIPS(weights=backbone_only)
    assert "lpips/weights/v0.1/alex.pth" in str(err.value)
    with pytest.raises(MissingWeightsError, match=r"'alex\.pth'"):
        LPIPS(weights=paths[0])
    with pytest.raises(MissingWeightsError, match="does not exist"):
        LPIPS(weights=tmp_path / "nope.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "bare_home"))
    with pytest.raises(MissingWeightsError, match=r"bare_home.hub.checkpoints"):
        LPIPS()
    assert LPIPS_HEADS_WEIGHTS.name == "alex.pth"


# --------------------------------------------------------------------------- FID


@pytest.fixture(scope="module")
def fid_net() -> FIDFeatures:
    return FIDFeatures.random_init(seed=0)


@pytest.fixture(scope="module")
def photo_set() -> list[np.ndarray]:
    return [*crops(data.astronaut(), 160, 2), data.chelsea()[:150, :200], data.coffee()[100:260, 200:400]]


@pytest.fixture(scope="module")
def photo_feats(fid_net, photo_set) -> np.ndarray:
    return fid_net(photo_set)


def test_fid_network_matches_the_weights_file_layout():
    """pytorch-fid loads the file strictly into torchvision's Inception3(1008 classes, no aux)."""
    with torch.device("meta"):
        ours = FIDInception().state_dict()
        tv = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, init_weights=False)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in tv.state_dict().items()}


def test_fid_blocks_pool_like_tensorflow():
    torch.manual_seed(0)
    x = torch.rand(1, 192, 9, 9)
    tv_block, fid_block = inception.InceptionA(192, pool_features=32), _FIDInceptionA(192, pool_features=32)
    fid_block.load_state_dict(tv_block.state_dict())
    for block in (tv_block, fid_block):
        block.eval()
    with torch.inference_mode():
        a, b = tv_block(x), fid_block(x)
    pool = slice(224, 256)  # the pool branch: zero padding is not averaged in -> differs on the border only
    assert torch.equal(a[:, :224], b[:, :224])
    assert torch.allclose(a[:, pool, 1:-1, 1:-1], b[:, pool, 1:-1, 1:-1], atol=1e-6)
    assert not torch.allclose(a[:, pool, 0], b[:, pool, 0], atol=1e-4)
    last, avg = _FIDInceptionE(2048, max_pool=True), _FIDInceptionE(2048, max_pool=False)
    avg.load_state_dict(last.state_dict())
    y = torch.rand(1, 2048, 3, 3)
    with torch.inference_mode():
        assert not torch.allclose(last.eval()(y)[:, -192:], avg.eval()(y)[:, -192:], atol=1e-4)


def test_fid_features_shape_and_input_forms(fid_net, photo_set, photo_feats):
    assert photo_feats.shape == (4, 2048) and photo_feats.dtype == np.float64
    assert np.isfinite(photo_feats).all() and photo_feats.std() > 1e-3
    assert np.abs(photo_feats[0] - photo_feats[2]).max() > 1e-3  # different photos, different features
    same_size = np.stack(photo_set[:2])
    as_tensor = torch.from_numpy(same_size).permute(0, 3, 1, 2).float() / 255
    assert np.allclose(fid_net(as_tensor), photo_feats[:2], atol=1e-5)


@pytest.mark.slow  # scipy.linalg.sqrtm of a 2048x2048 matrix: ~10 s on 2 cores
def test_fid_input_pipelines(fid_net):
    img = data.astronaut()[100:399, 100:399]  # already 299 x 299: both resizes are identities
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
    with torch.inference_mode():
        legacy = fid_net.net.pool3(x / 127.5 - 1).double().numpy()  # pytorch-fid: 2 * (x / 255) - 1
        clean = fid_net.net.pool3((x - 128) / 128).double().numpy()  # clean-fid: (x - 128) / 128
    assert np.allclose(fid_net([img]), legacy, atol=1e-5)
    clean_net = FIDFeatures(weights=fid_net.net.state_dict(), mode="clean")
    assert np.allclose(clean_net([img]), clean, atol=1e-5)
    assert not np.allclose(legacy, clean, atol=1e-5)
    other = data.chelsea()  # 300 x 451: PIL bicubic vs torch bilinear resize give different inputs
    assert clean_net([other]).shape == (1, 2048)
    assert not np.allclose(clean_net([other]), fid_net([other]), atol=1e-4)
    with pytest.raises(ValueError, match="mode"):
        FIDFeatures(weights=fid_net.net.state_dict(), mode="tf")


def test_fid_of_a_set_with_itself_is_zero(photo_feats):
    assert fid_from_features(photo_feats, photo_feats) == pytest.approx(0.0, abs=1e-2)


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    # Diagonal covariances: Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(v1) - sqrt(v2))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # The same through sampled features: large samples from the two Gaussians.
    a = mu1 + rng.normal(size=(20000, 6)) * np.sqrt(v1)
    b = mu2 + rng.normal(size=(20000, 6)) * np.sqrt(v2)
    assert fid_from_features(a, b) == pytest.approx(expected, rel=0.05)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError):
        fid_from_features(a[:1], b)


def test_fid_weights_file_round_trip(fid_net, photo_set, photo_feats, tmp_path, monkeypatch):
    path = fid_net.export_weights(tmp_path / "w")
    assert path.name == "pt_inception-2015-12-05-6726825d.pth"
    assert "Mixed_7c.branch_pool.conv.weight" in load_state(path)
    assert np.array_equal(FIDFeatures(weights=path)(photo_set[:1]), photo_feats[:1])
    # A folder (here the torch hub cache) is searched for the file by name.
    (tmp_path / "home" / "hub" / "checkpoints" / "unrelated.pth").parent.mkdir(parents=True)
    torch.save({"x": torch.zeros(1)}, tmp_path / "home" / "hub" / "checkpoints" / "unrelated.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    fid_net.export_weights(tmp_path / "home" / "hub" / "checkpoints")
    assert np.array_equal(FIDFeatures()(photo_set[:1]), photo_feats[:1])


def test_fid_missing_weights_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(MissingWeightsError, match=r"pt_inception-2015-12-05-6726825d\.pth") as err:
        FIDFeatures(weights=tmp_path)
    assert FID_WEIGHTS.url in str(err.value) and "--fid-weights" in str(err.value)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "bare"))
    with pytest.raises(MissingWeightsError, match=r"pt_inception-2015-12-05-6726825d\.pth"):
        FIDFeatures()
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not a pytorch-fid Inception state dict"):
        FIDFeatures(weights=wrong)
