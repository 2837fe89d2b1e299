"""FID: pytorch-fid's InceptionV3 pool3 features (2048-d) and the Frechet distance between two sets.

The network is torchvision's Inception3 patched as TensorFlow's FID graph, loaded strictly from
``pt_inception-2015-12-05-6726825d.pth``. Two input pipelines, the only difference between them:
``mode="legacy_pytorch"`` (this class's default; pytorch-fid) and ``mode="clean"`` (clean-fid: pyiqa's default,
so what the authors' pyiqa reported, and the benchmark's default ``--fid-mode``); see docs/evaluation.md,
"Metric definitions".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torchvision.models import inception as tv_inception

from samdiffsr.evaluation.weights_files import (
    PathLike,
    WeightsFile,
    candidate_files,
    find_named,
    load_state,
)

FID_WEIGHTS = WeightsFile(
    name="pt_inception-2015-12-05-6726825d.pth",
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth",
    flag="--fid-weights",
    what="FID InceptionV3 (pytorch-fid)",
)
FEATURE_DIM = 2048
MODES = ("legacy_pytorch", "clean")
_SIZE = 299
_MIXED = ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c")


def _resize(x: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's input resize: bilinear to 299x299, ``align_corners=False`` (identity at 299)."""
    return F.interpolate(x, size=(_SIZE, _SIZE), mode="bilinear", align_corners=False)


def _unit_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> (1, 3, H, W) float32 in [0, 1], as torchvision's ``ToTensor``."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255.0


def _clean_input(img255: np.ndarray) -> torch.Tensor:
    """clean-fid's preprocessing of one HxWx3 float32 image in 0..255 -> (1, 3, 299, 299)."""
    chans = []
    for c in range(3):
        channel = Image.fromarray(np.ascontiguousarray(img255[..., c]))  # float32 -> PIL mode 'F'
        chans.append(np.asarray(channel.resize((_SIZE, _SIZE), Image.BICUBIC)))
    x = np.stack(chans, axis=-1).clip(0, 255).astype(np.float32)
    return torch.from_numpy((x - 128) / 128).permute(2, 0, 1)[None]


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow-style 3x3 average pool: padded zeros do not count."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(tv_inception.InceptionA):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_no_pad(x))], 1)


class _FIDInceptionC(tv_inception.InceptionC):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_no_pad(x))], 1)


class _FIDInceptionE(tv_inception.InceptionE):
    """InceptionE; ``max_pool=True`` is the last block (7c), which max-pools in the FID graph."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_no_pad(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInception(tv_inception.Inception3):
    """The FID Inception graph; state-dict keys equal those of the pytorch-fid weights file."""

    def __init__(self) -> None:
        super().__init__(num_classes=1008, aux_logits=False, init_weights=False)
        self.Mixed_5b = _FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = _FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = _FIDInceptionA(288, pool_features=64)
        self.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7b = _FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = _FIDInceptionE(2048, max_pool=True)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 299, 299) in [-1, 1] -> (N, 2048) final average-pool features."""
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for name in _MIXED:
            x = getattr(self, f"Mixed_{name}")(x)
        return self.avgpool(x).flatten(1)


def _build(state: Mapping[str, torch.Tensor], device: torch.device) -> FIDInception:
    with torch.device("meta"):  # architecture only; every tensor comes from ``state``
        net = FIDInception()
    net.to_empty(device=device)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"not a pytorch-fid Inception state dict ({FID_WEIGHTS.name}): {err}") from err
    return net.eval().requires_grad_(False)


