"""Bookkeeping of a sharding run: per-part progress journals (resume), part manifests, merged manifests.

The rule resume rests on: a resumed run keeps the completed shards still on disk at their recorded size,
continues right after the last one's cursor ``[image, sample]`` and redoes the images from there, so it
writes exactly the shards an uninterrupted run would. The folder layout and journal lines: docs/sharding.md.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samdiffsr.io import atomic_write_bytes
from samdiffsr.sharding.tarshards import ShardRecord

FORMAT = "samdiffsr-shards/1"
PART_RE = re.compile(r"^part-(\d+)-of-(\d+)\.json$")


class StateError(RuntimeError):
    """The output folder holds a run that this one cannot continue (different settings, or busy)."""


def part_width(num_parts: int) -> int:
    return max(3, len(str(num_parts - 1)))


def part_stem(part: int, num_parts: int) -> str:
    w = part_width(num_parts)
    return f"part-{part:0{w}d}-of-{num_parts:0{w}d}"


def shard_pattern(prefix: str, part: int, num_parts: int) -> str:
    """``<prefix>-%06d.tar`` for a single part, ``<prefix>-p<part>-%06d.tar`` when split."""
    if num_parts == 1:
        return f"{prefix}-%06d.tar"
    return f"{prefix}-p{part:0{part_width(num_parts)}d}-%06d.tar"


def _dump(data: Any) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=False) + "\n").encode("utf-8")


@dataclass
class PartProgress:
    """What a part's journal says is done: completed shards, image records, and where to continue."""

    shards: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cursor(self) -> tuple[int, int]:
        return tuple(self.shards[-1]["end"]) if self.shards else (0, 0)


class Journal:
    """The append-only progress journal of one part; :meth:`resume` rewrites it to its valid prefix."""

    def __init__(self, out_dir: str | os.PathLike, part: int, num_parts: int):
        self.out_dir = Path(out_dir)
        self.parts_dir = self.out_dir / "parts"
        self.stem = part_stem(part, num_parts)
        self.path = self.parts_dir / f"{self.stem}.jsonl"
        self.manifest_path = self.parts_dir / f"{self.stem}.json"
        self._handle = None
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take an exclusive lock on this part (a second process on the same part fails fast).

        A POSIX record lock: it belongs to this process only (forked workers do not inherit it) and is
        released when the process dies, however it dies.
        """
        import fcntl

        self.parts_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.parts_dir / f"{self.stem}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateError(f"{self.stem} of {self.out_dir} is being written by another process") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:  # records are flushed as they are appended; a failed one is a torn last line
                pass
            self._handle = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def resume(self, fingerprint: dict[str, Any]) -> PartProgress:
        """Read the journal, keep its valid prefix, rewrite it, and open it for appending."""
        progress = PartProgress()
        lines = []
        if self.path.exists():
            for raw in self.path.read_bytes().splitlines():
                try:
                    lines.append(json.loads(raw))
                except ValueError:
                    break  # a torn last line from a crash
        if lines:
            recorded = lines[0].get("fingerprint")
            if recorded != fingerprint:
                raise StateError(_difference(recorded, fingerprint, self.out_dir))
            for record in lines[1:]:
                if "shard" in record:
                    shard = self.out_dir / record["shard"]
                    if not shard.is_file() or shard.stat().st_size != record["bytes"]:
                        break  # lost or damaged: redo from the previous shard on
                    progress.shards.append(record)
            cursor_image = progress.cursor[0]
            progress.images = [r for r in lines[1:] if "image" in r and r["image"] < cursor_image]
        body = [{"fingerprint": fingerprint}] + progress.images + progress.shards
        atomic_write_bytes(self.path, b"".join(json.dumps(r).encode() + b"\n" for r in body))
        self._handle = open(self.path, "ab")  # noqa: SIM115 - closed in unlock()
        return progress

    def append(self, record: dict[str, Any], durable: bool = False) -> None:
        """Append a record. Image records are only flushed (they survive a killed process); a shard record
        is fsynced, which also makes every earlier record of the file durable."""
        self._handle.write(json.dumps(record).encode() + b"\n")
        self._handle.flush()
        if durable:
            os.fsync(self._handle.fileno())

    def add_shard(self, record: ShardRecord) -> dict[str, Any]:
        entry = {"shard": record.name, "count": record.count, "bytes": record.bytes, "end": list(record.end),
                 "first": record.first, "last": record.last}
        self.append(entry, durable=True)
        return entry

    def read_manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.manifest_path.read_bytes())
        except (OSError, ValueError):
            return None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_bytes(self.manifest_path, _dump(manifest))


def _difference(recorded: Any, wanted: dict[str, Any], out_dir: Path) -> str:
    if not isinstance(recorded, dict):
        return f"{out_dir} holds a progress journal this version cannot read; use a new --out or --overwrite"
    keys = sorted(set(recorded) | set(wanted))
    diffs = [f"{k}: {recorded.get(k)!r} -> {wanted.get(k)!r}" for k in keys if recorded.get(k) != wanted.get(k)]
    return (f"{out_dir} holds shards made with other settings ({'; '.join(diffs)[:600]}); "
            "rerun with the same settings to resume, or use a new --out or --overwrite")


def existing_parts(out_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """Part manifests in ``out_dir/parts`` keyed by part index (only readable ones)."""
    found = {}
    parts_dir = Path(out_dir) / "parts"
    if parts_dir.is_dir():
        for path in sorted(parts_dir.iterdir()):
            match = PART_RE.match(path.name)
            if match:
                try:
                    found[int(match.group(1))] = json.loads(path.read_bytes())
                except ValueError:
                    continue
    return found


def check_compatible(out_dir: str | os.PathLike, settings: dict[str, Any]) -> None:
    """Refuse an output folder whose other journals/manifests were made with different shared settings."""
    parts_dir = Path(out_dir) / "parts"
    if not parts_dir.is_dir():
        return
    for path in sorted(parts_dir.glob("part-*.json*")):
        try:
            first = path.read_bytes().split(b"\n", 1)[0] if path.suffix == ".jsonl" else path.read_bytes()
            data = json.loads(first)
        except (OSError, ValueError):
            continue
        recorded = (data.get("fingerprint") or {}).get("settings") if path.suffix == ".jsonl" else (
            data.get("settings"))
        if recorded is not None and recorded != settings:
            raise StateError(_difference(recorded, settings, Path(out_dir)).replace(
                "shards made", f"shards ({path.name}) made"))


@dataclass
class MergeResult:
    """Outcome of :func:`merge_parts`: missing part indices (empty when merged) and the merged manifest."""

    missing: list[int]
    manifest: dict[str, Any] | None = None
    report: dict[str, Any] | None = None


def merge_parts(out_dir: str | os.PathLike) -> MergeResult:
    """Write ``sizes.json``, ``manifest.json`` and ``report.json`` if every part's manifest is present."""
    out_dir = Path(out_dir)
    parts = existing_parts(out_dir)
    if not parts:
        return MergeResult(missing=[0])
    num_parts = {p["num_parts"] for p in parts.values()}
    if len(num_parts) != 1:
        raise StateError(f"{out_dir} mixes runs split into {sorted(num_parts)} parts")
    total = num_parts.pop()
    missing = [i for i in range(total) if i not in parts]
    if missing:
        return MergeResult(missing=missing)
    ordered = [parts[i] for i in range(total)]
    first = ordered[0]
    shards = [dict(s, part=p["part"]) for p in ordered for s in p["shards"]]
    report = {
        "ok": not any(p["skipped"] for p in ordered),
        "skipped": [s for p in ordered for s in p["skipped"]],
        "converted": [c for p in ordered for c in p["converted"]],
        "ignored": first["ignored"],
    }
    manifest = {
        "format": FORMAT,
        "prefix": first["prefix"],
        "mode": first["settings"]["mode"],
        "num_samples": sum(s["count"] for s in shards),
        "num_shards": len(shards),
        "shards": shards,
        "pattern": _brace_pattern(first["prefix"], len(shards)) if total == 1 else None,
        "images": {
            "found": sum(p["images"]["found"] for p in ordered),
            "sharded": sum(p["images"]["sharded"] for p in ordered),
            "skipped": sum(p["images"]["skipped"] for p in ordered),
        },
        "settings": first["settings"],
        "info": first["info"],
        "parts": [{k: p[k] for k in ("part", "images", "num_samples", "seconds")} for p in ordered],
    }
    atomic_write_bytes(out_dir / "sizes.json", _dump({s["name"]: s["count"] for s in shards}))
    atomic_write_bytes(out_dir / "report.json", _dump(report))
    atomic_write_bytes(out_dir / "manifest.json", _dump(manifest))
    return MergeResult(missing=[], manifest=manifest, report=report)


