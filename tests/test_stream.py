"""Training stream: equal batches per rank, determinism, exact resume, alignment, bad data, device inputs."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from samdiffsr.config import ConfigError, DataConfig
from samdiffsr.data.augment import CropSpec, aligned_crop
from samdiffsr.data.pairs import load_val_images
from samdiffsr.data.reader import encode_mask
from samdiffsr.data.shardlist import expand_shards, shard_sizes, slot_shards
from samdiffsr.data.stream import TrainStream
from samdiffsr.imresize import imresize
from samdiffsr.models.inputs import to_model_inputs

SCALE = 4
UNEVEN = (1, 7, 2, 9, 3)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _tile(rng: np.random.Generator, h: int, w: int) -> dict[str, bytes]:
    """A sample whose HR is its LR blown up by pixel repetition, so any misalignment is visible."""
    lr = rng.integers(0, 256, (h // SCALE, w // SCALE, 3), dtype=np.uint8)
    labels = rng.integers(0, 6, lr.shape[:2]).astype(np.uint16)
    values = rng.normal(size=6).astype(np.float32)
    values[0] = 0.0
    up = lambda a: np.repeat(np.repeat(a, SCALE, 0), SCALE, 1)  # noqa: E731
    mask = {k: _npy(v) for k, v in encode_mask(up(labels), values).items()}
    return {"hr.npy": _npy(up(lr)), "lr.npy": _npy(lr), **mask, "json": json.dumps({"scale": SCALE}).encode()}


def write_shards(folder: Path, sizes=UNEVEN, tile=(32, 32), seed=0, corrupt=()) -> str:
    """Shards ``train-%06d.tar`` with ``sizes[i]`` samples and a sizes.json; ``corrupt``: (shard, index)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, n in enumerate(sizes):
        with wds.TarWriter(str(folder / f"train-{i:06d}.tar")) as sink:
            for j in range(n):
                sample = _tile(rng, *tile)
                if (i, j) in corrupt:
                    sample["hr.npy"] = b"not an npy file"
                sink.write({"__key__": f"s{i}_{j}", **sample})
    (folder / "sizes.json").write_text(json.dumps({f"train-{i:06d}.tar": n for i, n in enumerate(sizes)}))
    return str(folder / f"train-{{000000..{len(sizes) - 1:06d}}}.tar")


def make_cfg(pattern: str, **kw) -> DataConfig:
    base = DataConfig(train_shards=pattern, patch_size=16, shuffle_buffer=8, workers=0, prefetch_factor=2,
                      hflip=True, vflip=True, rot90=True)
    return replace(base, **kw)


