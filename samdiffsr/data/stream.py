"""The training stream: shards -> shuffled tiles -> aligned random crops -> uint8 batches.

What a rank sees is a pure function of (seed, epoch, rank, world size, DataLoader worker count, data
config), so resuming needs the same world size, ``data.workers`` and batch size. Every rank makes the same
``epoch_batches``; the DataLoader takes the workers' batches round robin (global batch ``g`` is batch
``g // W`` of logical worker ``g % W``), which is what lets ``iter_epoch(epoch, skip_batches=k)`` resume
exactly. How an epoch is built and cut, resume costs, memory, bad data and signals: docs/data.md. With
``data.cache_dir`` each shard is read from a node-local copy made on first use (data/cache.py, docs/scaling.md).
"""

from __future__ import annotations

import logging
import random
import signal
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from samdiffsr.cli import UserError
from samdiffsr.config import ConfigError, DataConfig
from samdiffsr.data.augment import CROP_DRAWS, CropSpec, aligned_crop, collate, fits
from samdiffsr.data.cache import ShardCache
from samdiffsr.data.reader import decode_sample
from samdiffsr.data.shardlist import expand_shards, missing_shards, shard_sizes, slot_shards
from samdiffsr.data.tarread import read_shard
from samdiffsr.distributed import derive_seed

log = logging.getLogger(__name__)

COUNT_KEYS = ("bad_samples", "read_errors", "small_tiles", "missing_shards")
_BAD, _READ, _SMALL = range(3)
# Stream ids mixed into the seeds so that each random stream of a slot is independent.
_SAMPLE_SHUFFLE, _CROPS, _CROP_SHUFFLE = 2, 3, 4


def worker_batches(epoch_batches: int, workers: int, worker: int) -> int:
    """Batches logical worker ``worker`` of ``workers`` makes in an epoch (the remainder goes first)."""
    return epoch_batches // workers + (worker < epoch_batches % workers)


def buffer_shuffle(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``size`` items with a given RNG (deterministic)."""
    if size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        k = rng.randrange(size)
        yield buf[k]
        buf[k] = item
    rng.shuffle(buf)
    yield from buf


@dataclass(frozen=True)
class _StreamSettings:
    """A rank's stream settings, handed to each DataLoader worker to build its part of an epoch (picklable,
    no open files)."""

    urls: tuple[str, ...]
    sizes: tuple[int | None, ...]  # None: a remote shard sizes.json does not list
    spec: CropSpec
    batch_size: int
    crops_per_tile: int
    shuffle_buffer: int
    resampled: bool
    seed: int
    rank: int
    world_size: int
    epoch_batches: int
    cache_dir: str = ""  # data.cache_dir: node-local shard copies (data/cache.py); empty: read the shards


class DataError(UserError, RuntimeError):
    """The shards gave no usable sample for many shards in a row (one line, exit 2)."""


class _DryGuard:
    """Raise when many shards in a row gave no usable tile: no data at all is an error, not a skip."""

    def __init__(self, limit: int) -> None:
        self.limit, self.shards_since_tile = limit, 0

    def watch(self, urls: Iterable[str]) -> Iterator[str]:
        for url in urls:
            self.shards_since_tile += 1
            if self.shards_since_tile > self.limit:
                raise DataError(f"config key 'data.train_shards': {self.limit} shard reads in a row gave no "
                                f"usable sample (last: {url})")
            yield url


def _raw_samples(urls: Iterable[str], counts: np.ndarray, cache: ShardCache | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples of consecutive shards (from their node-local copies with a cache); an unreadable or damaged
    shard ends early, counted."""
    for url in urls:
        try:
            yield from read_shard(cache.local(url) if cache else url, source=url)
        except Exception as exc:  # missing file, I/O error, truncated or garbled tar: never a crash
            counts[_READ] += 1
            log.warning("skipping unreadable shard data in %s: %s", url, _without_url(exc, url))


