"""Image discovery and robust loading: conversions that are sound, clear errors for the rest."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import skimage.data
from PIL import Image

from samdiffsr.images import ImageError, find_images, is_approximate, load_image, read_image


def write_png16(path, array: np.ndarray) -> None:
    """A 16-bit PNG (gray, RGB or RGBA) written by hand: Pillow cannot write 16-bit colour PNGs."""
    h, w, c = array.shape
    color_type = {1: 0, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def photo():
    return skimage.data.astronaut()[:64, :96]


def test_find_images_is_recursive_sorted_and_reports_the_rest(tmp_path, photo):
    for rel in ("b/z.PNG", "a.jpg", "b/c/y.webp", "b/x.tiff", "d.bmp", ".hidden.png", ".git/e.png"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    os.symlink(tmp_path / "b", tmp_path / "b" / "c" / "loop")  # a symlink loop must not recurse forever
    images, ignored = find_images(tmp_path)
    assert images == ["a.jpg", "b/c/y.webp", "b/x.tiff", "b/z.PNG", "d.bmp"]
    assert ignored == ["notes.txt"]
    with pytest.raises(FileNotFoundError):
        find_images(tmp_path / "missing")


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tif"), ("WEBP", "webp")])
def test_lossless_formats_round_trip(tmp_path, photo, fmt, ext):
    path = tmp_path / f"p.{ext}"
    Image.fromarray(photo).save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    array, note = read_image(path)
    assert array.dtype == np.uint8 and array.shape == photo.shape and note is None
    assert np.array_equal(array, photo)


def test_conversions(tmp_path, photo):
    gray = photo[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([photo, gray])).save(tmp_path / "rgba.png")
    Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "pal.png")
    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    g16 = gray.astype(np.uint16) * 257 + 200
    write_png16(tmp_path / "g16.png", g16[..., None])
    rgb16 = photo.astype(np.uint16) * 257 + 100
    write_png16(tmp_path / "rgb16.png", rgb16)
    Image.fromarray(gray).convert("1").save(tmp_path / "bw.png")

    array, note = read_image(tmp_path / "gray.png")
    assert np.array_equal(array, np.dstack([gray] * 3)) and "grayscale" in note
    array, note = read_image(tmp_path / "rgba.png")
    assert np.array_equal(array, photo) and "alpha dropped" in note
    array, note = read_image(tmp_path / "pal.png")
    palette_rgb = np.asarray(Image.open(tmp_path / "pal.png").convert("RGB"))
    assert np.array_equal(array, palette_rgb) and "palette" in note
    array, note = read_image(tmp_path / "la.png")
    assert np.array_equal(array, np.dstack([gray] * 3)) and "alpha" in note
    array, note = read_image(tmp_path / "g16.png")
    assert np.array_equal(array, np.dstack([(g16 >> 8).astype(np.uint8)] * 3)) and "16-bit" in note
    array, note = read_image(tmp_path / "rgb16.png")
    assert np.array_equal(array, (rgb16 >> 8).astype(np.uint8)) and "16-bit" in note
    array, note = read_image(tmp_path / "bw.png")
    assert set(np.unique(array)) <= {0, 255} and array.shape == photo.shape


@pytest.mark.parametrize(
    "name,make,reason",
    [
        ("empty.png", lambda p, photo: p.write_bytes(b""), "empty file"),
        ("text.png", lambda p, photo: p.write_text("hello, not a picture\n" * 10), "not an image"),
        ("cut.png", lambda p, photo: p.write_bytes(_encoded(photo, "PNG")[:800]), "truncated or corrupt"),
        ("cut.jpg", lambda p, photo: p.write_bytes(_encoded(photo, "JPEG")[:600]), "truncated or corrupt"),
        ("float.tif", lambda p, photo: Image.fromarray(photo[..., 0].astype(np.float32)).save(p), "floating"),
    ],
)
def test_bad_images_name_the_file_and_reason(tmp_path, photo, name, make, reason):
    path = tmp_path / name
    make(path, photo)
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert info.value.path == str(path) and reason in info.value.reason
    assert str(path) in str(info.value)


def _encoded(photo, fmt) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format=fmt)
    return buffer.getvalue()


def test_cmyk_jpeg_without_icc_profile_is_converted_like_pillow_and_noted_approximate(tmp_path, photo):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(photo).convert("CMYK").save(path)
    with Image.open(path) as image:
        assert image.mode == "CMYK" and not image.info.get("icc_profile")
        want = np.asarray(image.convert("RGB"))
    array, note = read_image(path)
    assert np.array_equal(array, want) and array.dtype == np.uint8 and array.shape == photo.shape
    assert note == "CMYK without an ICC profile -> RGB by Pillow's formula (colours approximate)"
    assert is_approximate(note) and not is_approximate("grayscale -> RGB") and not is_approximate(None)
