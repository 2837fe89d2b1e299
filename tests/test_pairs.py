"""Held-out pairs: a folder of HR images and benchmark shards of the same images give the same pairs, for
the benchmark's rank shares and for training's validation batches."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from samdiffsr.data.pairs import SetError, SetSource, load_share, load_val_images
from samdiffsr.evaluation.sets import parse_set
from samdiffsr.imresize import imresize

SCALE = 4
SIZES = {"a": (41, 37), "b": (48, 64), "c": (50, 44)}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {k: rng.integers(0, 256, hw + (3,), dtype=np.uint8) for k, hw in SIZES.items()}


def make_sets(root: Path) -> tuple[Path, Path]:
    """The same images as an HR folder and as benchmark shards written the way make_shards does."""
    folder, shards = root / "folder", root / "shards"
    folder.mkdir()
    shards.mkdir()
    with wds.TarWriter(str(shards / "test-000000.tar")) as sink:
        for key, img in _images().items():
            Image.fromarray(img).save(folder / f"{key}.png")
            h, w = img.shape[0] - img.shape[0] % SCALE, img.shape[1] - img.shape[1] % SCALE
            hr = np.ascontiguousarray(img[:h, :w])
            sink.write({"__key__": key, "hr.npy": _npy(hr), "lr.npy": _npy(imresize(hr, 1 / SCALE)),
                        "json": json.dumps({"source": key}).encode()})
    return folder, shards


def test_a_folder_and_its_shards_give_identical_pairs_and_ranks_split_them(tmp_path):
    folder, shards = make_sets(tmp_path)
    assert parse_set(str(folder)).kind == "folder" and parse_set(str(shards)).kind == "shards"
    for multiple in (SCALE, 2 * SCALE):
        keys_f, all_f = load_share(parse_set(f"F={folder}"), SCALE, multiple)
        keys_s, all_s = load_share(parse_set(f"S={shards}"), SCALE, multiple)
        assert keys_f == keys_s == ["a", "b", "c"]
        for f, s in zip(all_f, all_s, strict=True):
            assert (f.index, f.key) == (s.index, s.key)
            assert np.array_equal(f.hr, s.hr) and np.array_equal(f.lr, s.lr)
            assert f.hr.shape[0] % multiple == 0 and f.hr.shape[1] % multiple == 0
            assert f.hr.shape[0] == f.lr.shape[0] * SCALE and f.hr.shape[1] == f.lr.shape[1] * SCALE
    shares = [load_share(parse_set(str(folder)), SCALE, SCALE, rank, 2) for rank in range(2)]
    assert all(keys == ["a", "b", "c"] for keys, _ in shares)
    assert [[p.index for p in mine] for _, mine in shares] == [[0, 2], [1]]


def test_validation_batches_match_the_benchmark_pairs(tmp_path):
    folder, shards = make_sets(tmp_path)
    _, pairs = load_share(parse_set(str(folder)), SCALE, SCALE)
    for source in (folder, shards):
        got = load_val_images(str(source), limit=0, scale=SCALE)
        assert [g["key"] for g in got] == ["a", "b", "c"]
        for g, p in zip(got, pairs, strict=True):
            assert np.array_equal(g["hr"][0].permute(1, 2, 0).numpy(), p.hr)
            assert np.array_equal(g["lr"][0].permute(1, 2, 0).numpy(), p.lr)
            assert g["mask"].shape == (1, 1, *p.hr.shape[:2]) and not g["mask"].any()
    assert [g["key"] for g in load_val_images(str(folder), limit=2, scale=SCALE)] == ["a", "b"]


def test_unusable_sets_are_named_in_the_error(tmp_path):
    folder, _ = make_sets(tmp_path)
    (folder / "a.jpg").write_bytes((folder / "a.png").read_bytes())
    with pytest.raises(SetError, match="a.jpg and a.png have the same name"):
        load_share(parse_set(str(folder)), SCALE, SCALE)
    (folder / "a.jpg").unlink()
    (folder / "d.png").write_bytes(b"not a png")
    with pytest.raises(SetError, match=r"benchmark set F: .*d.png: not an image"):
        load_share(parse_set(f"F={folder}"), SCALE, SCALE)
    (folder / "d.png").unlink()
    Image.fromarray(np.zeros((3, 9, 3), np.uint8)).save(folder / "d.png")
    with pytest.raises(SetError, match=r"validation image .*d.png is smaller than the scale 4"):
        load_val_images(str(folder), limit=0, scale=SCALE)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SetError, match="holds no images"):
        load_share(SetSource("E", str(empty), "folder"), SCALE, SCALE)
    with pytest.raises(FileNotFoundError, match="no shards"):
        load_val_images(str(empty), limit=0, scale=SCALE)