def _brace_pattern(prefix: str, count: int) -> str | None:
    if count == 0:
        return None
    return f"{prefix}-{{{0:06d}..{count - 1:06d}}}.tar" if count > 1 else f"{prefix}-000000.tar"


def shard_urls(out_dir: str | os.PathLike) -> list[str]:
    """Paths of all shards of a merged output folder, in manifest order (for ``read_samples``)."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / "manifest.json").read_bytes())
    return [str(out_dir / s["name"]) for s in manifest["shards"]]


def part_manifest(
    *, prefix: str, part: int, num_parts: int, settings: dict[str, Any], info: dict[str, Any],
    progress: PartProgress, found: int, ignored: list[str], seconds: float,
) -> dict[str, Any]:
    """The manifest of a completed part, from its journal records."""
    skipped = [dict(r["error"], image=r["file"]) for r in progress.images if r.get("error")]
    converted = [{"image": r["file"], "note": r["note"]} for r in progress.images if r.get("note")]
    return {
        "format": FORMAT, "prefix": prefix, "part": part, "num_parts": num_parts,
        "settings": settings, "info": info,
        "shards": [{k: s[k] for k in ("name", "count", "bytes")} for s in map(_shard_entry, progress.shards)],
        "num_samples": sum(s["count"] for s in progress.shards),
        "images": {"found": found, "sharded": found - len(skipped), "skipped": len(skipped)},
        "skipped": skipped, "converted": converted, "ignored": ignored, "seconds": round(seconds, 3),
    }


def _shard_entry(record: dict[str, Any]) -> dict[str, Any]:
    return {"name": record["shard"], "count": record["count"], "bytes": record["bytes"]}

