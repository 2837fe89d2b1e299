"""Training checkpoints: layout, the `latest` commit, retention, rollbacks and resume resolution.

Layout of a run folder::

    run_dir/checkpoints/latest                  the tag of the run's checkpoint to resume from (atomic rename)
    run_dir/checkpoints/step00001000/           DeepSpeed's files (model, optimizer, client state)
        optimizer_full.pt                        Adam's state per parameter name (any world size / ZeRO stage)
        rng_rank0.pt, rng_rank1.pt, ...          per-rank RNG states (DeepSpeed keeps client state of rank 0 only)
        complete.json                            written last, by rank 0: step, world size, ZeRO stage, config
    run_dir/checkpoints/abandoned-step00000800-<time>/   newer checkpoints set aside by a rollback
    run_dir/weights/step00001000.pt              plain weights (model + EMA, no optimizer) via save_weights
    run_dir/weights/latest.pt                    hard link (or copy) of the newest weights file

A checkpoint becomes visible only once every rank has written its part: DeepSpeed's ``save_checkpoint``
ends with a barrier, the per-rank files are followed by another barrier, and only then rank 0 writes the
weights file, ``complete.json`` and finally ``latest``. A job killed in between leaves a folder without
``complete.json`` that nothing resumes from; the next save of the same step replaces it.

``latest`` is the truth: auto-resume follows it (older complete checkpoints only when it is damaged), and
retention counts back from it. A rollback (``train.resume`` naming an older checkpoint of the same run
folder) moves the newer ones aside (:meth:`Checkpoints.abandon_newer`).

This module does not import DeepSpeed or torch.distributed: the engine passes its DeepSpeed engine (whose
``save_checkpoint`` / ``load_checkpoint`` it calls) and a ``barrier`` callable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _latest_first(ckpt_dir: Path) -> list[ResumePoint]:
    """What to try: the checkpoint ``latest`` names, then the older complete ones (newest first) as fallbacks.

    ``latest`` is the truth: a complete checkpoint newer than it is not on the run's committed branch (a
    save killed between its ``complete.json`` and ``latest``, whose step the run redoes and overwrites) and
    is never resumed from. Only when ``latest`` is missing, garbled or names a missing or incomplete
    checkpoint, that is said (one warning naming why) and the complete checkpoints older than the step it
    names (all of them, when it names none) are tried. Folders without ``complete.json`` are never tried.
    """
    points = complete_points(ckpt_dir)
    try:
        latest = read_latest(ckpt_dir)
    except CheckpointError as exc:
        named = step_of((ckpt_dir / LATEST).read_text(errors="replace").strip())
        fallback = [p for p in points if named is None or step_of(p.tag) < named]
        log.warning("%s; %s", exc, f"trying {fallback[0].load_dir / fallback[0].tag} instead" if fallback
                    else "and no older checkpoint is complete")
        if not fallback:
            found = sorted(p.name for p in ckpt_dir.iterdir() if p.name != LATEST)
            raise CheckpointError(f"{ckpt_dir} holds checkpoints ({', '.join(found) or 'none left'}) but none "
                                  f"{'is' if not points else 'older than the one latest names is'} complete "
                                  f"(no {COMPLETE}); not starting from scratch over them: remove {ckpt_dir} to "
                                  "start over, or give train.resume a checkpoint path") from None
        return fallback
    if latest is None:
        if points:
            log.warning("%s has no %s file; trying the newest complete checkpoint, %s", ckpt_dir, LATEST,
                        points[0].load_dir / points[0].tag)
        return points
    newer = [p.tag for p in points if step_of(p.tag) > step_of(latest.tag)]
    if newer:
        log.warning("%s names %s; not resuming from the newer %s: not committed by %s (a save interrupted "
                    "before its commit)", ckpt_dir / LATEST, latest.tag, ", ".join(newer), LATEST)
    return [latest, *(p for p in points if step_of(p.tag) < step_of(latest.tag))]


def resolve_resume(setting: str, ckpt_dir: Path) -> list[ResumePoint]:
    """The checkpoints to try, in order, per ``train.resume``; empty for a fresh start.

    ``auto``: the checkpoint ``latest`` names, then the older complete ones as fallbacks (the engine takes
    the first one that loads and says which it skipped and why), else a fresh start. ``must``: the same, an
    error when there is none. ``never``: a fresh start; an error if the run folder already holds checkpoints
    (a second run would interleave with them). Anything else is a path: a tag folder (``.../checkpoints/step00001000``),
    or a checkpoints folder (its complete checkpoints, newest first), possibly of another run.
    """
    if setting == "never":
        if complete_points(ckpt_dir) or (ckpt_dir / LATEST).is_file():
            raise CheckpointError(f"train.resume=never but {ckpt_dir} already holds checkpoints; use another "
                                  "train.run_dir, remove them, or resume (train.resume=auto)")
        return []
    if setting in ("auto", "must"):
        points = _latest_first(ckpt_dir)
        if not points and setting == "must":
            raise CheckpointError(f"train.resume=must but there is no checkpoint in {ckpt_dir}")
        return points
    path = Path(setting)
    if (path / COMPLETE).is_file():
        return [ResumePoint(path.parent, path.name)]
    if path.is_dir():
        points = _latest_first(path)
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


def checkpoint_meta(point: ResumePoint) -> dict[str, Any]:
    """``complete.json`` of a checkpoint: step, world size, ZeRO stage (when recorded), config."""
    meta = _complete(point.load_dir / point.tag)
    if meta is None:
        raise CheckpointError(f"checkpoint {point.load_dir / point.tag} is missing or incomplete (no {COMPLETE})")
    return meta


def load(engine: Any, point: ResumePoint, module_only: bool = False) -> dict[str, Any]:
    """Load a checkpoint into the DeepSpeed ``engine``; returns the client state.

    ``module_only``: the weights alone (under ZeRO 1/2 the fp32 master partitions are refreshed from them),
    for a resume on another number of ranks or ZeRO stage; the optimizer state then comes from
    ``optimizer_full.pt`` (train/optimizer_state.py). DeepSpeed returns ``(None, None)`` instead of raising
    when it finds nothing to load: that is an error here, since loading was asked for.
    """
    tag_dir = point.load_dir / point.tag
    checkpoint_meta(point)
    try:
        load_path, client = engine.load_checkpoint(str(point.load_dir), tag=point.tag, load_module_strict=True,
                                                   load_optimizer_states=not module_only,
                                                   load_lr_scheduler_states=not module_only,
                                                   load_module_only=module_only)
    except Exception as exc:  # DeepSpeed raises many types for truncated or mismatched files
        raise CheckpointError(f"cannot load checkpoint {tag_dir}: {type(exc).__name__}: {short_reason(exc)}") from exc
    if load_path is None or client is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint to load in {tag_dir}")
    return client


def load_rng(point: ResumePoint, rank: int, world_size: int) -> dict | None:
    """This rank's saved RNG state; None when the checkpoint was written on another number of ranks."""
    tag_dir = point.load_dir / point.tag
    if checkpoint_meta(point).get("world_size") != world_size:
        return None
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} lacks {rng_file.name}")
    return torch_load(rng_file, CheckpointError, "RNG state file")


