"""The oldest DeepSpeed and torch the training code works with, checked at training start.

Each floor is the first release with a feature the code uses (found in the projects' histories, not guessed):

- deepspeed 0.18.0: ``engine.torch_autocast_z0_gradscaler``, the fp16 GradScaler of ZeRO 0 under
  ``torch_autocast`` (deepspeedai/DeepSpeed#7619, first tagged in v0.18.0). ``torch_autocast`` with ZeRO 1/2
  and ``optimizer.torch_autocast_gradscaler`` came in 0.17.2 (#6993), ``engine.was_step_applied`` long before.
- torch 2.4: the fused Adam kernel on CPU, which the non-finite skip hands ``found_inf`` to (pytorch/pytorch
  #123074; on CUDA it is older); ``torch.amp.GradScaler(device)``, which DeepSpeed builds, came in 2.3.

An older install would fail later with an AttributeError or a "fused=True requires CUDA" error; this says so
in one line first. ``setup.py`` asks for the same floors.
"""

from __future__ import annotations

import re

from samdiffsr.cli import UserError

FLOORS: dict[str, tuple[str, str]] = {
    "deepspeed": ("0.18.0", "engine.torch_autocast_z0_gradscaler, the ZeRO-0 fp16 GradScaler of torch_autocast"),
    "torch": ("2.4", "torch.optim.Adam(fused=True) on CPU, with found_inf"),
}


class VersionError(UserError, RuntimeError):
    """An installed package is older than what samdiffsr needs: one line naming the version needed."""


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: '2.14.1+cu128' -> (2, 14, 1); '0.19.0rc1' -> (0, 19, 0)."""
    parts = []
    for part in version.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.group() != part:  # '0rc1', '1a0': a pre-release of that number ends the release
            break
    return tuple(parts)


def check_version(name: str, installed: str) -> None:
    """Raise :class:`VersionError` when ``installed`` is older than the floor of ``name``."""
    floor, reason = FLOORS[name]
    have, need = release(installed), release(floor)
    width = max(len(have), len(need))
    if have + (0,) * (width - len(have)) < need + (0,) * (width - len(need)):
        raise VersionError(f"{name} {installed} is installed; samdiffsr needs {name}>={floor} ({reason})")


def check_versions() -> None:
    """Check the installed DeepSpeed and torch against their floors."""
    import deepspeed
    import torch

    check_version("torch", torch.__version__)
    check_version("deepspeed", deepspeed.__version__)
