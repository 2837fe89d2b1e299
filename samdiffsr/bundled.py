"""Files shipped with the package: the config files of ``configs/``.

A wheel carries them as package data (``samdiffsr/configs/*.yaml``, see setup.py); a source checkout or an
editable install reads the repository's ``configs/`` folder. :func:`config_path` finds a config in either,
so the demo and the ``authors_*`` configs work however samdiffsr was installed.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path


def config_dirs() -> list[Path]:
    """Where shipped configs live: the installed package's ``configs/``, then the source tree's."""
    here = Path(str(files("samdiffsr")))
    return [d for d in (here / "configs", here.parent / "configs") if d.is_dir()]


def bundled_configs() -> list[str]:
    """The names of the shipped config files."""
    return sorted({p.name for d in config_dirs() for p in d.glob("*.yaml")})


def shipped_config(name: str) -> Path:
    """The shipped config of file name ``name`` (``.yaml`` optional); FileNotFoundError if there is none."""
    stem = Path(name).name
    stem = stem if stem.endswith((".yaml", ".yml")) else stem + ".yaml"
    for folder in config_dirs():
        if (folder / stem).is_file():
            return folder / stem
    looked = ", ".join(str(d) for d in config_dirs()) or "no configs folder installed"
    raise FileNotFoundError(f"no shipped config {stem} (looked in {looked})")


def config_path(name: str | os.PathLike) -> Path:
    """``name`` if it is a file; else the shipped config of that file name (``.yaml`` optional), e.g.
    ``configs/authors_samdiffsr_df2k4x.yaml`` from outside the repository, or ``authors_samdiffsr_df2k4x``.

    A name that is neither is returned unchanged, so that the config loader reports it as not found.
    """
    path = Path(name)
    if path.is_file():
        return path
    try:
        return shipped_config(path.name)
    except FileNotFoundError:
        return path
