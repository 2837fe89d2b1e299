"""Shard encodings and the node-local shard cache through the real training stream: format 1 (npy) and
format 2 (zstd) give the same batches, the cache gives the same batches as the shards, later epochs read only
the cache, and resuming stays exact."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from samdiffsr.config import DataConfig, load_config
from samdiffsr.data.cache import ShardCache
from samdiffsr.data.reader import encode_arrays
from samdiffsr.data.stream import TrainStream

SCALE, SIZES = 4, (5, 3, 6, 2)


def write_shards(folder: Path, encoding: str, seed: int = 0) -> Path:
    """Shards of tiles whose HR is the LR blown up by pixel repetition (a misaligned crop would show), with a
    300-entry value table in shard 0 (uint16 labels) and small ones elsewhere (uint8 labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    up = lambda a: np.repeat(np.repeat(a, SCALE, 0), SCALE, 1)  # noqa: E731
    for i, n in enumerate(SIZES):
        with wds.TarWriter(str(folder / f"train-{i:06d}.tar")) as sink:
            for j in range(n):
                lr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                count = 300 if i == 0 else 7
                values = rng.normal(size=count).astype(np.float32)
                values[0] = 0.0
                labels = up(rng.integers(0, count, (8, 8)))
                fields = encode_arrays(up(lr), lr, labels, values, encoding=encoding)
                sink.write({"__key__": f"s{i}_{j}", **fields, "json": json.dumps({"scale": SCALE}).encode()})
    (folder / "sizes.json").write_text(json.dumps({f"train-{i:06d}.tar": n for i, n in enumerate(SIZES)}))
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("enc")
    return {enc: write_shards(root / enc, enc) for enc in ("npy", "zstd")}


def stream(folder: Path, workers: int = 2, crops: int = 2, **kw) -> TrainStream:
    cfg = DataConfig(train_shards=str(folder), patch_size=16, shuffle_buffer=6, workers=workers, prefetch_factor=2,
                     crops_per_tile=crops, **kw)
    return TrainStream(cfg, batch_size=2, scale=SCALE, seed=3, rank=1, world_size=2)


def batches(s: TrainStream, epoch: int = 0, skip: int = 0) -> list[dict]:
    return list(s.iter_epoch(epoch, skip))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True)
                                        for k in ("hr", "lr", "mask"))


def test_both_encodings_give_the_same_batches_and_format_2_is_smaller(shards):
    fields = {e: {n.split(".", 1)[1] for n, _ in _members(shards[e] / "train-000000.tar")} for e in shards}
    assert fields == {"npy": {"hr.npy", "lr.npy", "seg.npy", "segval.npy", "json"},
                      "zstd": {"hr.npy.zst", "lr.npy.zst", "seg.npy.zst", "segval.npy", "json"}}
    for epoch in (0, 1):
        zstd = batches(stream(shards["zstd"]), epoch)
        assert zstd and same(batches(stream(shards["npy"]), epoch), zstd)
    size = {e: sum(p.stat().st_size for p in shards[e].glob("*.tar")) for e in shards}
    assert size["zstd"] < size["npy"]


def _members(tar: Path) -> list[tuple[str, int]]:
    import tarfile

    with tarfile.open(tar) as t:
        return [(m.name, m.size) for m in t.getmembers()]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("workers,crops", [(0, 1), (2, 3), (3, 2)])
def test_format_2_resumes_exactly(shards, workers, crops):
    s = stream(shards["zstd"], workers, crops)
    full = batches(s, epoch=2)
    assert len(full) == s.epoch_batches
    for k in sorted({1, 2, s.epoch_batches - 1, s.epoch_batches}):
        assert same(batches(s, 2, k), full[k:]), k


def test_cached_reads_equal_uncached_and_later_epochs_need_no_source(shards, tmp_path):
    source = tmp_path / "shared"
    shutil.copytree(shards["zstd"], source)
    cache = tmp_path / "local"
    plain = stream(shards["zstd"])
    cached = stream(source, cache_dir=str(cache))
    assert same(batches(cached, 0), batches(plain, 0))
    copies = sorted(p.name for p in cache.glob("*.tar"))
    assert len(copies) == len(SIZES) and not list(cache.glob("*.tmp"))
    for p in cache.glob("*.tar"):  # whole, byte-identical copies with the source's mtime
        src = source / p.name.split("-", 1)[1]
        assert p.read_bytes() == src.read_bytes() and p.stat().st_mtime_ns == src.stat().st_mtime_ns
    source.rename(tmp_path / "gone")  # the shared file system is away: epochs 1 and 2 come from the cache
    assert same(batches(cached, 1), batches(plain, 1))
    full = batches(cached, 2)
    assert same(full, batches(plain, 2)) and cached.counts["read_errors"] == 0
    for k in (1, cached.epoch_batches - 1):  # resuming from the cache is exact too
        assert same(batches(cached, 2, k), full[k:]), k
    assert sorted(p.name for p in cache.glob("*.tar")) == copies


def test_a_rewritten_source_shard_is_copied_again(tmp_path):
    src = tmp_path / "a.tar"
    src.write_bytes(b"first version")
    cache = ShardCache(tmp_path / "cache")
    first = cache.local(str(src))
    assert first != str(src) and Path(first).read_bytes() == b"first version"
    src.write_bytes(b"second, longer version")
    assert cache.local(str(src)) == first and Path(first).read_bytes() == b"second, longer version"
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.tar").write_bytes(b"same name, other folder")
    assert Path(cache.local(str(other / "a.tar"))).read_bytes() == b"same name, other folder"
    assert cache.local(str(tmp_path / "missing.tar")) == str(tmp_path / "missing.tar")  # reported by the reader


def _copy_in_process(args: tuple[str, str]) -> tuple[str, int]:
    folder, url = args
    path = ShardCache(folder).local(url)
    return path, os.getpid()


def test_processes_of_one_node_share_one_whole_copy(tmp_path):
    src = tmp_path / "big.tar"
    src.write_bytes(os.urandom(8 << 20))
    with multiprocessing.get_context("fork").Pool(4) as pool:
        got = pool.map(_copy_in_process, [(str(tmp_path / "cache"), str(src))] * 8)
    paths = {p for p, _ in got}
    assert len(paths) == 1 and Path(paths.pop()).read_bytes() == src.read_bytes()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == \
        [ShardCache(tmp_path / "cache").entry(str(src)).name]


def test_an_unusable_cache_folder_falls_back_to_the_source_with_one_warning(shards, tmp_path, caplog):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="samdiffsr.data.cache"):
        got = batches(stream(shards["zstd"], workers=0, cache_dir=str(blocker / "cache")))
    assert same(got, batches(stream(shards["zstd"], workers=0)))
    warnings = [r.getMessage() for r in caplog.records if "data.cache_dir" in r.getMessage()]
    assert len(warnings) == 1 and "reading shards from their source" in warnings[0]


def test_cache_dir_is_a_config_key(tmp_path):
    cfg = load_config(None, [f"data.cache_dir={tmp_path}"])
    assert cfg.data.cache_dir == str(tmp_path) and replace(cfg.data, cache_dir="").cache_dir == ""
