"""The fast tar reader agrees with webdataset's and fails loudly on damaged shards."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds
from webdataset.tariterators import tarfile_samples

from samdiffsr.data.tarread import TarFormatError, iter_tar_files, read_shard


def _write(path, samples) -> None:
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def test_samples_equal_webdatasets_including_long_names_and_big_members(tmp_path):
    long_key = "deep/" + "k" * 150  # past the 100-byte ustar name field: needs a pax or GNU record
    samples = [{"__key__": f"s{i}", "a.npy": bytes(range(256)) * (i + 1), "json": b'{"i": %d}' % i}
               for i in range(5)]
    samples += [{"__key__": long_key, "hr.npy": b"x" * 700_000, "Seg.NPY": b""}]
    _write(tmp_path / "a.tar", samples)
    ours = list(read_shard(str(tmp_path / "a.tar")))
    theirs = list(tarfile_samples([{"url": str(tmp_path / "a.tar")}]))
    assert ours == theirs and len(ours) == 6
    assert ours[-1]["__key__"] == long_key and set(ours[-1]) == {"__key__", "__url__", "hr.npy", "seg.npy"}


def test_long_name_records_apply_to_one_member_only(tmp_path):
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        long = "p" * 120 + "/key.txt" if fmt == tarfile.USTAR_FORMAT else "q" * 130 + ".txt"  # ustar: prefix
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, data in ((long, b"abc"), ("short.txt", b"de")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        buf.seek(0)
        assert list(iter_tar_files(buf)) == [(long, b"abc"), ("short.txt", b"de")], fmt


def test_truncated_and_garbled_shards_raise_after_the_good_samples(tmp_path):
    _write(tmp_path / "a.tar", [{"__key__": f"s{i}", "bin": bytes(3000)} for i in range(4)])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(TarFormatError, match="truncated"):
        for sample in read_shard(str(tmp_path / "cut.tar")):
            got.append(sample["__key__"])
    assert got and got == [f"s{i}" for i in range(len(got))] and len(got) < 4
    garbled = bytearray(data)
    garbled[5] ^= 0xFF  # inside the first header's name: the checksum no longer matches
    (tmp_path / "bad.tar").write_bytes(bytes(garbled))
    with pytest.raises(TarFormatError, match="checksum"):
        list(read_shard(str(tmp_path / "bad.tar")))
    with pytest.raises(FileNotFoundError):
        list(read_shard(str(tmp_path / "missing.tar")))


def test_a_cached_copy_is_named_by_its_source(tmp_path):
    _write(tmp_path / "a.tar", [{"__key__": f"s{i}", "bin": bytes(3000)} for i in range(4)])
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "copy.tar").write_bytes(data[: len(data) // 2])
    got = []
    with pytest.raises(TarFormatError, match=r"^shared/a\.tar: truncated"):
        for sample in read_shard(str(tmp_path / "copy.tar"), source="shared/a.tar"):
            got.append(sample["__url__"])
    assert got and set(got) == {"shared/a.tar"}
