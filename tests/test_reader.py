"""Shard sample encoding and decoding (formats 1 and 2): exact round trip and errors that name the sample and
field."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
import zstandard
from skimage import data

from samdiffsr.data.reader import SampleError, decode_sample, encode_arrays, encode_mask, field_array, read_samples


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def raw_sample(key="img_0_0"):
    hr = data.astronaut()[:64, :64]
    lr = hr[::4, ::4].copy()
    labels = np.zeros((64, 64), np.uint16)
    labels[10:30, 5:50] = 2
    labels[40:, :] = 1
    values = np.array([0.0, -0.0123, 0.4567], np.float32)
    stored = encode_mask(labels, values)
    return {"__key__": key, "hr.npy": npy(hr), "lr.npy": npy(lr), "seg.npy": npy(stored["seg.npy"]),
            "segval.npy": npy(stored["segval.npy"]), "json": json.dumps({"source": "a.png"}).encode()}, hr, lr, \
        values[labels]


def test_decode_round_trip_is_exact():
    raw, hr, lr, mask = raw_sample()
    sample = decode_sample(raw)
    assert sample["key"] == "img_0_0" and sample["meta"] == {"source": "a.png"}
    assert np.array_equal(sample["hr"], hr) and np.array_equal(sample["lr"], lr)
    assert sample["mask"].dtype == np.float32 and np.array_equal(sample["mask"], mask)


def test_sample_without_mask_gets_zeros():
    raw, *_ = raw_sample()
    del raw["seg.npy"], raw["segval.npy"]
    assert not decode_sample(raw)["mask"].any()


@pytest.mark.parametrize("damage, fragment", [
    (lambda r: r.pop("hr.npy"), "missing field hr.npy"),
    (lambda r: r.__setitem__("lr.npy", r["lr.npy"][:100]), "field lr.npy is not a valid .npy"),
    (lambda r: r.__setitem__("hr.npy", b"not an array at all"), "field hr.npy is not a valid .npy"),
    (lambda r: r.__setitem__("json", b"{broken"), "metadata is not valid JSON"),
    (lambda r: r.__setitem__("lr.npy", npy(np.zeros((15, 16, 3), np.uint8))), "not an integer multiple"),
    (lambda r: r.__setitem__("segval.npy", npy(np.zeros(2, np.float32))), "outside its value table"),
    (lambda r: r.__setitem__("seg.npy", npy(np.zeros((8, 8), np.uint16))), "does not match hr"),
])
def test_corrupt_fields_name_sample_and_field(damage, fragment):
    raw, *_ = raw_sample("bad_key")
    damage(raw)
    with pytest.raises(SampleError) as err:
        decode_sample(raw)
    assert "bad_key" in str(err.value) and fragment in str(err.value)


def test_read_samples_from_a_real_tar(tmp_path):
    path = str(tmp_path / "train-000000.tar")
    with wds.TarWriter(path) as writer:
        for i in range(3):
            raw, *_ = raw_sample(f"img_{i}")
            writer.write(raw)
    keys = [s["key"] for s in read_samples(path)]
    assert keys == ["img_0", "img_1", "img_2"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_mask_values_are_rejected(bad):
    raw, *_ = raw_sample("tile_7")
    values = np.array([0.0, bad, 0.5], np.float32)
    raw["segval.npy"] = npy(values)
    with pytest.raises(SampleError, match=r"sample tile_7: mask values \(segval.npy\) must be finite"):
        decode_sample(raw)


def arrays(table_size: int):
    rng = np.random.default_rng(table_size)
    hr = data.astronaut()[:64, :64]
    labels = rng.integers(0, table_size, (64, 64))
    labels[0, 0] = table_size - 1
    values = rng.normal(size=table_size).astype(np.float32)
    values[0] = 0.0
    return hr, hr[::4, ::4].copy(), labels, values


@pytest.mark.parametrize("table_size, label_dtype", [(2, np.uint8), (256, np.uint8), (257, np.uint16)])
def test_both_encodings_round_trip_exactly_and_name_their_fields(table_size, label_dtype):
    hr, lr, labels, values = arrays(table_size)
    for encoding, ext in (("npy", ".npy"), ("zstd", ".npy.zst")):
        fields = encode_arrays(hr, lr, labels, values, encoding=encoding)
        assert sorted(fields) == sorted([f"hr{ext}", f"lr{ext}", f"seg{ext}", "segval.npy"])
        raw = {"__key__": "k", **fields, "json": b"{}"}
        assert field_array(raw, "seg").dtype == (label_dtype if encoding == "zstd" else np.uint16)
        got = decode_sample(raw)
        assert np.array_equal(got["hr"], hr) and np.array_equal(got["lr"], lr)
        assert got["mask"].dtype == np.float32 and np.array_equal(got["mask"], values[labels])
    assert not decode_sample({"__key__": "k", **encode_arrays(hr, lr), "json": b"{}"})["mask"].any()


def test_format_1_samples_with_uint16_labels_still_read():
    raw, hr, lr, mask = raw_sample("old")  # hr.npy / lr.npy / seg.npy (uint16, as format 1 wrote it)
    raw["seg.npy"] = npy(np.load(io.BytesIO(raw["seg.npy"])).astype(np.uint16))
    new = {"__key__": "old", **encode_arrays(hr, lr, np.load(io.BytesIO(raw["seg.npy"])),
                                             np.load(io.BytesIO(raw["segval.npy"]))), "json": raw["json"]}
    labels16, values = np.load(io.BytesIO(raw["seg.npy"])), np.load(io.BytesIO(raw["segval.npy"]))
    assert encode_arrays(hr, lr, labels16, values, "npy") == {k: raw[k] for k in ("hr.npy", "lr.npy", "seg.npy",
                                                                               "segval.npy")}  # byte for byte
    old_sample, new_sample = decode_sample(raw), decode_sample(new)
    assert all(np.array_equal(old_sample[k], new_sample[k]) for k in ("hr", "lr", "mask"))
    assert np.array_equal(old_sample["mask"], mask)


def test_zstd_fields_are_smaller_and_deterministic():
    hr, lr, _, values = arrays(50)
    labels = np.repeat(np.repeat(np.arange(16).reshape(4, 4), 16, 0), 16, 1)  # segments: runs of one label
    packed = encode_arrays(hr, lr, labels, values)
    assert len(packed["seg.npy.zst"]) < len(encode_arrays(hr, lr, labels, values, "npy")["seg.npy"]) // 10
    assert encode_arrays(hr, lr, labels, values) == packed  # deterministic: the same shards byte for byte
    for field in ("hr.npy.zst", "lr.npy.zst", "seg.npy.zst"):  # corrupt storage is an error, not wrong pixels
        params = zstandard.get_frame_parameters(packed[field])
        assert params.has_checksum and params.content_size > 0, field


@pytest.mark.parametrize("damage, fragment", [
    (lambda r: r.__setitem__("hr.npy.zst", r["hr.npy.zst"][:-9]), "field hr.npy.zst is not a valid zstd frame"),
    (lambda r: r.__setitem__("lr.npy.zst", b"\x28\xb5\x2f\xfd" + bytes(20)), "field lr.npy.zst is not a valid zstd"),
    (lambda r: r.__setitem__("seg.npy.zst", r["seg.npy.zst"][:-4] + b"\0\0\0\0"), "field seg.npy.zst"),
    (lambda r: r.__setitem__("hr.npy", npy(np.zeros((64, 64, 3), np.uint8))), "holds both hr.npy and hr.npy.zst"),
    (lambda r: r.__setitem__("lr.png", r.pop("lr.npy.zst")), "field lr.png is in an encoding this version cannot"),
    (lambda r: r.pop("hr.npy.zst"), "missing field hr.npy (or hr.npy.zst)"),
    (lambda r: r.pop("segval.npy"), "missing field segval.npy"),
])
def test_damaged_format_2_fields_name_sample_and_field(damage, fragment):
    hr, lr, labels, values = arrays(5)
    raw = {"__key__": "tile_9", **encode_arrays(hr, lr, labels, values), "json": b"{}"}
    damage(raw)
    with pytest.raises(SampleError) as err:
        decode_sample(raw)
    assert "sample tile_9" in str(err.value) and fragment in str(err.value)
