"""Fast sequential reading of WebDataset tar shards into raw samples ({"__key__", ext: bytes, ...}).

The 512-byte ustar headers are parsed directly (why: docs/data.md): pax ``path`` / ``size`` records and
GNU long names are honoured, checksums are verified, and a truncated or garbled shard raises
`TarFormatError` after yielding the samples before the damage. Members are grouped into samples exactly
as webdataset does (``base_plus_ext``: key = path up to the first dot of the file name, extension = the
rest, lower case).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

BLOCK = 512
_ZERO = bytes(BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")


class TarFormatError(ValueError):
    """A shard is truncated or its headers are not valid tar."""


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as exc:
        raise TarFormatError(f"bad numeric header field {field!r}") from exc


def _pax(data: bytes) -> dict[str, str]:
    """Records ``"<len> key=value\\n"`` of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        end = pos + int(data[pos:space])
        key, _, value = data[space + 1:end - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos = end
    return out


def _read(stream: IO[bytes], n: int, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise TarFormatError(f"truncated {what}: {len(data)} of {n} bytes")
    return data


def iter_tar_files(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(path, content) of each regular file of an uncompressed tar stream, in order."""
    extended: dict[str, str] = {}
    long_name: str | None = None
    while True:
        header = stream.read(BLOCK)
        if header == _ZERO:
            return  # end-of-archive marker (what follows it, a second zero block and padding, is not read)
        if len(header) != BLOCK:
            # tarfile takes an end of file on a block boundary for the end of the archive; a shard cut
            # there lacks the marker every tar writer emits, so it counts as truncated here.
            raise TarFormatError(f"truncated shard: {len(header)}-byte header, no end-of-archive marker")
        stored = _number(header[148:156])
        # The checksum counts its own 8-byte field as spaces (8 * 32).
        if stored != int(np.frombuffer(header, np.uint8).sum()) - sum(header[148:156]) + 256:
            raise TarFormatError("header checksum mismatch")
        size = int(extended["size"]) if "size" in extended else _number(header[124:136])
        kind = header[156:157]
        data = _read(stream, size, "member")
        stream.read(-size % BLOCK)  # padding; a shard cut inside it still holds the whole member
        if kind == b"x":
            extended = _pax(data)
            continue
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind in _FILE_TYPES:
            name = long_name or extended.get("path")
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            yield name, data
        extended, long_name = {}, None  # pax / long-name records describe the next member only


def read_shard(url: str, bufsize: int = 1 << 20, source: str | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard (local path or any URL webdataset's ``gopen`` opens). ``source``: the name
    used in ``__url__`` and in errors (the shard's own URL when ``url`` is a cached copy of it)."""
    source = source or url
    local = "://" not in url and not url.startswith(("pipe:", "file:"))
    with open(url, "rb", buffering=bufsize) if local else gopen(url) as stream:
        current: dict[str, Any] | None = None
        for name, data in _naming(source, iter_tar_files(stream)):
            key, ext = base_plus_ext(name)
            if key is None or name.rsplit("/", 1)[-1].startswith("__"):
                continue
            if current is None or key != current["__key__"]:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": source}
            ext = ext.lower()
            if ext in current:
                raise TarFormatError(f"{source}: sample {key} holds {ext} twice")
            current[ext] = data
        if current is not None:
            yield current


def _naming(url: str, files: Iterator[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
    """``files``, with a format error's message starting with the shard's path."""
    try:
        yield from files
    except TarFormatError as exc:
        raise TarFormatError(f"{url}: {exc}") from exc