def _without_url(exc: BaseException, url: str) -> str:
    """The error's text without the shard's path (a format error starts with it, an OSError ends with it)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return text[len(url) + 2:] if text.startswith(f"{url}: ") else text


def _tiles(settings: _StreamSettings, key: tuple[int, ...], worker: int, workers: int,
           counts: np.ndarray) -> Iterator[dict]:
    """Decoded, valid tiles of one slot (``key`` = seed, epoch, rank, world size, worker, workers)."""
    shards = slot_shards(list(settings.urls), list(settings.sizes), seed=settings.seed, epoch=key[1],
                         rank=settings.rank, world_size=settings.world_size, worker=worker, num_workers=workers,
                         resampled=settings.resampled)
    guard = _DryGuard(10 * len(settings.urls) + settings.shuffle_buffer + 100)
    raw = _raw_samples(guard.watch(shards), counts, ShardCache(settings.cache_dir) if settings.cache_dir else None)
    for sample in buffer_shuffle(raw, settings.shuffle_buffer, random.Random(derive_seed(*key, _SAMPLE_SHUFFLE))):
        try:
            tile = decode_sample(sample)
        except Exception as exc:  # any decode failure is a bad sample, never a crash
            counts[_BAD] += 1
            log.warning("skipping corrupt sample %s from %s: %s",
                        sample.get("__key__"), sample.get("__url__"), exc)
            continue
        if tile["hr"].shape[0] != tile["lr"].shape[0] * settings.spec.scale:
            counts[_BAD] += 1
            log.warning("skipping sample %s: its scale is not %d", tile["key"], settings.spec.scale)
            continue
        if not fits(tile["hr"].shape, settings.spec):
            counts[_SMALL] += 1
            log.warning("skipping sample %s: %s is smaller than the patch", tile["key"], tile["hr"].shape[:2])
            continue
        guard.shards_since_tile = 0
        yield tile


def _crops(settings: _StreamSettings, epoch: int, worker: int, workers: int, counts: np.ndarray) -> Iterator[tuple]:
    """The endless crop stream of one logical worker (views into decoded tiles)."""
    key = (settings.seed, epoch, settings.rank, settings.world_size, worker, workers)
    rng = np.random.default_rng(derive_seed(*key, _CROPS))
    c = settings.crops_per_tile

    def crops() -> Iterator[tuple]:
        for tile in _tiles(settings, key, worker, workers, counts):
            for draws in rng.random((c, CROP_DRAWS)):
                yield aligned_crop(tile["hr"], tile["lr"], tile["mask"], draws, settings.spec)

    if c == 1:
        return crops()
    return buffer_shuffle(crops(), 2 * c * settings.batch_size, random.Random(derive_seed(*key, _CROP_SHUFFLE)))


class _EpochDataset(IterableDataset):
    """One epoch from batch ``skip`` on: physical worker ``p`` of ``W`` plays logical worker ``(skip + p) % W``
    from its local batch ``(skip + p) // W``, so the round robin yields batches ``skip, skip + 1, ...``."""

    def __init__(self, settings: _StreamSettings, epoch: int, skip: int) -> None:
        super().__init__()
        self.settings, self.epoch, self.skip = settings, epoch, skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, physical = (info.num_workers, info.id) if info else (1, 0)
        worker, local_skip = (self.skip + physical) % workers, (self.skip + physical) // workers
        todo = worker_batches(self.settings.epoch_batches, workers, worker) - local_skip
        counts = np.zeros(len(COUNT_KEYS), np.int64)
        b = self.settings.batch_size
        crops = islice(_crops(self.settings, self.epoch, worker, workers, counts), local_skip * b, None)
        for _ in range(max(todo, 0)):
            try:
                batch: dict[str, Any] = collate(list(islice(crops, b)), self.settings.spec)
            except DataError as exc:  # handed over as data: torch re-raises a worker's error as multi-line text
                yield {"error": f"{exc}; skipped: {counts[_BAD]} corrupt samples, {counts[_READ]} unreadable "
                                f"shards, {counts[_SMALL]} tiles smaller than the patch (see the warnings above)"}
                return
            batch["worker"] = worker
            # Cumulative for this worker and epoch; plain ints travel inline, not as shared-memory tensors.
            batch["counts"] = tuple(int(c) for c in counts)
            yield batch