def random_fid_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random state for :class:`FIDInception` (He-normal convs, identity batch norms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in FIDInception().state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for key, (shape, dtype) in shapes.items():
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key == "fc.weight":
            state[key] = torch.randn(shape, generator=gen) * 0.01
        elif key.endswith(("bn.weight", "running_var")):
            state[key] = torch.ones(shape, dtype=dtype)
        else:  # bn.bias, running_mean, num_batches_tracked, fc.bias
            state[key] = torch.zeros(shape, dtype=dtype)
    return state


def load_fid_state(weights: PathLike | Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor]:
    """The Inception state from a state dict, a file, a folder or the hub cache (``None``); a missing file
    raises :class:`~samdiffsr.evaluation.weights_files.MissingWeightsError` naming it."""
    if isinstance(weights, Mapping):
        return weights
    files, dirs = candidate_files(weights)
    return load_state(find_named(FID_WEIGHTS, files, dirs))


class FIDFeatures:
    """Extract FID features. ``weights``: ``None`` (hub cache), a folder, a file, or a state dict.

    ``features(images)`` takes a float tensor (N, 3, H, W) in [0, 1], or a sequence of uint8 HxWx3 RGB
    arrays (sizes may differ; each is divided by 255), and returns a float64 array (N, 2048).
    ``mode``: ``"legacy_pytorch"`` (pytorch-fid) or ``"clean"`` (pyiqa / clean-fid, the paper's FID).
    """

    def __init__(
        self,
        weights: PathLike | Mapping[str, torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        mode: str = "legacy_pytorch",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.mode = mode
        self.net = _build(load_fid_state(weights), self.device)

    @classmethod
    def random_init(
        cls, seed: int = 0, device: str | torch.device = "cpu", mode: str = "legacy_pytorch"
    ) -> FIDFeatures:
        """The same network with seeded random weights (tests; no files needed)."""
        return cls(weights=random_fid_state(seed), device=device, mode=mode)

    def _inputs(self, images: torch.Tensor | Sequence[np.ndarray]) -> list[torch.Tensor]:
        """One (1, 3, 299, 299) network input in [-1, 1] per image."""
        if torch.is_tensor(images):
            if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
                got = f"{images.dtype} {tuple(images.shape)}"
                raise ValueError(f"expected a float (N, 3, H, W) tensor, got {got}")
            unit = [images[i : i + 1].detach().float().cpu() for i in range(images.shape[0])]
            if self.mode == "clean":
                return [_clean_input(u[0].permute(1, 2, 0).numpy() * np.float32(255.0)) for u in unit]
            return [2 * _resize(u) - 1 for u in unit]
        for img in images:
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise TypeError(f"expected uint8 HxWx3 RGB arrays, got {img.dtype} {img.shape}")
        if self.mode == "clean":
            return [_clean_input(img.astype(np.float32)) for img in images]
        return [2 * _resize(_unit_tensor(img)) - 1 for img in images]

    def __call__(self, images: torch.Tensor | Sequence[np.ndarray]) -> np.ndarray:
        singles = self._inputs(images)
        feats = []
        with torch.inference_mode():
            for start in range(0, len(singles), self.batch_size):
                batch = torch.cat(singles[start : start + self.batch_size]).to(self.device)
                feats.append(self.net.pool3(batch).double().cpu().numpy())
        return np.concatenate(feats) if feats else np.zeros((0, FEATURE_DIM))

    def export_weights(self, directory: PathLike) -> Path:
        """Write the weights as the upstream file (pytorch-fid key layout) in ``directory``."""
        path = Path(directory) / FID_WEIGHTS.name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, path)
        return path


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ``np.cov``) covariance of (N, D) features; N >= 2."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), with pytorch-fid's fallbacks.

    If ``sqrtm`` is not finite, ``eps`` is added to both diagonals; a complex result whose diagonal
    has an imaginary part above 1e-3 is an error, smaller ones are dropped.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two sets' statistics have different dimensions")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.max(np.abs(np.diagonal(covmean).imag))
        if imag > 1e-3:
            raise ValueError(f"sqrtm produced a significant imaginary component {imag}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FID between two feature sets (N_a, D) and (N_b, D), e.g. from :class:`FIDFeatures`."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))