def load_newest(points: list[ResumePoint], load_one: Callable[[ResumePoint], Any], rank: int,
                gather: Callable[[str | None], list[str | None]]) -> tuple[ResumePoint, Any]:
    """``load_one`` the first of ``points`` that every rank can load; returns (point, what it returned).

    Collective: ``gather(error or None)`` returns every rank's outcome, so all ranks move on together.
    Each skipped checkpoint is logged with the reason; when none loads, the error names them all.
    """
    failures = []
    for point in points:
        try:
            loaded = load_one(point)
            error = None
        except CheckpointError as exc:
            error = str(exc)
        errors = [e for e in gather(error) if e is not None]
        if not errors:
            return point, loaded
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
             write_weights: Callable[[Path], None], barrier: Callable[[], None], world_size: int,
             rank0_files: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the tag folder once the checkpoint is committed.

        ``client_state`` goes into DeepSpeed's files (rank 0's copy); its ``config`` also into
        ``complete.json``, so a resume can check compatibility before DeepSpeed loads anything.
        ``rank0_files`` (file name -> object) are written by rank 0 into the tag folder.
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
            for name, obj in rank0_files.items() if self.rank == 0 else ():
                atomic_torch_save(obj, tag_dir / name)
            barrier()  # every rank's files are on disk before rank 0 commits
            if self.rank == 0:
                weights = self.weights_dir / f"{tag}.pt"
                write_weights(weights)
                self._link_latest_weights(weights)
                meta = {"step": step, "tag": tag, "world_size": world_size,
                        "zero_stage": engine.zero_optimization_stage(), "time": time.time(),
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
        """The last K steps up to ``newest`` (the one ``latest`` names) plus every M-th. A step newer than
        ``latest`` is not on the committed branch (a save killed before its commit): it goes too."""
        done = sorted(s for s in steps if s <= newest)
        keep = set(done[-self.keep_last:])
        if self.keep_every > 0:
            keep |= {s for s in done if s % self.keep_every == 0}
        return keep

    def prune(self, newest: int) -> None:
        """Delete checkpoints (and their weights files) outside the retention policy (rank 0, after the
        commit of ``newest``)."""
        tags = {step_of(p.name): p for p in self.dir.iterdir() if p.is_dir() and step_of(p.name) is not None}
        keep = self.kept_steps(list(tags), newest)
        for step, path in tags.items():
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)
                (self.weights_dir / f"{tag_for(step)}.pt").unlink(missing_ok=True)

    def abandon_newer(self, point: ResumePoint) -> Path | None:
        """A rollback: ``point`` (of this run folder) becomes ``latest``; the newer checkpoints (and their
        weights files) move to ``checkpoints/abandoned-<tag>-<time>/``, out of reach of auto-resume and
        pruning. Rank 0 alone; returns the folder they went to, None when nothing was newer."""
        if Path(point.load_dir).resolve() != self.dir.resolve():
            return None
        resumed = step_of(point.tag)
        newer = sorted(p for p in self.dir.iterdir() if p.is_dir() and (step_of(p.name) or -1) > resumed)
        if not newer:
            return None
        aside = self.dir / f"abandoned-{point.tag}-{time.strftime('%Y%m%dT%H%M%S')}"
        (aside / "weights").mkdir(parents=True)
        for path in newer:
            path.rename(aside / path.name)
            weights = self.weights_dir / f"{path.name}.pt"
            if weights.is_file():
                weights.rename(aside / "weights" / weights.name)
        atomic_write_text(self.dir / LATEST, point.tag)
        kept = self.weights_dir / f"{point.tag}.pt"
        if kept.is_file():
            self._link_latest_weights(kept)
        log.warning("rollback to %s: the newer checkpoints %s (and their weights files) were moved to %s; "
                    "auto-resume and pruning no longer reach them", point.tag, ", ".join(p.name for p in newer),
                    aside)
        return aside