def _ignore_signals(signums: tuple[signal.Signals, ...], worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: ignore ``signums``, then unblock them (blocked at the workers' start)."""
    for s in signums:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)


class TrainStream:
    """Per-rank training batches: ``epoch_batches`` (equal on all ranks) and ``iter_epoch``.

    Batches are dicts: ``hr`` B x 3 x P x P uint8, ``lr`` B x 3 x P/s x P/s uint8, ``mask`` B x 1 x P x P
    float32 (uint8 images: 4x less to copy between processes and to pin); `models.inputs.to_model_inputs`
    turns one into model inputs on the device.
    ``counts`` holds the skipped bad samples / read errors / small tiles seen so far by this object.
    """

    def __init__(self, data_cfg: DataConfig, *, batch_size: int, scale: int, seed: int, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False,
                 worker_ignores: tuple[signal.Signals, ...] = ()) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        if data_cfg.crops_per_tile < 1 or data_cfg.workers < 0:
            raise ValueError("data.crops_per_tile must be >= 1 and data.workers >= 0")
        try:
            urls = expand_shards(data_cfg.train_shards)
        except FileNotFoundError as exc:
            raise ConfigError(f"config key 'data.train_shards': {exc}") from exc
        missing = missing_shards(urls)
        if missing:  # listed (sizes.json, pattern) but absent: each read of it is also a counted read error
            log.warning("%d of %d shards are missing: %s%s", len(missing), len(urls), ", ".join(missing[:5]),
                        " ..." if len(missing) > 5 else "")
        sizes = shard_sizes(urls, required=data_cfg.samples_per_epoch <= 0)  # remote: see shardlist
        if data_cfg.samples_per_epoch > 0:
            per_rank = data_cfg.samples_per_epoch
        elif sum(sizes) == 0:
            raise ValueError(f"the shards {data_cfg.train_shards!r} hold no samples")
        else:
            per_rank = sum(sizes) * data_cfg.crops_per_tile // world_size
        self.epoch_batches = max(1, per_rank // batch_size)
        self.workers = data_cfg.workers
        self.prefetch_factor = data_cfg.prefetch_factor
        self.pin_memory = pin_memory
        self.worker_ignores = tuple(worker_ignores)
        self.counts = dict.fromkeys(COUNT_KEYS, 0)
        self.counts["missing_shards"] = len(missing) if rank == 0 else 0  # summed over ranks when logged
        spec = CropSpec(data_cfg.patch_size, scale, data_cfg.hflip, data_cfg.vflip, data_cfg.rot90)
        self._settings = _StreamSettings(tuple(urls), tuple(sizes), spec, batch_size, data_cfg.crops_per_tile,
                           data_cfg.shuffle_buffer, data_cfg.resampled, seed, rank, world_size,
                           self.epoch_batches, data_cfg.cache_dir)

    def iter_epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``skip_batches .. epoch_batches - 1`` of ``epoch``, identical to an uninterrupted run."""
        if epoch < 0 or not 0 <= skip_batches <= self.epoch_batches:
            raise ValueError(f"epoch {epoch} / skip_batches {skip_batches} outside 0..{self.epoch_batches}")
        loader = DataLoader(
            _EpochDataset(self._settings, epoch, skip_batches), batch_size=None, num_workers=self.workers,
            pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor if self.workers else None,
            worker_init_fn=partial(_ignore_signals, self.worker_ignores) if self.worker_ignores else None,
        )
        return self._counted(loader)

    def _counted(self, loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
        before = dict(self.counts)
        latest: dict[int, tuple[int, ...]] = {}
        # Starting the iterator starts the workers: they inherit the blocked mask until _ignore_signals.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.worker_ignores)
        try:
            batches = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        try:
            for batch in batches:
                if "error" in batch:
                    raise DataError(batch["error"])
                latest[batch.pop("worker")] = batch.pop("counts")
                now = [sum(c[i] for c in latest.values()) for i in range(len(COUNT_KEYS))]
                self.counts = {k: before[k] + n for k, n in zip(COUNT_KEYS, now, strict=True)}
                yield batch
        finally:  # closed, done or failed: the workers end now, not whenever the iterator is collected
            _shut_down(batches)


def _shut_down(batches: Iterator[Any]) -> None:
    """End a DataLoader iterator's workers; one that outlives torch's shutdown (SIGTERM is ignored) is killed."""
    if not hasattr(batches, "_shutdown_workers"):  # data.workers=0
        return
    batches._shutdown_workers()
    for worker in batches._workers:
        if worker.is_alive():
            worker.kill()
            worker.join()
