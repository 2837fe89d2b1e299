"""LPIPS (AlexNet, v0.1) from local weight files, equal to ``lpips.LPIPS(net='alex')``.

Weights: ``alexnet-owt-7be5be79.pth`` (torchvision's AlexNet) and ``alex.pth`` (the LPIPS v0.1 heads, from
the ``lpips`` pip package), or pyiqa's single ``LPIPS_v0.1_alex-df73285e.pth``; passed files are recognised
by their keys, not their names (:mod:`samdiffsr.evaluation.weights_files` says where they are looked for).
The network and its scaling layer: docs/evaluation.md, "Metric definitions".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from samdiffsr.evaluation.weights_files import (
    PathLike,
    WeightsFile,
    candidate_files,
    load_state,
    missing,
)

ALEXNET_WEIGHTS = WeightsFile(
    name="alexnet-owt-7be5be79.pth",
    url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    flag="--lpips-weights",
    what="LPIPS backbone (torchvision AlexNet)",
)
LPIPS_HEADS_WEIGHTS = WeightsFile(
    name="alex.pth",
    url="https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth "
    "(also inside the 'lpips' pip package: lpips/weights/v0.1/alex.pth)",
    flag="--lpips-weights",
    what="LPIPS v0.1 linear heads",
)
PYIQA_LPIPS_NAME = "LPIPS_v0.1_alex-df73285e.pth"

CHANNELS = (64, 192, 384, 256, 256)
_TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs in alexnet().features
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-10

_BACKBONE_KEY = re.compile(r"^(?:features|net\.slice\d)\.(\d+)\.(weight|bias)$")
_HEAD_KEY = re.compile(r"^lins?\.?(\d)\.model\.\d\.weight$")


class _Head(nn.Module):
    """LPIPS ``NetLinLayer``: dropout (inactive in eval) + 1x1 conv to one channel, no bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class AlexLPIPSNet(nn.Module):
    """The LPIPS-alex network; ``forward(a, b)`` takes (N, 3, H, W) tensors in [-1, 1], returns (N,)."""

    def __init__(self, state: Mapping[str, torch.Tensor], device: str | torch.device = "cpu") -> None:
        super().__init__()
        with torch.device("meta"):  # architecture only: skips torchvision's costly random init
            self.features = torchvision.models.alexnet().features[: _TAPS[-1] + 1]
            for k, c in enumerate(CHANNELS):
                self.add_module(f"lin{k}", _Head(c))
        self.to_empty(device=device)
        self.load_state_dict(state, strict=True)
        self.register_buffer("shift", torch.tensor(_SHIFT, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE, device=device).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised AlexNet activations after each tapped ReLU."""
        out = []
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h / (torch.sqrt(torch.sum(h * h, dim=1, keepdim=True)) + _EPS))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for k, (fa, fb) in enumerate(zip(self.taps(a), self.taps(b), strict=True)):
            head = getattr(self, f"lin{k}").model
            total = total + head((fa - fb) ** 2).mean(dim=(1, 2, 3))
        return total


def canonical_lpips_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision / lpips / pyiqa keys to ``features.{i}.*`` and ``lin{k}.model.1.weight``."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := _BACKBONE_KEY.match(key):
            out[f"features.{m.group(1)}.{m.group(2)}"] = value
        elif m := _HEAD_KEY.match(key):
            out[f"lin{m.group(1)}.model.1.weight"] = value
    return out


def _expected_keys() -> tuple[set[str], set[str]]:
    conv = (0, 3, 6, 8, 10)
    backbone = {f"features.{i}.{p}" for i in conv for p in ("weight", "bias")}
    heads = {f"lin{k}.model.1.weight" for k in range(len(CHANNELS))}
    return backbone, heads


def load_lpips_state(
    weights: PathLike | Sequence[PathLike] | Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """Collect the LPIPS-alex state from a state dict, file(s), a folder, or the hub cache (``None``).

    Raises :class:`MissingWeightsError` naming whichever of the two files is missing.
    """
    if isinstance(weights, Mapping):
        state = canonical_lpips_state(weights)
        looked: list[Path] = []
    else:
        files, dirs = candidate_files(weights)
        if dirs:  # searching folders: only the known file names, never every file in a cache
            known = {ALEXNET_WEIGHTS.name, LPIPS_HEADS_WEIGHTS.name, PYIQA_LPIPS_NAME}
            files = [f for f in files if f.name in known]
        state = {}
        for f in files:
            state.update(canonical_lpips_state(load_state(f)))
        looked = list(dirs) or list(files)
    backbone, heads = _expected_keys()
    if not backbone <= state.keys():
        raise missing(ALEXNET_WEIGHTS, looked)
    if not heads <= state.keys():
        raise missing(LPIPS_HEADS_WEIGHTS, looked)
    return {k: state[k] for k in sorted(backbone | heads)}


def random_lpips_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded random LPIPS-alex state (He-normal convs, non-negative heads as trained LPIPS has)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        feats = torchvision.models.alexnet().features
    state: dict[str, torch.Tensor] = {}
    for i in (0, 3, 6, 8, 10):
        conv = feats[i]
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        state[f"features.{i}.weight"] = torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        state[f"features.{i}.bias"] = torch.randn(conv.out_channels, generator=gen) * 0.01
    for k, c in enumerate(CHANNELS):
        state[f"lin{k}.model.1.weight"] = torch.rand((1, c, 1, 1), generator=gen) / c
    return state


def _as_input(x: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise TypeError(f"numpy inputs must be uint8 HxWx3 or NxHxWx3 RGB, got {x.dtype}")
        t = torch.from_numpy(np.array(x, copy=True)).float() / 127.5 - 1.0
        t = (t[None] if t.ndim == 3 else t).permute(0, 3, 1, 2)
    elif torch.is_tensor(x):
        if not x.is_floating_point():
            raise TypeError(f"tensor inputs must be float in [-1, 1], got {x.dtype}")
        t = x[None] if x.ndim == 3 else x
    else:
        raise TypeError(f"expected a torch.Tensor or numpy array, got {type(x).__name__}")
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"expected RGB images, got shape {tuple(x.shape)}")
    return t.to(device=device, dtype=torch.float32)


class LPIPS:
    """LPIPS (alex, v0.1) distance; lower is more similar, 0 for identical images.

    ``weights``: ``None`` (torch hub cache), a folder, a file, several files, or a state dict.
    ``lpips(sr, hr)`` takes float tensors in [-1, 1], (3, H, W) or (N, 3, H, W), or uint8 numpy RGB
    arrays, (H, W, 3) or (N, H, W, 3) (mapped by x / 127.5 - 1), and returns a float32 CPU tensor of
    shape (N,). Use ``float(lpips(sr, hr))`` for one image.
    """

    def __init__(
        self,
        weights: PathLike | Sequence[PathLike] | Mapping[str, torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.net = AlexLPIPSNet(load_lpips_state(weights), self.device)

    @classmethod
    def random_init(cls, seed: int = 0, device: str | torch.device = "cpu") -> LPIPS:
        """The same network with seeded random weights (tests; no files needed)."""
        return cls(weights=random_lpips_state(seed), device=device)

    def __call__(self, sr: torch.Tensor | np.ndarray, hr: torch.Tensor | np.ndarray) -> torch.Tensor:
        a, b = _as_input(sr, self.device), _as_input(hr, self.device)
        if a.shape != b.shape:
            raise ValueError(f"sr and hr shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        with torch.inference_mode():
            return self.net(a, b).cpu()

    def export_weights(self, directory: PathLike) -> list[Path]:
        """Write the weights as the two upstream files (torchvision / lpips key layout) in ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        backbone = {k: v for k, v in state.items() if k.startswith("features.")}
        heads = {k: v for k, v in state.items() if k.startswith("lin")}
        paths = [out / ALEXNET_WEIGHTS.name, out / LPIPS_HEADS_WEIGHTS.name]
        torch.save(backbone, paths[0])
        torch.save(heads, paths[1])
        return paths