def batches(stream: TrainStream, epoch: int = 0, skip: int = 0) -> list[dict[str, torch.Tensor]]:
    return list(stream.iter_epoch(epoch, skip))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in ("hr", "lr", "mask"))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("uneven"))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_rank_gets_the_same_batch_count_on_uneven_shards(uneven, workers):
    cfg = make_cfg(uneven, workers=workers)
    for world in (1, 2, 3):
        counts = []
        for rank in range(world):
            stream = TrainStream(cfg, batch_size=2, scale=SCALE, seed=7, rank=rank, world_size=world)
            got = batches(stream)
            assert all(b["hr"].shape == (2, 3, 16, 16) and b["hr"].dtype == torch.uint8 for b in got)
            assert all(b["lr"].shape == (2, 3, 4, 4) and b["mask"].shape == (2, 1, 16, 16) for b in got)
            counts.append((stream.epoch_batches, len(got)))
        assert counts == [(sum(UNEVEN) // (2 * world),) * 2] * world, (world, counts)


def test_resampled_and_explicit_epoch_size_also_give_equal_counts(uneven):
    cfg = make_cfg(uneven, workers=2, resampled=True, samples_per_epoch=9)
    streams = [TrainStream(cfg, batch_size=2, scale=SCALE, seed=1, rank=r, world_size=3) for r in range(3)]
    assert [len(batches(s)) for s in streams] == [4, 4, 4]


def test_shard_order_is_a_partition_shared_by_all_ranks():
    urls = [f"s{i}.tar" for i in range(12)]
    for world, workers in ((1, 1), (2, 3), (3, 2), (5, 3)):
        slots = world * workers
        first_round = []
        for rank in range(world):
            for w in range(workers):
                seq = slot_shards(urls, [1] * 12, seed=3, epoch=2, rank=rank, world_size=world, worker=w,
                                  num_workers=workers)
                # slot (rank, w) takes positions rank + world * (w + workers * j) of the epoch's list
                first = rank + world * w
                first_round += [u for j, u in zip(range(12), seq, strict=False) if first + slots * j < 12]
        assert sorted(first_round) == sorted(urls)
    def head(epoch: int) -> list[str]:
        seq = slot_shards(urls, [1] * 12, seed=3, epoch=epoch, rank=0, world_size=1, worker=0, num_workers=1)
        return [next(seq) for _ in range(12)]

    assert head(0) == head(0) and head(0) != head(1) and sorted(head(0)) == sorted(urls)


def test_stream_is_deterministic_and_differs_across_epochs_and_ranks(uneven):
    cfg = make_cfg(uneven, workers=2, crops_per_tile=2)
    stream = TrainStream(cfg, batch_size=3, scale=SCALE, seed=5, rank=0, world_size=2)
    first = batches(stream, epoch=1)

    def other(seed: int, rank: int) -> list[dict]:
        return batches(TrainStream(cfg, batch_size=3, scale=SCALE, seed=seed, rank=rank, world_size=2), 1)

    assert same(first, batches(stream, epoch=1)) and same(first, other(5, 0))
    assert not same(first, batches(stream, epoch=2))
    assert not same(first, other(5, 1)) and not same(first, other(6, 0))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("workers,crops", [(0, 1), (2, 1), (2, 3), (3, 2)])
def test_skip_batches_resumes_exactly(uneven, workers, crops):
    cfg = make_cfg(uneven, workers=workers, crops_per_tile=crops)
    stream = TrainStream(cfg, batch_size=2, scale=SCALE, seed=11, rank=1, world_size=2)
    full = batches(stream, epoch=3)
    assert len(full) == stream.epoch_batches
    for k in sorted({1, 2, 3, stream.epoch_batches - 1, stream.epoch_batches}):
        assert same(batches(stream, epoch=3, skip=k), full[k:]), k
    with pytest.raises(ValueError):
        stream.iter_epoch(3, stream.epoch_batches + 1)


def test_crops_are_aligned_on_the_scale_grid_and_augmented_identically(uneven):
    stream = TrainStream(make_cfg(uneven, crops_per_tile=2), batch_size=4, scale=SCALE, seed=0)
    for batch in batches(stream):
        up = batch["lr"].repeat_interleave(SCALE, 2).repeat_interleave(SCALE, 3)
        assert torch.equal(batch["hr"], up)  # off-grid or differently flipped crops would break this
        blocks = batch["mask"][:, :, ::SCALE, ::SCALE].repeat_interleave(SCALE, 2).repeat_interleave(SCALE, 3)
        assert torch.equal(batch["mask"], blocks)


def test_aligned_crop_applies_each_flip_and_rotation_to_all_three():
    lr = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    hr = np.repeat(np.repeat(lr, SCALE, 0), SCALE, 1)
    mask = hr[..., 0].astype(np.float32)
    spec = CropSpec(16, SCALE, hflip=True, vflip=True, rot90=True)
    # draws: y, x, hflip (< 0.5 flips), vflip, rot90 (k = floor(4u))
    plain = aligned_crop(hr, lr, mask, np.array([0.99, 0.3, 0.9, 0.9, 0.0]), spec)
    assert np.array_equal(plain[1], lr[4:8, 1:5]) and np.array_equal(plain[0], hr[16:32, 4:20])
    cases = {(0.1, 0.9, 0.0): lambda a: a[:, ::-1], (0.9, 0.1, 0.0): lambda a: a[::-1],
             (0.9, 0.9, 0.3): lambda a: np.rot90(a, 1), (0.1, 0.1, 0.8): lambda a: np.rot90(a[::-1, ::-1], 3)}
    for (h, v, r), op in cases.items():
        got = aligned_crop(hr, lr, mask, np.array([0.99, 0.3, h, v, r]), spec)
        for g, p in zip(got, plain, strict=True):
            assert np.array_equal(g, op(p))


def test_corrupt_samples_and_shards_are_skipped_counted_and_logged(tmp_path, caplog):
    pattern = write_shards(tmp_path, sizes=(4, 5, 4), corrupt={(0, 1), (2, 3)})
    with open(tmp_path / "train-000001.tar", "r+b") as f:  # cut a shard in the middle of a member
        f.truncate(os.path.getsize(tmp_path / "train-000001.tar") // 2 + 100)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    (tmp_path / "sizes.json").write_text(json.dumps({**sizes, "train-000003.tar": 3}))  # listed, but lost
    pattern = pattern.replace("000002}", "000003}")
    for workers in (0, 2):
        stream = TrainStream(make_cfg(pattern, workers=workers), batch_size=2, scale=SCALE, seed=0)
        with caplog.at_level(logging.WARNING):
            got = batches(stream)
        assert len(got) == stream.epoch_batches == 8
        assert stream.counts["bad_samples"] >= 2 and stream.counts["read_errors"] >= 2, stream.counts
    assert "corrupt sample" in caplog.text and "unreadable shard" in caplog.text
    # Each shard named once: "in PATH: what went wrong".
    truncated, lost = (str(tmp_path / f"train-00000{i}.tar") for i in (1, 3))
    read_errors = {r.getMessage() for r in caplog.records if "unreadable shard" in r.getMessage()}
    assert read_errors == {f"skipping unreadable shard data in {truncated}: truncated shard: 100-byte header, "
                           "no end-of-archive marker",
                           f"skipping unreadable shard data in {lost}: No such file or directory"}


def test_a_stream_with_no_usable_sample_raises_instead_of_spinning(tmp_path):
    pattern = write_shards(tmp_path, sizes=(2, 2), corrupt={(0, 0), (0, 1), (1, 0), (1, 1)})
    stream = TrainStream(make_cfg(pattern, shuffle_buffer=1), batch_size=1, scale=SCALE, seed=0)
    with pytest.raises(RuntimeError, match="no usable sample"):
        batches(stream)


def test_sizes_come_from_sizes_json_or_the_tar_headers(tmp_path):
    pattern = write_shards(tmp_path, sizes=(3, 2))
    urls = expand_shards(pattern)
    assert expand_shards(str(tmp_path)) == urls and shard_sizes(urls) == [3, 2]
    (tmp_path / "sizes.json").write_text(json.dumps({"train-000000.tar": 7}))
    assert shard_sizes(urls) == [7, 2]


@pytest.mark.parametrize("divisor", [255.0, 256.0])
def test_model_inputs_match_the_authors_numpy_path(uneven, divisor):
    stream = TrainStream(make_cfg(uneven, workers=1), batch_size=3, scale=SCALE, seed=2)
    batch = next(iter(stream.iter_epoch(0)))
    out = to_model_inputs(batch, "cpu", SCALE, lr_up_divisor=divisor, channels_last=True)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "img_hr": (3, 3, 16, 16), "img_lr": (3, 3, 4, 4), "img_lr_up": (3, 3, 16, 16), "mask": (3, 1, 16, 16)}
    assert all(v.dtype == torch.float32 for v in out.values())
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in out.values())
    for i in range(3):
        hr = batch["hr"][i].permute(1, 2, 0).numpy()
        lr = batch["lr"][i].permute(1, 2, 0).numpy()
        # the authors: imresize(img_lr / 256, 4), then ToTensor + Normalize(0.5, 0.5)
        want_up = imresize(lr / divisor, SCALE) * 2 - 1
        np.testing.assert_allclose(out["img_lr_up"][i].permute(1, 2, 0).numpy(), want_up, atol=2e-6)
        np.testing.assert_allclose(out["img_hr"][i].permute(1, 2, 0).numpy(), hr / 255 * 2 - 1, atol=1e-6)
        np.testing.assert_allclose(out["img_lr"][i].permute(1, 2, 0).numpy(), lr / 255 * 2 - 1, atol=1e-6)
    assert torch.equal(out["mask"], batch["mask"])
    assert to_model_inputs(batch, "cpu", SCALE)["img_hr"].is_contiguous()


def test_val_images_from_benchmark_shards_and_from_an_hr_folder(tmp_path):
    shards = tmp_path / "bench"
    write_shards(shards, sizes=(2, 1), tile=(36, 44))
    got = load_val_images(str(shards), limit=2, scale=SCALE)
    assert [g["key"] for g in got] == ["s0_0", "s0_1"]
    assert got[0]["hr"].shape == (1, 3, 36, 44) and got[0]["lr"].shape == (1, 3, 9, 11)
    assert got[0]["mask"].shape == (1, 1, 36, 44) and got[0]["mask"].abs().sum() > 0
    assert len(load_val_images(str(shards / "train-{000000..000001}.tar"), limit=0, scale=SCALE)) == 3

    folder = tmp_path / "hr"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("b.png", (30, 45)), ("a.png", (41, 33))):
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    got = load_val_images(str(folder), limit=5, scale=SCALE)
    assert [g["key"] for g in got] == ["a", "b"]
    hr = np.array(Image.open(folder / "a.png"))[:40, :32]
    assert torch.equal(got[0]["hr"][0].permute(1, 2, 0), torch.from_numpy(hr))
    assert torch.equal(got[0]["lr"][0].permute(1, 2, 0), torch.from_numpy(imresize(hr, 1 / SCALE)))
    assert got[0]["mask"].shape == (1, 1, 40, 32) and not got[0]["mask"].any()
    out = to_model_inputs(got[1], "cpu", SCALE)
    assert out["img_lr_up"].shape == out["img_hr"].shape == (1, 3, 28, 44)


