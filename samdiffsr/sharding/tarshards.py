"""Numbered WebDataset tar shards written crash-safely and reproducibly with webdataset's ``TarWriter``.

Samples go into ``pattern % n`` for n = ``start``, ``start + 1``, ... in the order given. A shard is
written as ``<name>.tmp`` and renamed to ``<name>`` only once complete (flushed and fsynced), so a
``.tar`` file on disk is always whole; a crash leaves at most one ``.tmp``, which a rerun deletes.

A new shard starts when the current one holds ``max_count`` samples, or when the next sample would take it
past ``max_size`` bytes (tar headers and padding counted; a single larger sample gets a shard of its own).
Tar members get fixed owner, mode and mtime, so the same samples always give byte-identical shards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from webdataset import TarWriter

from samdiffsr.io import writing

BLOCK = 512
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class ShardRecord:
    """A completed shard: file name, sample count, file size, and the stream cursor after its last sample."""

    name: str
    count: int
    bytes: int
    end: tuple[int, int]
    first: str
    last: str


def tar_bytes(sample: dict[str, Any]) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per field plus the data padded to 512."""
    total = 0
    for field, value in sample.items():
        if not field.startswith("_"):
            total += BLOCK + -(-len(value) // BLOCK) * BLOCK
    return total


class ShardSink:
    """Writes samples into numbered shards; calls ``on_complete(record)`` after each shard's rename.

    ``add(sample, cursor)`` takes the sample's stream position after it, ``(image_index, samples of that
    image written so far)``, so a completed shard says exactly where a resumed run must continue.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        pattern: str,
        max_count: int,
        max_size: int,
        start: int = 0,
        on_complete: Callable[[ShardRecord], None] | None = None,
    ):
        if max_count < 1 or max_size < 1:
            raise ValueError(f"max_count and max_size must be >= 1, got {max_count}, {max_size}")
        self.directory = Path(directory)
        self.pattern = pattern
        self.max_count, self.max_size = max_count, max_size
        self.index = start
        self.on_complete = on_complete
        self._file = None
        self._writer: TarWriter | None = None
        self._count = self._bytes = 0
        self._first = self._last = ""
        self._cursor: tuple[int, int] = (0, 0)

    @property
    def current_name(self) -> str:
        return self.pattern % self.index

    def add(self, sample: dict[str, Any], cursor: tuple[int, int]) -> None:
        size = tar_bytes(sample)
        if self._writer is not None and (
            self._count >= self.max_count or self._bytes + size > self.max_size
        ):
            self._complete()
        with writing(self.directory / self.current_name):
            if self._writer is None:
                self._open()
            self._writer.write(sample)
        self._count += 1
        self._bytes += size
        self._last = sample["__key__"]
        self._first = self._first or self._last
        self._cursor = (int(cursor[0]), int(cursor[1]))

    def close(self) -> None:
        """Complete the open shard, if any."""
        if self._writer is not None:
            self._complete()

    def abort(self) -> None:
        """Drop the open shard (its ``.tmp`` file) without completing it."""
        if self._writer is not None:
            for close in (self._writer.close, self._file.close):
                try:
                    close()
                except OSError:  # a full disk, say: the file is dropped anyway
                    pass
            self._tmp_path().unlink(missing_ok=True)
            self._writer = self._file = None

    def _tmp_path(self) -> Path:
        return self.directory / (self.current_name + TMP_SUFFIX)

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp_path(), "wb")  # noqa: SIM115 - closed in _complete / abort
        self._writer = TarWriter(
            self._file, user="samdiffsr", group="samdiffsr", mode=0o444, encoder=False, mtime=0.0
        )
        self._count = self._bytes = 0
        self._first = self._last = ""

    def _complete(self) -> None:
        with writing(self.directory / self.current_name):
            self._writer.close()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        self._writer = self._file = None
        final = self.directory / self.current_name
        os.replace(self._tmp_path(), final)
        _fsync_dir(self.directory)
        record = ShardRecord(
            name=self.current_name, count=self._count, bytes=final.stat().st_size, end=self._cursor,
            first=self._first, last=self._last,
        )
        self.index += 1
        if self.on_complete is not None:
            self.on_complete(record)


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (best effort: not every filesystem lets a folder be fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
