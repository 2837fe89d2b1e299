"""The make_shards job: an image folder -> WebDataset shards, in parallel, in parts, resumable.

The rule everything here keeps: a part's shards are a pure function of its image list and the settings
(the list is sorted, shuffled by ``seed`` in tile mode, cut into contiguous parts; workers run ahead but
results are consumed in order), so a resumed run writes exactly the shards an uninterrupted one would.
Exit codes: :data:`samdiffsr.cli.EXIT_CODES`. The folder layout and the journal: docs/sharding.md.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samdiffsr.cli import UserError
from samdiffsr.images import find_images, is_approximate
from samdiffsr.io import writing
from samdiffsr.progress import progress_bar
from samdiffsr.sharding.manifest import (
    FORMAT,
    Journal,
    PartProgress,
    check_compatible,
    merge_parts,
    part_manifest,
    shard_pattern,
)
from samdiffsr.sharding.samples import ImageJob, MaskSource
from samdiffsr.sharding.tarshards import TMP_SUFFIX, ShardSink
from samdiffsr.sharding.tiles import TileSpec
from samdiffsr.sharding.workers import ordered_results


class ShardError(UserError, ValueError):
    """The job cannot start: no images, bad settings."""


@dataclass
class ShardSettings:
    """One sharding run (one part of it). ``prefix`` None: ``train`` (tiles) or ``test`` (benchmark)."""

    images: str
    out: str
    masks: MaskSource = field(default_factory=MaskSource)
    spec: TileSpec = field(default_factory=TileSpec)
    benchmark: bool = False
    prefix: str | None = None
    max_count: int = 512
    max_size: int = 256_000_000
    workers: int = 1
    num_parts: int = 1
    part: int = 0
    seed: int = 0
    stop_after: int | None = None
    overwrite: bool = False
    progress: bool = True

    @property
    def name(self) -> str:
        return self.prefix or ("test" if self.benchmark else "train")

    def content_settings(self, image_list_sha: str) -> dict[str, Any]:
        """The settings that decide the shards' bytes (compared on resume and across parts)."""
        spec = self.spec
        tiling = {"scale": spec.scale} if self.benchmark else {
            "scale": spec.scale, "tile": spec.tile, "step": spec.stride, "thresh": spec.thresh, "seed": self.seed}
        return {"format": FORMAT, "mode": "benchmark" if self.benchmark else "tiles", "prefix": self.name,
                **tiling, "masks": self.masks.describe(), "max_count": self.max_count, "max_size": self.max_size,
                "num_parts": self.num_parts, "images": image_list_sha}


@dataclass
class ShardSummary:
    """What a run did for its part (totals over resumed runs) and whether the dataset is merged."""

    out: str
    part: int
    num_parts: int
    images: int = 0
    sharded: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: int = 0
    warnings: list[str] = field(default_factory=list)  # "file: note" of conversions with approximate colours
    samples: int = 0
    shards: int = 0
    seconds: float = 0.0
    resumed_shards: int = 0
    finished: bool = False
    missing_parts: list[int] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if not self.finished:
            return 3
        return 1 if self.skipped else 0

    def line(self) -> str:
        part = f" part {self.part}/{self.num_parts}" if self.num_parts > 1 else ""
        state = "" if self.finished else " (not finished: rerun to resume)"
        resumed = f", resumed after {self.resumed_shards} finished shards" if self.resumed_shards else ""
        return (f"{self.out}{part}: {self.images} images ({self.sharded} sharded, {len(self.skipped)} skipped, "
                f"{self.converted} converted), {self.samples} tiles, {self.shards} shards, "
                f"{self.seconds:.1f} s{resumed}{state}")


def print_summary(summary: ShardSummary, limit: int = 20) -> None:
    """Print the summary line, the skipped files and where the report is."""
    print(summary.line())
    for entry in summary.skipped[:limit]:
        print(f"  skipped {entry['file']}: {entry['reason']}")
    for warning in summary.warnings[:limit]:
        print(f"  warning {warning}")
    if len(summary.warnings) > limit:
        print(f"  ... and {len(summary.warnings) - limit} more warnings (report.json: converted)")
    if len(summary.skipped) > limit:
        print(f"  ... and {len(summary.skipped) - limit} more")
    if summary.finished and summary.missing_parts:
        print(f"  waiting for parts {summary.missing_parts[:20]} before merging the manifests")
    elif summary.finished:
        print(f"  report: {Path(summary.out) / 'report.json'}")


def order_images(files: list[str], seed: int, benchmark: bool) -> list[str]:
    """Sorted relative paths, shuffled by ``seed`` in tile mode (``seed < 0`` or benchmark: sorted)."""
    files = sorted(files)
    if benchmark or seed < 0:
        return files
    return [files[i] for i in np.random.default_rng(seed).permutation(len(files))]