def test_a_shard_listed_in_sizes_json_but_missing_is_reported_and_counted(tmp_path, caplog):
    write_shards(tmp_path, sizes=(3, 3, 3))
    (tmp_path / "train-000001.tar").unlink()
    with caplog.at_level(logging.WARNING):
        stream = TrainStream(make_cfg(str(tmp_path)), batch_size=2, scale=SCALE, seed=0)
    assert "1 of 3 shards are missing" in caplog.text and "train-000001.tar" in caplog.text
    assert stream.counts["missing_shards"] == 1
    batches(stream)
    assert stream.counts["missing_shards"] == 1 and stream.counts["read_errors"] >= 1, stream.counts
    other_rank = TrainStream(make_cfg(str(tmp_path)), batch_size=2, scale=SCALE, seed=0, rank=1, world_size=2)
    assert other_rank.counts["missing_shards"] == 0  # counted once per run: the ranks' counts are summed


@pytest.mark.parametrize("source", ["nowhere", "nowhere/train-{000000..000003}.tar"])
def test_a_nonexistent_shard_path_says_not_found(tmp_path, source):
    with pytest.raises(ConfigError, match=r"config key 'data.train_shards': shards not found: .*nowhere"):
        TrainStream(make_cfg(str(tmp_path / source)), batch_size=2, scale=SCALE, seed=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_mask_values_are_counted_as_bad_samples(tmp_path, bad):
    write_shards(tmp_path, sizes=(4,))
    rng = np.random.default_rng(1)
    with wds.TarWriter(str(tmp_path / "train-000001.tar")) as sink:
        for j in range(4):
            sample = _tile(rng, 32, 32)
            if j == 2:
                values = np.load(io.BytesIO(sample["segval.npy"])).copy()
                values[3] = bad
                sample["segval.npy"] = _npy(values)
            sink.write({"__key__": f"s1_{j}", **sample})
    (tmp_path / "sizes.json").write_text(json.dumps({"train-000000.tar": 4, "train-000001.tar": 4}))
    stream = TrainStream(make_cfg(str(tmp_path), shuffle_buffer=1), batch_size=2, scale=SCALE, seed=0)
    got = batches(stream)
    assert all(torch.isfinite(b["mask"]).all() for b in got)
    assert stream.counts["bad_samples"] >= 1, stream.counts


HUNG_WORKER = """
import multiprocessing, sys, threading, time
from samdiffsr.config import DataConfig
from samdiffsr.data.stream import TrainStream
from samdiffsr.train.stop import STOP_SIGNALS

fifo, content = sys.argv[1], open(sys.argv[2], "rb").read()

def writer():  # the shard's bytes, then a writer that never closes: the next read waits forever (a hung mount)
    sink = open(fifo, "wb")
    sink.write(content)
    sink.flush()
    time.sleep(3600)

threading.Thread(target=writer, daemon=True).start()
cfg = DataConfig(train_shards=fifo, patch_size=16, shuffle_buffer=1, workers=1, prefetch_factor=2,
                 samples_per_epoch=100)
stream = TrainStream(cfg, batch_size=1, scale=4, seed=0, worker_ignores=STOP_SIGNALS)
batches = stream.iter_epoch(0)
next(batches)  # the one sample; the worker then waits in a read while prefetching the next batch
batches.close()
print("live child processes:", len(multiprocessing.active_children()), flush=True)
"""


def test_closing_an_epoch_ends_a_worker_stuck_in_a_read_that_ignores_sigterm(tmp_path):
    # torch's shutdown asks, then sends SIGTERM, which the workers ignore: the stream must kill it.
    write_shards(tmp_path / "good", sizes=(1,))
    (tmp_path / "hung").mkdir()
    fifo = tmp_path / "hung" / "train-000000.tar"
    os.mkfifo(fifo)
    (tmp_path / "hung" / "sizes.json").write_text(json.dumps({fifo.name: 1}))
    proc = subprocess.Popen([sys.executable, "-c", HUNG_WORKER, str(fifo), str(tmp_path / "good" / fifo.name)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)  # a worker left alive blocks the exit
    finally:  # on a timeout, the stuck worker too (it would outlive its parent, blocked in the read)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err
    assert out.splitlines() == ["live child processes: 0"], (out, err)


# --- remote shards: pipe: commands and URLs, their sizes.json read the same way -----------------------
@contextlib.contextmanager
def http_server(folder: Path):
    """A real HTTP server (python's http.server) over ``folder``, in a thread; yields its base URL."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


REMOTE = {"pipe": lambda d, base: f"pipe:cat {d}/train-{{000000..000004}}.tar",
          "file": lambda d, base: f"file://{d}/train-{{000000..000004}}.tar",
          "http": lambda d, base: f"{base}/train-{{000000..000004}}.tar"}


@pytest.mark.parametrize("kind", sorted(REMOTE))
def test_remote_shard_specs_read_their_sizes_json_the_same_way_and_stream_like_local(uneven, kind):
    folder = Path(uneven).parent
    with http_server(folder) as base:
        spec = REMOTE[kind](folder, base)
        assert shard_sizes(expand_shards(spec)) == list(UNEVEN)
        remote = TrainStream(make_cfg(spec, workers=1), batch_size=2, scale=SCALE, seed=3)
        local = TrainStream(make_cfg(uneven, workers=1), batch_size=2, scale=SCALE, seed=3)
        assert remote.epoch_batches == local.epoch_batches == sum(UNEVEN) // 2
        got = batches(remote)
    assert same(got, batches(local))


def test_remote_shards_without_a_manifest_name_samples_per_epoch(tmp_path):
    spec = write_shards(tmp_path, sizes=(3, 2))
    (tmp_path / "sizes.json").unlink()
    pipe = f"pipe:cat {tmp_path}/train-{{000000..000001}}.tar"
    with pytest.raises(ConfigError, match=r"data\.samples_per_epoch") as err:
        TrainStream(make_cfg(pipe), batch_size=1, scale=SCALE, seed=0)
    assert "pipe:cat" in str(err.value) and "sizes.json" in str(err.value)
    assert shard_sizes(expand_shards(spec)) == [3, 2]  # local shards are still counted from their headers
    # with the epoch size given, no count is needed: the pipe streams, resampled shards drawn uniformly
    for resampled in (False, True):
        stream = TrainStream(make_cfg(pipe, samples_per_epoch=4, resampled=resampled), batch_size=2,
                             scale=SCALE, seed=0)
        got = batches(stream)
        assert stream.epoch_batches == 2 and len(got) == 2 and got[0]["hr"].shape == (2, 3, 16, 16)


def test_a_shard_the_remote_manifest_does_not_list_is_named(tmp_path):
    write_shards(tmp_path, sizes=(3, 2))
    (tmp_path / "sizes.json").write_text(json.dumps({"train-000000.tar": 3}))
    urls = expand_shards(f"file://{tmp_path}/train-{{000000..000001}}.tar")
    with pytest.raises(ConfigError, match=r"train-000001\.tar is unknown .*does not list it.*samples_per_epoch"):
        shard_sizes(urls)
    assert shard_sizes(urls, required=False) == [3, None]
