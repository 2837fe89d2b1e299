"""Node-local shard cache (``data.cache_dir``): each shard is copied to local disk on first use, and later
epochs read the copy.

Why not webdataset's own cache (``webdataset.cache.FileCache``): it never caches a local path (shards on a
mounted cluster file system are read in place), names a copy by the file's base name only (two folders'
``train-000000.tar`` collide) and never notices a rewritten source. Like it, a shard is copied whole before it
is read (a shard is at most ``--max-size``, 256 MB by default), so the bytes the stream's own tar reader sees
are the same whether or not the cache is used, and resuming stays exact.

A copy is written as ``<name>.<pid>.tmp``, fsynced and renamed: a file in the cache is always whole. An
exclusive ``flock`` per shard makes the ranks and DataLoader workers of one node copy each shard once; the
others wait and reuse the copy. A local source is checked by one ``stat`` per shard open (size and mtime,
metadata only: its data is not read): a rewritten shard is copied again, a source that is gone or unreachable
is served from the copy. Remote URLs (``http://``, ``pipe:``, ...) are trusted once copied. There is no
eviction: the folder must hold the training set (or a new ``data.cache_dir`` be given when the shards change).
A copy that cannot be made (disk full, unreadable source) falls back to reading the source, with a warning.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
from pathlib import Path

from webdataset.gopen import gopen

log = logging.getLogger(__name__)


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith(("pipe:", "file:"))


class ShardCache:
    """Maps a shard URL to a local copy under ``folder`` (made on first use)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._warned = False

    def entry(self, url: str) -> Path:
        """The copy's path: the shard's file name, prefixed by a digest of its full URL (two folders may hold
        shards of the same name)."""
        name = url.rstrip("/").rsplit("/", 1)[-1] or "shard"
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[-80:]
        source = os.path.abspath(url) if is_local(url) else url
        return self.folder / f"{hashlib.sha1(source.encode()).hexdigest()[:12]}-{name}"

    def local(self, url: str) -> str:
        """A local path holding ``url``'s bytes: the cached copy (made now if needed), or ``url`` itself when no
        copy can be made."""
        path = self.entry(url)
        stat = _stat(url) if is_local(url) else None
        if _fresh(path, stat):
            return str(path)
        if stat is None and is_local(url):
            return url  # a missing shard, never cached: reading it reports it
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(path.with_name(path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another process of this node may be copying it right now
                if not _fresh(path, stat):
                    _copy(url, path, stat)
            return str(path)
        except OSError as exc:
            if not self._warned:
                log.warning("data.cache_dir: cannot cache %s in %s (%s); reading shards from their source",
                            url, self.folder, exc.strerror or exc)
                self._warned = True
            return url


def _stat(url: str) -> os.stat_result | None:
    try:
        return os.stat(url)
    except OSError:
        return None


def _fresh(path: Path, source: os.stat_result | None) -> bool:
    """Whether the copy exists and matches the source's size and mtime (when the source can be seen)."""
    mine = _stat(str(path))
    if mine is None:
        return False
    if source is None:
        return True  # a remote URL, or a local source that is gone: the copy is all there is
    return mine.st_size == source.st_size and mine.st_mtime_ns == source.st_mtime_ns


def _copy(url: str, path: Path, stat: os.stat_result | None) -> None:
    """Copy ``url`` to ``path`` atomically; a local copy keeps the source's mtime (the freshness check)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with (open(url, "rb") if stat is not None else gopen(url, "rb")) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
            dst.flush()
            os.fsync(dst.fileno())
        if stat is not None:
            if os.stat(tmp).st_size != stat.st_size:
                raise OSError(f"copied {os.stat(tmp).st_size} of {stat.st_size} bytes")
            os.utime(tmp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
