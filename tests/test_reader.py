"""Shard sample decoding: exact round trip and errors that name the sample and field."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from skimage import data

from samdiffsr.data.reader import SampleError, decode_sample, encode_mask, read_samples


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
