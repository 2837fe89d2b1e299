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
import logging
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

from samdiffsr.cli import UserError
from samdiffsr.io import atomic_torch_save, atomic_write, atomic_write_text, short_reason, torch_load, writing

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step(\d{8,})$")
COMPLETE = "complete.json"
LATEST = "latest"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that was asked for (or is expected) is missing, incomplete or unreadable (one line, exit 2)."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


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
    tag = latest.read_text(errors="replace").strip()
    if step_of(tag) is None:
        raise CheckpointError(f"{latest} is garbled (it holds {tag[:40]!r}, not a checkpoint name)")
    if _complete(ckpt_dir / tag) is None:
        raise CheckpointError(f"{latest} names '{tag}', but {ckpt_dir / tag} is missing or incomplete (no {COMPLETE})")
    return ResumePoint(ckpt_dir, tag)


def complete_points(ckpt_dir: Path) -> list[ResumePoint]:
    """The complete checkpoints of ``ckpt_dir`` (``complete.json`` readable), newest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return [ResumePoint(ckpt_dir, t) for t in sorted(tags, key=step_of, reverse=True)
            if _complete(ckpt_dir / t) is not None]


def _newest_first(ckpt_dir: Path) -> list[ResumePoint]:
    """What to try, newest complete checkpoint first; what is skipped on the way is logged with the reason.

    ``latest`` normally names the newest complete checkpoint. When it is garbage or names a checkpoint that
    is missing or incomplete, that is said, and the older complete checkpoints are still tried. A complete
    checkpoint newer than ``latest`` (a job killed between ``complete.json`` and ``latest``) is whole: it
    comes first. Folders without ``complete.json`` (interrupted saves) are never tried.
    """
    points = complete_points(ckpt_dir)
    try:
        read_latest(ckpt_dir)
    except CheckpointError as exc:
        log.warning("%s; %s", exc, f"trying {points[0].load_dir / points[0].tag} instead" if points
                    else "and no other checkpoint is complete")
    if not points and (ckpt_dir / LATEST).is_file():
        found = sorted(p.name for p in ckpt_dir.iterdir() if p.name != LATEST)
        raise CheckpointError(f"{ckpt_dir} holds checkpoints ({', '.join(found) or 'none left'}) but none is "
                              f"complete (no {COMPLETE}); not starting from scratch over them: remove "
                              f"{ckpt_dir} to start over, or give train.resume a checkpoint path")
    return points


def resolve_resume(setting: str, ckpt_dir: Path) -> list[ResumePoint]:
    """The checkpoints to try, in order, per ``train.resume``; empty for a fresh start.

    ``auto``: the run folder's complete checkpoints, newest first (the engine takes the first one that
    loads and says which it skipped and why), else a fresh start. ``must``: the same, an error when there
    is none. ``never``: a fresh start; an error if the run folder already holds checkpoints (a second run
    would interleave with them). Anything else is a path: a tag folder (``.../checkpoints/step00001000``),
    or a checkpoints folder (its complete checkpoints, newest first), possibly of another run.
    """
    if setting == "never":
        if complete_points(ckpt_dir) or (ckpt_dir / LATEST).is_file():
            raise CheckpointError(f"train.resume=never but {ckpt_dir} already holds checkpoints; use another "
                                  "train.run_dir, remove them, or resume (train.resume=auto)")
        return []
    if setting in ("auto", "must"):
        points = _newest_first(ckpt_dir)
        if not points and setting == "must":
            raise CheckpointError(f"train.resume=must but there is no checkpoint in {ckpt_dir}")
        return points
    path = Path(setting)
    if (path / COMPLETE).is_file():
        return [ResumePoint(path.parent, path.name)]
    if path.is_dir():
        points = _newest_first(path)
        if points:
            return points
    raise CheckpointError(f"train.resume={setting!r}: not a complete checkpoint folder nor a checkpoints "
                          f"folder holding one")


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
        raise CheckpointError(f"cannot load checkpoint {tag_dir}: {type(exc).__name__}: {short_reason(exc)}") from exc
    if load_path is None or client is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint to load in {tag_dir}")
    rng = None
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if meta.get("world_size") == world_size:
        if not rng_file.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} lacks {rng_file.name}")
        rng = torch_load(rng_file, CheckpointError, "RNG state file")
    return client, rng


def load_newest(engine: Any, points: list[ResumePoint], rank: int, world_size: int,
                gather: Callable[[str | None], list[str | None]]) -> tuple[ResumePoint, dict[str, Any], dict | None]:
    """Load the first of ``points`` that every rank can load; returns (point, client state, RNG state).

    Collective: ``gather(error or None)`` returns every rank's outcome, so all ranks move on together.
    Each skipped checkpoint is logged with the reason; when none loads, the error names them all.
    """
    failures = []
    for point in points:
        try:
            client, rng = load(engine, point, rank, world_size)
            error = None
        except CheckpointError as exc:
            error = str(exc)
        errors = [e for e in gather(error) if e is not None]
        if not errors:
            return point, client, rng
        failures.append(errors[0])
        if rank == 0:
            log.warning("not resuming from it: %s", errors[0])
    raise CheckpointError(f"no checkpoint could be loaded ({'; '.join(failures)}); not starting from scratch "
                          "over them: remove them to start over")


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
        try:
            # exclude_frozen_parameters=False: the frozen RRDB travels with the checkpoint, so a resume needs
            # neither train.rrdb_ckpt nor the exact same file.
            with writing(tag_dir):  # torch's writer hides a full disk behind "unexpected pos"
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
        except BaseException:
            if self.rank == 0 and _complete(tag_dir) is None:  # never resumed from: give its space back
                shutil.rmtree(tag_dir, ignore_errors=True)
                (self.weights_dir / f"{tag}.pt").unlink(missing_ok=True)
            raise
        return tag_dir

    def _link_latest_weights(self, weights: Path) -> None:
        def link_or_copy(tmp: Path) -> None:
            tmp.unlink(missing_ok=True)
            try:
                os.link(weights, tmp)  # same bytes, no copy; survives pruning of the step file
            except OSError:
                shutil.copyfile(weights, tmp)

        atomic_write(self.weights_dir / "latest.pt", link_or_copy)

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
