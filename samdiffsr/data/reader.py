"""Read samples from samdiffsr WebDataset shards.

Shard format (see shards/README.md): one sample per tile (or per whole image for benchmark sets),
stored uncompressed so that a worker spends its time on crops, not on PNG decoding:

- ``hr.npy``      uint8  H x W x 3
- ``lr.npy``      uint8  H/s x W/s x 3 (MATLAB bicubic of the WHOLE image, then cropped)
- ``seg.npy``     uint16 H x W label map (optional: absent when the sample has no mask data)
- ``segval.npy``  float32 table; the mask is ``segval[seg]`` (label 0 -> 0.0), exact float32 SPE values
- ``json``        metadata: source, tile position, image size, number of masks, masker, scale
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

SAMPLE_FIELDS = ("hr.npy", "lr.npy", "seg.npy", "segval.npy", "json")


class SampleError(ValueError):
    """A shard sample is missing a field or holds inconsistent arrays."""


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


def encode_mask(labels: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
    """The stored form of a mask map: a uint16 label map and its float32 value table."""
    if values.size > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"too many mask labels for uint16: {values.size}")
    return {"seg.npy": labels.astype(np.uint16), "segval.npy": values.astype(np.float32)}


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Turn one raw WebDataset sample (field -> bytes) into arrays.

    ``hr`` and ``lr`` are read-only views of the raw bytes (no copy): copy before writing into them.
    Returns ``{"key", "hr", "lr", "mask", "meta"}``; ``mask`` is float32 H x W at HR resolution
    (all zeros when the sample was written without masks).
    """
    key = raw.get("__key__", "?")
    for field in ("hr.npy", "lr.npy", "json"):
        if field not in raw:
            raise SampleError(f"sample {key}: missing field {field}")
    hr = _load_npy(raw["hr.npy"], key, "hr.npy")
    lr = _load_npy(raw["lr.npy"], key, "lr.npy")
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
    if "seg.npy" in raw:
        labels = _load_npy(raw["seg.npy"], key, "seg.npy")
        values = _load_npy(raw.get("segval.npy", b""), key, "segval.npy")
        if labels.shape != hr.shape[:2]:
            raise SampleError(f"sample {key}: mask {labels.shape} does not match hr {hr.shape[:2]}")
        if labels.size and int(labels.max()) >= values.size:
            raise SampleError(f"sample {key}: mask label {int(labels.max())} outside its value table")
        if values.dtype.kind not in "fiu" or not np.isfinite(values).all():
            raise SampleError(f"sample {key}: mask values (segval.npy) must be finite numbers")
        mask = np.take(values.astype(np.float32, copy=False), labels)
    else:
        mask = np.zeros(hr.shape[:2], np.float32)
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
