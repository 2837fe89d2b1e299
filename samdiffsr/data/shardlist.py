"""Which shards a (rank, worker) slot reads in an epoch, and how many samples the shards hold.

Without resampling, epoch ``e`` reads the concatenation of rounds ``r = 0, 1, ...``, each round a
permutation of all shards seeded by ``(seed, e, r)`` only, so every rank computes the same list. The list
is split by rank (position ``i`` goes to rank ``i % world_size``), then the rank's part by DataLoader
worker the same way: a true partition of each round across all slots, and an endless source for every
slot, however few shards there are (the stream cuts the epoch by batch count, not by end of data).
With resampling each slot draws shards with replacement, weighted by their sample counts.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import tarfile
from collections.abc import Iterator
from itertools import count, islice

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from samdiffsr.distributed import derive_seed

log = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"


def expand_shards(source: str) -> list[str]:
    """Shard paths from a brace pattern (``a-{000..009}.tar``), ``::``-joined list, glob, or directory.

    A directory gives its ``*.tar`` files and every shard its ``sizes.json`` lists, so that a listed shard
    that went missing is reported (:func:`missing_shards`) instead of silently left out.
    """
    if os.path.isdir(source):
        names = {os.path.basename(p) for p in glob.glob(os.path.join(source, "*.tar"))}
        names |= set(_read_sizes(source, warn=False))
        urls = [os.path.join(source, name) for name in sorted(names)]
        if not urls:
            raise FileNotFoundError(f"no shards (*.tar) in folder {source}")
        return urls
    urls = []
    for url in expand_urls(source):
        urls += sorted(glob.glob(url)) if glob.has_magic(url) else [url]
    if not urls:
        raise FileNotFoundError(f"no shards match {source!r}")
    if len(missing_shards(urls)) == len(urls):
        raise FileNotFoundError(f"shards not found: {source}")
    return urls


def missing_shards(urls: list[str]) -> list[str]:
    """The local shard paths among ``urls`` that do not exist (remote URLs and pipes are not checked)."""
    return [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]


def _read_sizes(folder: str, warn: bool = True) -> dict:
    """``folder/sizes.json`` ({shard basename: count}); empty (with a warning) when absent or unreadable."""
    path = os.path.join(folder, SIZES_FILE)
    try:
        with open(path) as f:
            sizes = json.load(f)
        if not isinstance(sizes, dict):
            raise ValueError("not a mapping")
        return sizes
    except (OSError, ValueError) as exc:
        if warn:
            log.warning("no usable %s (%s): counting shards from their headers", path, exc)
        return {}


def _count_tar(url: str) -> int:
    """Samples in a tar, from its headers (for shards written without a sizes.json)."""
    try:
        with tarfile.open(url, "r:") as tar:
            keys = {base_plus_ext(m.name)[0] for m in tar.getmembers() if m.isreg()}
    except (OSError, tarfile.TarError) as exc:
        log.warning("shard %s cannot be counted (%s); counting it as empty", url, exc)
        return 0
    keys.discard(None)
    return len(keys)


def shard_sizes(urls: list[str]) -> list[int]:
    """Sample count per shard from ``sizes.json`` ({shard basename: count}) next to the shards.

    Shards missing from it are counted from their tar headers, with a warning.
    """
    manifests: dict[str, dict] = {}
    sizes = []
    for url in urls:
        folder = os.path.dirname(url)
        if folder not in manifests:
            manifests[folder] = _read_sizes(folder)
        n = manifests[folder].get(os.path.basename(url))
        sizes.append(int(n) if isinstance(n, int) else _count_tar(url))
    return sizes


def _rounds(urls: list[str], seed: int, epoch: int) -> Iterator[str]:
    for r in count():
        order = list(urls)
        random.Random(derive_seed(seed, epoch, r)).shuffle(order)
        yield from order


def slot_shards(
    urls: list[str], sizes: list[int], *, seed: int, epoch: int, rank: int, world_size: int,
    worker: int, num_workers: int, resampled: bool = False,
) -> Iterator[str]:
    """The endless shard sequence of one (rank, worker) slot in one epoch (see the module docstring)."""
    if resampled:
        rng = random.Random(derive_seed(seed, epoch, rank, world_size, worker, num_workers, 1))
        weights = sizes if sum(sizes) > 0 else None
        while True:
            yield rng.choices(urls, weights=weights)[0]
    by_rank = islice(_rounds(urls, seed, epoch), rank, None, world_size)
    yield from islice(by_rank, worker, None, num_workers)
