"""The shard sample format: encoding samples (the sharding job) and decoding them (training, evaluation).

One sample per tile (or per whole image for benchmark sets); see shards/README.md. Its fields, by name:

- ``hr``      uint8  H x W x 3
- ``lr``      uint8  H/s x W/s x 3 (MATLAB bicubic of the WHOLE image, then cropped)
- ``seg``     label map H x W, uint8 when the value table has at most 256 entries (format 2), else uint16
              (optional: absent when the sample has no mask data)
- ``segval``  float32 table; the mask is ``segval[seg]`` (label 0 -> 0.0), exact float32 SPE values
- ``json``    metadata: source, tile position, image size, number of masks, masker, scale

The encoding is told by each field's extension, so shards of either kind read the same way (docs/scaling.md):
``.npy`` (format 1: uncompressed) or ``.npy.zst`` (format 2, the default: the same ``.npy`` bytes in a zstd
frame with a checksum, about 3x smaller, ~0.4 ms more CPU per 320 tile). Both are bit-exact.
"""

from __future__ import annotations

import functools
import io
import json
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

ENCODINGS = {"npy": ".npy", "zstd": ".npy.zst"}  # encoding -> extension of the array fields
DEFAULT_ENCODING = "zstd"
ZSTD_LEVEL = 3  # higher levels save a few % more bytes for several times the sharding CPU (bench/encodings.py)
MAX_FIELD_BYTES = 1 << 31  # a garbled zstd header must not make the reader allocate more than this
SAMPLE_FIELDS = ("hr", "lr", "seg", "segval", "json")
_ZSTD = threading.local()  # a (de)compressor per thread: making one costs ~0.2 ms


class SampleError(ValueError):
    """A shard sample is missing a field or holds inconsistent arrays."""


def _zstandard():
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - zstandard is a dependency; named for a broken environment
        raise SampleError("zstd-encoded shards (fields *.npy.zst) need the zstandard package: "
                          "pip install zstandard") from exc
    return zstandard


def _zstd(kind: str):
    """This thread's ``ZstdCompressor`` (``kind`` "c") or ``ZstdDecompressor`` ("d")."""
    coder = getattr(_ZSTD, kind, None)
    if coder is None:
        zstandard = _zstandard()
        coder = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True) if kind == "c" \
            else zstandard.ZstdDecompressor()
        setattr(_ZSTD, kind, coder)
    return coder


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """Parse an .npy header once per distinct header (tiles of one dataset share a few shapes)."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    return dtype, shape, fortran, stream.tell()


def _load_npy(data: bytes, key: str, field: str) -> np.ndarray:
    """Zero-copy .npy decoding: the array is a read-only view of the sample's bytes."""
    try:
        header_len = 10 + int.from_bytes(data[8:10], "little") if data[6:7] == b"\x01" else \
            12 + int.from_bytes(data[8:12], "little")
        dtype, shape, fortran, offset = _npy_header(bytes(data[:header_len]))
        count = int(np.prod(shape, dtype=np.int64))
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        return array.reshape(shape, order="F" if fortran else "C")
    except Exception as exc:  # numpy raises several types for corrupt headers or short data
        raise SampleError(f"sample {key}: field {field} is not a valid .npy ({exc})") from exc


