"""Finding the local weight files of the LPIPS / FID networks (nothing is ever downloaded).

Where a metric looks, in order: the path(s) the user gave (``--lpips-weights`` / ``--fid-weights``: a
file, several files, or a folder), else the torch hub cache, ``$TORCH_HOME/hub/checkpoints`` (default
``~/.cache/torch/hub/checkpoints``), which is where torchvision and pytorch-fid put these files when
they download them. A file that is not there raises :class:`MissingWeightsError`, whose message names
the file, where to put it and where to fetch it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

PathLike = str | Path


class MissingWeightsError(FileNotFoundError):
    """A network weight file needed by a metric (LPIPS, FID) is not on this machine."""


@dataclass(frozen=True)
class WeightsFile:
    """One upstream weight file: its canonical name, where to get it, the CLI flag that points to it."""

    name: str
    url: str
    flag: str
    what: str


def hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints``: torch's download cache, read at call time."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def missing(spec: WeightsFile, looked_in: Sequence[Path]) -> MissingWeightsError:
    """The error for a file that is nowhere it was looked for."""
    places = ", ".join(str(p) for p in looked_in) or "(nowhere)"
    return MissingWeightsError(
        f"{spec.what} weights file '{spec.name}' not found (looked in: {places}). "
        f"Fetch it from {spec.url} and either pass it with {spec.flag} PATH, or put it in the torch "
        f"hub cache as {hub_checkpoint_dir() / spec.name} (set TORCH_HOME to move that cache); "
        f"or leave this metric out with --metrics."
    )


def candidate_files(weights: PathLike | Sequence[PathLike] | None) -> tuple[list[Path], list[Path]]:
    """Expand the user's ``weights`` argument into (existing files, folders searched).

    ``None`` means the hub cache folder. A folder stands for the files inside it (not recursive). A
    path that does not exist raises :class:`MissingWeightsError` naming that path.
    """
    if weights is None:
        given: list[Path] = [hub_checkpoint_dir()]
        optional_dirs = True
    else:
        given = [Path(weights)] if isinstance(weights, (str, Path)) else [Path(w) for w in weights]
        optional_dirs = False
    files: list[Path] = []
    dirs: list[Path] = []
    for path in given:
        if path.is_dir():
            dirs.append(path)
            files.extend(sorted(p for p in path.iterdir() if p.is_file()))
        elif path.is_file():
            files.append(path)
        elif optional_dirs:
            dirs.append(path)
        else:
            raise MissingWeightsError(f"weights path '{path}' does not exist")
    return files, dirs


def find_named(spec: WeightsFile, files: Sequence[Path], dirs: Sequence[Path]) -> Path:
    """The file called ``spec.name`` among ``files``; the only file if exactly one was given by name."""
    for f in files:
        if f.name == spec.name:
            return f
    if not dirs and len(files) == 1:
        return files[0]
    raise missing(spec, list(dirs) or list(files))


def load_state(path: Path) -> Mapping[str, torch.Tensor]:
    """A plain tensor state dict from a ``.pth`` file (``weights_only``: no code is unpickled)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state
