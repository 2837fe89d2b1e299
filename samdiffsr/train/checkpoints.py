"""Training checkpoints: layout, the `latest` commit, retention, resume resolution and RNG state.

Layout of a run folder::

    run_dir/checkpoints/latest                  the tag of the newest COMPLETE checkpoint (atomic rename)
    run_dir/checkpoints/step00001000/           DeepSpeed's files (model, optimizer, scheduler, client state)
        rng_rank0.pt, rng_rank1.pt, ...          per-rank RNG states (DeepSpeed keeps client state of rank 0 only)
        complete.json                            written last, by rank 0: step, world size, config
    run_dir/weights/step00001000.pt              plain weights (model + EMA, no optimizer) via save_weights
    run_dir/weights/latest.pt                    hard link (or copy) of the newest weights file

A checkpoint becomes visible only once every rank has written its part: DeepSpeed's ``save_checkpoint``
ends with a barrier, the per-rank files are followed by another barrier, and only then rank 0 writes the
weights file, ``complete.json`` and finally ``latest``. A job killed in between leaves a folder without
``complete.json`` that nothing resumes from; the next save of the same step replaces it.

This module does not import DeepSpeed or torch.distributed: the engine passes its DeepSpeed engine (whose
``save_checkpoint`` / ``load_checkpoint`` it calls) and a ``barrier`` callable.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

TAG_RE = re.compile(r"^step(\d{8,})$")
COMPLETE = "complete.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for (or is expected) is missing, incomplete or unreadable."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# --- RNG state -------------------------------------------------------------------------------------
def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Every random state a rank's training depends on, as tensors and plain containers (weights_only)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "generator_device": str(generator.device),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if str(generator.device) != state["generator_device"]:
        raise CheckpointError(f"the diffusion RNG was saved on {state['generator_device']} and cannot be "
                              f"restored on {generator.device}")
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- resume ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResumePoint:
    load_dir: Path  # the folder holding the tag folders (what DeepSpeed calls save_dir / load_dir)
    tag: str


def _complete(tag_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((tag_dir / COMPLETE).read_text())
    except (OSError, ValueError):
        return None


def read_latest(ckpt_dir: Path) -> ResumePoint | None:
    """The committed latest checkpoint of ``ckpt_dir``; None when nothing was committed yet."""
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag or _complete(ckpt_dir / tag) is None:
        raise CheckpointError(f"{latest} names '{tag}', but {ckpt_dir / tag} is missing or incomplete "
                              f"(no {COMPLETE}); fix or remove {latest} to start over")
    return ResumePoint(ckpt_dir, tag)


def resolve_resume(setting: str, ckpt_dir: Path) -> ResumePoint | None:
    """Where to resume from, per ``train.resume``.

    ``auto``: the run folder's latest checkpoint if there is one, else a fresh start. ``must``: the latest,
    an error when there is none. ``never``: a fresh start; an error if the run folder already holds
    checkpoints (a second run would interleave with them). Anything else is a path: a tag folder
    (``.../checkpoints/step00001000``) or a checkpoints folder (its ``latest``), possibly of another run.
    """
    if setting == "never":
        if read_latest(ckpt_dir) is not None:
            raise CheckpointError(f"train.resume=never but {ckpt_dir} already holds checkpoints; use another "
                                  "train.run_dir, remove them, or resume (train.resume=auto)")
        return None
    if setting in ("auto", "must"):
        point = read_latest(ckpt_dir)
        if point is None and setting == "must":
            raise CheckpointError(f"train.resume=must but there is no checkpoint in {ckpt_dir}")
        return point
    path = Path(setting)
    if (path / COMPLETE).is_file():
        return ResumePoint(path.parent, path.name)
    if path.is_dir():
        point = read_latest(path)
        if point is not None:
            return point
    raise CheckpointError(f"train.resume={setting!r}: not a complete checkpoint folder nor a checkpoints "
                          f"folder with a '{LATEST}' file")


def saved_config(point: ResumePoint) -> dict[str, Any]:
    """The config a checkpoint was written with (kept in ``complete.json``, readable without DeepSpeed)."""
    meta = _complete(point.load_dir / point.tag)
    if meta is None or "config" not in meta:
        raise CheckpointError(f"checkpoint {point.load_dir / point.tag} is missing or incomplete (no {COMPLETE})")
    return meta["config"]


def load(engine: Any, point: ResumePoint, rank: int, world_size: int) -> tuple[dict[str, Any], dict | None]:
    """Load a checkpoint into the DeepSpeed ``engine``; returns (client state, this rank's RNG state or None).

    DeepSpeed returns ``(None, None)`` instead of raising when it finds nothing to load: that is an error
    here, since loading was asked for.
    """
    tag_dir = point.load_dir / point.tag
    meta = _complete(tag_dir)
    if meta is None:
        raise CheckpointError(f"checkpoint {tag_dir} is missing or incomplete (no {COMPLETE})")
    try:
        load_path, client = engine.load_checkpoint(str(point.load_dir), tag=point.tag, load_module_strict=True,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
    except Exception as exc:  # DeepSpeed raises many types for truncated or mismatched files
        raise CheckpointError(f"cannot load checkpoint {tag_dir}: {type(exc).__name__}: {exc}") from exc
    if load_path is None or client is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint to load in {tag_dir}")
    rng = None
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if meta.get("world_size") == world_size:
        if not rng_file.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} lacks {rng_file.name}")
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
    return client, rng


# --- save and retention ----------------------------------------------------------------------------
class Checkpoints:
    """Saves checkpoints of one run folder and prunes old ones (keep the last K plus every M-th step)."""

    def __init__(self, run_dir: str | Path, keep_last: int, keep_every: int, rank: int) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.weights_dir = Path(run_dir) / "weights"
        self.keep_last, self.keep_every, self.rank = max(keep_last, 1), keep_every, rank

    def save(self, engine: Any, step: int, client_state: dict[str, Any], rng_state: dict[str, Any],
             write_weights: Callable[[Path], None], barrier: Callable[[], None], world_size: int) -> Path:
        """Collective: every rank calls it. Returns the tag folder once the checkpoint is committed.

        ``client_state`` goes into DeepSpeed's files (rank 0's copy); its ``config`` also into
        ``complete.json``, so a resume can check compatibility before DeepSpeed loads anything.
        """
        tag = tag_for(step)
        tag_dir = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tag_dir, ignore_errors=True)  # leftovers of an attempt killed mid-write
            tag_dir.mkdir()
        barrier()
        # exclude_frozen_parameters=False: the frozen RRDB travels with the checkpoint, so a resume needs
        # neither train.rrdb_ckpt nor the exact same file.
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        atomic_torch_save(rng_state, tag_dir / f"rng_rank{self.rank}.pt")
        barrier()  # every rank's files are on disk before rank 0 commits
        if self.rank == 0:
            weights = self.weights_dir / f"{tag}.pt"
            write_weights(weights)
            self._link_latest_weights(weights)
            meta = {"step": step, "tag": tag, "world_size": world_size, "time": time.time(),
                    "config": client_state.get("config")}
            atomic_write_text(tag_dir / COMPLETE, json.dumps(meta))
            atomic_write_text(self.dir / LATEST, tag)
            self.prune(step)
        return tag_dir

    def _link_latest_weights(self, weights: Path) -> None:
        latest = self.weights_dir / "latest.pt"
        tmp = latest.with_name(f".latest.pt.tmp{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(weights, tmp)  # same bytes, no copy; survives pruning of the step file
        except OSError:
            shutil.copyfile(weights, tmp)
        os.replace(tmp, latest)

    def kept_steps(self, steps: list[int], newest: int) -> set[int]:
        done = sorted(s for s in steps if s <= newest)
        keep = set(done[-self.keep_last:])
        if self.keep_every > 0:
            keep |= {s for s in done if s % self.keep_every == 0}
        keep |= {s for s in steps if s > newest}  # never touch what is newer than the commit
        return keep

    def prune(self, newest: int) -> None:
        """Delete checkpoints (and their weights files) outside the retention policy."""
        tags = {step_of(p.name): p for p in self.dir.iterdir() if p.is_dir() and step_of(p.name) is not None}
        keep = self.kept_steps(list(tags), newest)
        for step, path in tags.items():
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)
                (self.weights_dir / f"{tag_for(step)}.pt").unlink(missing_ok=True)