def part_slice(n: int, part: int, num_parts: int) -> slice:
    """The contiguous share of part ``part`` of ``n`` items (sizes differ by at most one)."""
    return slice(n * part // num_parts, n * (part + 1) // num_parts)


def _part_files_regex(pattern: str) -> re.Pattern:
    head, tail = pattern.split("%06d")
    return re.compile(re.escape(head) + r"\d{6,}" + re.escape(tail) + f"({re.escape(TMP_SUFFIX)})?")


def _remove_part(out: Path, journal: Journal, pattern: str) -> None:
    regex = _part_files_regex(pattern)
    for path in out.iterdir():
        if regex.fullmatch(path.name):
            path.unlink()
    for path in (journal.path, journal.manifest_path, out / "sizes.json", out / "manifest.json",
                 out / "report.json"):
        path.unlink(missing_ok=True)


def _shared_json_targets(images: str, files: list[str], masks: MaskSource) -> dict[int, dict[str, str]]:
    """Images whose mask JSON path collides with another image's (``a.png`` and ``a.jpg``): all skipped."""
    if masks.kind == "none":
        return {}
    groups: dict[Path, list[int]] = {}
    for i, rel in enumerate(files):
        groups.setdefault(masks.json_path(rel), []).append(i)
    bad = {}
    for path, members in groups.items():
        if len(members) > 1:
            names = ", ".join(files[i] for i in members)
            for i in members:
                bad[i] = {"file": str(Path(images) / files[i]),
                          "reason": f"ambiguous mask JSON {path}: shared by {names}"}
    return bad


@dataclass(frozen=True)
class PartPlan:
    """This part's images in processing order and what is known before any is read."""

    files: list[str]  # the part's slice of the ordered image list (paths relative to the image folder)
    ignored: list[str]  # files under the image folder that are not images
    content: dict[str, Any]  # ShardSettings.content_settings: compared on resume and across parts
    pre_skipped: dict[int, dict[str, str]]  # part-relative index -> why it is skipped unread


def plan_part(settings: ShardSettings) -> PartPlan:
    """Find, order and slice the images of part ``settings.part``; raises :class:`ShardError` if there are none."""
    if not 0 <= settings.part < settings.num_parts:
        raise ShardError(f"--part must be in 0..{settings.num_parts - 1}, got {settings.part}")
    files, ignored = find_images(settings.images)
    if not files:
        raise ShardError(f"no images ({', '.join(('png', 'jpg', 'bmp', 'tif', 'webp'))}) found under "
                         f"{settings.images}")
    ordered = order_images(files, settings.seed, settings.benchmark)
    image_sha = hashlib.sha1("\n".join(ordered).encode("utf-8")).hexdigest()
    collisions = _shared_json_targets(settings.images, ordered, settings.masks)
    span = part_slice(len(ordered), settings.part, settings.num_parts)
    return PartPlan(files=ordered[span], ignored=ignored, content=settings.content_settings(image_sha),
                    pre_skipped={i - span.start: e for i, e in collisions.items() if span.start <= i < span.stop})


def make_shards(settings: ShardSettings) -> ShardSummary:
    """Shard part ``settings.part`` of ``settings.images`` into ``settings.out``; merge the manifests when all
    parts are done.

    A full disk raises ``OSError(ENOSPC)`` naming the file being written (a shard, a JSON file) or else the
    output folder.
    """
    with writing(settings.out):
        return _make_shards(settings)


def _make_shards(settings: ShardSettings) -> ShardSummary:
    start = time.perf_counter()
    plan = plan_part(settings)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    journal = Journal(out, settings.part, settings.num_parts)
    summary = ShardSummary(out=str(out), part=settings.part, num_parts=settings.num_parts, images=len(plan.files))
    journal.lock()
    try:
        return _run_part(settings, plan, journal, summary, start)
    finally:
        journal.unlock()


def _run_part(settings: ShardSettings, plan: PartPlan, journal: Journal, summary: ShardSummary,
              start: float) -> ShardSummary:
    """Under the part's lock: resume from the journal, write the rest, then the part manifest."""
    out = Path(settings.out)
    pattern = shard_pattern(settings.name, settings.part, settings.num_parts)
    if settings.overwrite:
        _remove_part(out, journal, pattern)
    check_compatible(out, plan.content)
    done = journal.read_manifest()
    if done is not None and done.get("settings") == plan.content and all(
            (out / shard["name"]).is_file() for shard in done["shards"]):
        summary.seconds = time.perf_counter() - start
        return _finish(summary, done, out)
    journal.manifest_path.unlink(missing_ok=True)
    progress = journal.resume({"settings": plan.content, "part": settings.part})
    regex = _part_files_regex(pattern)
    for path in out.iterdir():
        if path.name.endswith(TMP_SUFFIX) and regex.fullmatch(path.name):
            path.unlink()
    summary.resumed_shards = len(progress.shards)
    job = ImageJob(images_dir=str(settings.images), files=tuple(plan.files), spec=settings.spec,
                   masks=settings.masks, benchmark=settings.benchmark)
    stopped = _write_part(settings, job, journal, progress, pattern, plan.pre_skipped)
    summary.seconds = time.perf_counter() - start
    if stopped:
        _fill(summary, progress.images, progress.shards)
        return summary
    manifest = part_manifest(prefix=settings.name, part=settings.part, num_parts=settings.num_parts,
                             settings=plan.content, info=_run_info(settings), progress=progress,
                             found=len(plan.files), ignored=plan.ignored, seconds=summary.seconds)
    journal.write_manifest(manifest)
    return _finish(summary, manifest, out)


def _run_info(settings: ShardSettings) -> dict[str, Any]:
    """Where and how the part was made (kept in its manifest, not compared on resume)."""
    masks = settings.masks
    return {"images_dir": str(Path(settings.images).resolve()), "masks_dir": masks.masks_dir,
            "sam_checkpoint": masks.sam_checkpoint, "workers": settings.workers, "host": platform.node(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def _write_part(settings: ShardSettings, job: ImageJob, journal: Journal, progress: PartProgress, pattern: str,
                pre_skipped: dict[int, dict[str, str]]) -> bool:
    """Process the part's images from the journal's cursor on, in order; True if stopped by ``stop_after``.

    Each image's samples go to the shard sink with their stream position, then its record to the journal.
    On any exception the open shard is dropped (its ``.tmp`` removed) and the workers are stopped.
    """
    files = job.files
    cursor = progress.cursor
    sink = ShardSink(settings.out, pattern, settings.max_count, settings.max_size, start=len(progress.shards),
                     on_complete=lambda record: progress.shards.append(journal.add_shard(record)))
    todo = [i for i in range(cursor[0], len(files)) if i not in pre_skipped]
    results = ordered_results(job, [(i, cursor[1] if i == cursor[0] else 0) for i in todo], settings.workers)
    bar = progress_bar(total=len(files), initial=cursor[0], unit="img", desc=f"shards {settings.name}",
                       disable=not settings.progress, dynamic_ncols=True, file=sys.stderr)
    try:
        for processed, i in enumerate(range(cursor[0], len(files))):
            if settings.stop_after is not None and processed >= settings.stop_after:
                sink.abort()
                return True
            if i in pre_skipped:
                record = {"image": i, "file": files[i], "samples": 0, "error": pre_skipped[i]}
            else:
                result = next(results)
                skip = cursor[1] if i == cursor[0] else 0
                for k, sample in enumerate(result.samples):
                    sink.add(sample, (i, skip + k + 1))
                record = {"image": i, "file": files[i], "samples": skip + len(result.samples),
                          "error": result.error, "note": result.note, "masker": result.masker,
                          "num_masks": result.num_masks}
            journal.append(record)
            progress.images.append(record)
            bar.update(1)
            if record.get("error") and settings.progress:
                bar.write(f"skipped {record['error']['file']}: {record['error']['reason']}")
        sink.close()
        return False
    except BaseException:
        sink.abort()
        raise
    finally:
        results.close()
        bar.close()


def _fill(summary: ShardSummary, images: list[dict], shards: list[dict]) -> None:
    summary.skipped = [dict(r["error"], image=r["file"]) for r in images if r.get("error")]
    summary.sharded = sum(1 for r in images if not r.get("error"))
    summary.converted = sum(1 for r in images if r.get("note"))
    summary.warnings = [f"{r['file']}: {r['note']}" for r in images if is_approximate(r.get("note"))]
    summary.samples = sum(r["samples"] for r in images)
    summary.shards = len(shards)


def _finish(summary: ShardSummary, manifest: dict[str, Any], out: Path) -> ShardSummary:
    summary.finished = True
    summary.skipped = manifest["skipped"]
    summary.sharded = manifest["images"]["sharded"]
    summary.converted = len(manifest["converted"])
    summary.warnings = [f"{c['image']}: {c['note']}" for c in manifest["converted"] if is_approximate(c["note"])]
    summary.samples = manifest["num_samples"]
    summary.shards = len(manifest["shards"])
    summary.missing_parts = merge_parts(out).missing
    return summary


def default_workers(masks: MaskSource) -> int:
    """One worker per core (at most 8), one for SAM (each worker holds its own model)."""
    return 1 if masks.kind == "sam" else max(1, min(8, os.cpu_count() or 1))