def _unzstd(data: bytes, key: str, field: str) -> bytes:
    zstandard = _zstandard()
    try:
        size = zstandard.frame_content_size(data)
        if not 0 <= size <= MAX_FIELD_BYTES:
            raise zstandard.ZstdError(f"frame content size {size} is unknown or over {MAX_FIELD_BYTES}")
        return _zstd("d").decompress(data)
    except zstandard.ZstdError as exc:
        raise SampleError(f"sample {key}: field {field} is not a valid zstd frame ({exc})") from exc


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` of a C-contiguous copy, as bytes."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode_mask(labels: np.ndarray, values: np.ndarray, compact: bool = True) -> dict[str, np.ndarray]:
    """The stored form of a mask map: a label map (uint8 for at most 256 values unless ``compact`` is False,
    else uint16) and its float32 value table, keyed by their ``.npy`` field names."""
    if values.size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"too many mask labels for uint16: {values.size}")
    dtype = np.uint8 if compact and values.size <= 256 else np.uint16
    return {"seg.npy": labels.astype(dtype), "segval.npy": values.astype(np.float32)}


def encode_arrays(hr: np.ndarray, lr: np.ndarray, labels: np.ndarray | None = None,
                  values: np.ndarray | None = None, encoding: str = DEFAULT_ENCODING) -> dict[str, bytes]:
    """A sample's array fields (name -> bytes) in ``encoding``: ``zstd`` (format 2) or ``npy`` (format 1, byte
    for byte what earlier versions wrote: uint16 labels). ``labels`` None: no mask fields."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown shard encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    mask = encode_mask(labels, values, compact=encoding != "npy") if labels is not None else {}
    arrays = {"hr.npy": hr, "lr.npy": lr, **mask}
    fields = {}
    for name, array in arrays.items():
        data = npy_bytes(array)
        if encoding == "zstd" and name != "segval.npy":  # the value table is a few hundred random floats
            fields[name + ".zst"] = _zstd("c").compress(data)
        else:
            fields[name] = data
    return fields


def field_array(raw: dict[str, Any], name: str) -> np.ndarray | None:
    """Array field ``name`` (``hr``, ``lr``, ``seg``, ``segval``) of a raw sample in any known encoding;
    None when the sample has no such field."""
    key = raw.get("__key__", "?")
    plain, packed = name + ".npy", name + ".npy.zst"
    if plain in raw and packed in raw:
        raise SampleError(f"sample {key}: holds both {plain} and {packed}")
    if plain in raw:
        return _load_npy(raw[plain], key, plain)
    if packed in raw:
        return _load_npy(_unzstd(raw[packed], key, packed), key, packed)
    other = sorted(f for f in raw if f.startswith(name + "."))
    if other:
        raise SampleError(f"sample {key}: field {other[0]} is in an encoding this version cannot read "
                          f"(known: {plain}, {packed})")
    return None


def _required(raw: dict[str, Any], name: str, key: str) -> np.ndarray:
    array = field_array(raw, name)
    if array is None:
        raise SampleError(f"sample {key}: missing field {name}.npy (or {name}.npy.zst)")
    return array


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Turn one raw WebDataset sample (field -> bytes) into arrays, whatever its encoding.

    ``hr`` and ``lr`` are read-only views of the raw (or decompressed) bytes: copy before writing into them.
    Returns ``{"key", "hr", "lr", "mask", "meta"}``; ``mask`` is float32 H x W at HR resolution
    (all zeros when the sample was written without masks).
    """
    key = raw.get("__key__", "?")
    if "json" not in raw:
        raise SampleError(f"sample {key}: missing field json")
    hr, lr = _required(raw, "hr", key), _required(raw, "lr", key)
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise SampleError(f"sample {key}: metadata is not valid JSON ({exc})") from exc
    if hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
        raise SampleError(f"sample {key}: hr must be uint8 HxWx3, got {hr.dtype} {hr.shape}")
    if lr.dtype != np.uint8 or lr.ndim != 3 or lr.shape[2] != 3:
        raise SampleError(f"sample {key}: lr must be uint8 HxWx3, got {lr.dtype} {lr.shape}")
    scale = hr.shape[0] // max(lr.shape[0], 1)
    if scale < 1 or lr.shape[0] * scale != hr.shape[0] or lr.shape[1] * scale != hr.shape[1]:
        raise SampleError(f"sample {key}: hr {hr.shape[:2]} is not an integer multiple of lr {lr.shape[:2]}")
    labels = field_array(raw, "seg")
    if labels is None:
        return {"key": key, "hr": hr, "lr": lr, "mask": np.zeros(hr.shape[:2], np.float32), "meta": meta}
    values = _required(raw, "segval", key)
    if labels.shape != hr.shape[:2]:
        raise SampleError(f"sample {key}: mask {labels.shape} does not match hr {hr.shape[:2]}")
    if labels.dtype.kind != "u":
        raise SampleError(f"sample {key}: mask labels must be unsigned integers, got {labels.dtype}")
    if labels.size and int(labels.max()) >= values.size:
        raise SampleError(f"sample {key}: mask label {int(labels.max())} outside its value table")
    if values.dtype.kind not in "fiu" or not np.isfinite(values).all():
        raise SampleError(f"sample {key}: mask values (segval.npy) must be finite numbers")
    mask = np.take(values.astype(np.float32, copy=False), labels)
    return {"key": key, "hr": hr, "lr": lr, "mask": mask, "meta": meta}


def read_samples(urls: str | list[str]) -> Iterator[dict[str, Any]]:
    """Yield decoded samples (see `decode_sample`) in order from a shard folder (its tars, sorted), a path,
    a brace pattern (``train-{000000..000009}.tar``) or a list of those.

    Plain sequential reading: no node or worker splitting, so it works the same inside a distributed job.
    """
    # Imported here: the sharding job imports this module for the sample format only.
    from samdiffsr.data.shardlist import expand_shards
    from samdiffsr.data.tarread import read_shard

    sources = [urls] if isinstance(urls, str) else list(urls)
    for source in sources:
        for url in expand_shards(source):
            for raw in read_shard(url):
                yield decode_sample(raw)
