"""Which shards a (rank, worker) slot reads in an epoch, and how many samples the shards hold.

Without resampling, epoch ``e`` reads the concatenation of rounds ``r = 0, 1, ...``, each round a
permutation of all shards seeded by ``(seed, e, r)`` only, so every rank computes the same list. The list
is split by rank (position ``i`` goes to rank ``i % world_size``), then the rank's part by DataLoader
worker the same way: a true partition of each round across all slots, and an endless source for every
slot, however few shards there are (the stream cuts the epoch by batch count, not by end of data).
With resampling each slot draws shards with replacement, weighted by their sample counts.

Sample counts come from the ``sizes.json`` next to the shards, read the same way as the shards: a local
file, through the same URL (``file://``, ``http(s)://``, ... with webdataset's ``gopen``), or through the same
``pipe:`` command with the shard's file name replaced by ``sizes.json`` (``pipe:curl -s https://host/x/
train-000000.tar`` -> ``pipe:curl -s https://host/x/sizes.json``). Local shards it does not list are counted
from their tar headers; remote ones cannot be counted without reading them whole, so when their count is
needed (``data.samples_per_epoch: 0``) the error names ``data.samples_per_epoch``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import re
import tarfile
from collections.abc import Iterator
from itertools import count, islice

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from samdiffsr.cli import describe_os_error
from samdiffsr.config import ConfigError
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


def is_local(url: str) -> bool:
    """A plain file path (not a ``pipe:`` command nor a ``scheme://`` URL)."""
    return "://" not in url and not url.startswith(("pipe:", "file:"))


def missing_shards(urls: list[str]) -> list[str]:
    """The local shard paths among ``urls`` that do not exist (remote URLs and pipes are not checked)."""
    return [u for u in urls if is_local(u) and not os.path.exists(u)]


_PIPE_SHARD = re.compile(r"([^\s'\"/]+\.tar)(?![\w.])")


def manifest_of(url: str) -> tuple[str, str] | None:
    """(where the shard's ``sizes.json`` is, the shard's name in it), read the same way as the shard.

    None for a ``pipe:`` command without a ``*.tar`` name in it.
    """
    if is_local(url):
        return os.path.join(os.path.dirname(url), SIZES_FILE), os.path.basename(url)
    if url.startswith("pipe:"):
        found = list(_PIPE_SHARD.finditer(url))
        if not found:
            return None
        last = found[-1]
        return url[:last.start()] + SIZES_FILE + url[last.end():], last.group(1)
    head, _, name = url.partition("?")[0].rpartition("/")
    return f"{head}/{SIZES_FILE}", name


def _read_sizes(folder: str, warn: bool = True) -> dict:
    """``folder/sizes.json`` ({shard basename: count}); empty (with a warning) when absent or unreadable."""
    return _read_manifest(os.path.join(folder, SIZES_FILE), warn=warn)[0]


def _read_manifest(where: str, warn: bool = True) -> tuple[dict, str]:
    """({shard name: count}, "" or why it is unusable) of a ``sizes.json`` path, URL or pipe command."""
    try:
        with open(where, "rb") if is_local(where) else gopen(where) as f:
            sizes = json.loads(f.read())
        if not isinstance(sizes, dict):
            raise ValueError("not a mapping")
        return sizes, ""
    except (OSError, ValueError) as exc:
        if warn and is_local(where):
            log.warning("no usable %s (%s): counting shards from their headers", where, exc)
        status = re.search(r": exit (\d+) \(read\)", str(exc))  # webdataset's Pipe: the command failed
        why = (f"the command exited with status {status.group(1)}" if status
               else describe_os_error(exc) if isinstance(exc, OSError) else str(exc))
        return {}, " ".join(why.split()) or type(exc).__name__


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


def shard_sizes(urls: list[str], required: bool = True) -> list[int | None]:
    """Sample count per shard from the ``sizes.json`` ({shard name: count}) next to the shards.

    Local shards missing from it are counted from their tar headers. A remote shard (URL or ``pipe:``)
    missing from it is None, or, when ``required``, a `ConfigError` naming ``data.samples_per_epoch``.
    """
    manifests: dict[str, tuple[dict, str]] = {}
    sizes: list[int | None] = []
    for url in urls:
        where, name = manifest_of(url) or (None, None)
        if where is not None and where not in manifests:
            manifests[where] = _read_manifest(where)
        listed, why = manifests.get(where, ({}, "no *.tar name in the command to put sizes.json in place of"))
        n = listed.get(name)
        if isinstance(n, int):
            sizes.append(n)
        elif is_local(url):
            sizes.append(_count_tar(url))
        elif required:
            problem = (why if where is None else f"no readable {where}: {why}" if why
                       else f"{where} does not list it")
            raise ConfigError(f"the sample count of shard {url} is unknown ({problem}): set "
                              f"data.samples_per_epoch (crops per rank per epoch), or put the sizes.json that "
                              f"make_shards writes next to the shards")
        else:
            sizes.append(None)
    return sizes


def _rounds(urls: list[str], seed: int, epoch: int) -> Iterator[str]:
    for r in count():
        order = list(urls)
        random.Random(derive_seed(seed, epoch, r)).shuffle(order)
        yield from order


def slot_shards(
    urls: list[str], sizes: list[int | None], *, seed: int, epoch: int, rank: int, world_size: int,
    worker: int, num_workers: int, resampled: bool = False,
) -> Iterator[str]:
    """The endless shard sequence of one (rank, worker) slot in one epoch (see the module docstring)."""
    if resampled:
        rng = random.Random(derive_seed(seed, epoch, rank, world_size, worker, num_workers, 1))
        weights = sizes if None not in sizes and sum(sizes) > 0 else None  # unknown counts: uniform
        while True:
            yield rng.choices(urls, weights=weights)[0]
    by_rank = islice(_rounds(urls, seed, epoch), rank, None, world_size)
    yield from islice(by_rank, worker, None, num_workers)
