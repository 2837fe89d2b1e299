"""Find and load training images robustly: every file becomes RGB uint8 H x W x 3 or an error naming it.

Discovery (:func:`find_images`) walks a folder recursively (symlinked folders included, loops cut) and
returns the image files (``.png .jpg .jpeg .bmp .tif .tiff .webp``, any case) as sorted POSIX paths
relative to the folder, plus the other files it ignored. Hidden files and folders (``.name``) are skipped.

Loading (:func:`read_image`) uses Pillow and converts where the conversion is sound:

- grayscale (``L``, ``1``), ``LA``, palette (``P``/``PA``), ``YCbCr``, ``RGBX`` -> RGB;
- alpha (``RGBA``, ``LA``, ``PA``) is dropped, keeping the stored colour channels (what
  ``Image.convert("RGB")`` does, as the reference pipeline did);
- 16-bit (``I;16*``, or ``I`` with values in 0..65535) -> 8-bit by the high byte (``v >> 8``), which is
  what Pillow itself does for 16-bit RGB PNG/TIFF and what scikit-image's ``img_as_ubyte`` does;
- CMYK with an embedded ICC profile -> sRGB through LittleCMS; without one, Pillow's ``convert("RGB")``
  formula (what common loaders do), noted as approximate (:func:`is_approximate`) so reports warn.

Rejected, with the reason: empty or truncated files, files Pillow cannot identify, floating-point images
(unknown value range), 32-bit integer images outside
0..65535, decompression bombs. Multi-frame files (GIF, multi-page TIFF) give their first frame. EXIF
orientation is not applied: pixels are used as stored, like the reference pipeline and like masks made
from the same array.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms

from samdiffsr.io import FileProblem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
APPROXIMATE = "colours approximate"
CMYK_WITHOUT_PROFILE = f"CMYK without an ICC profile -> RGB by Pillow's formula ({APPROXIMATE})"


class ImageError(FileProblem, ValueError):
    """An image file that cannot be used: ``path`` names the file, ``reason`` says why."""


def is_approximate(note: str | None) -> bool:
    """Whether a conversion note (from :func:`read_image`) marks colours that are only approximate."""
    return bool(note) and APPROXIMATE in note


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the supported image extensions (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Image files under ``root`` and the files ignored, both as sorted relative POSIX paths.

    Raises FileNotFoundError / NotADirectoryError if ``root`` is not a folder.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    images, ignored = [], []
    seen = {os.path.realpath(root)}
    for folder, dirs, files in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(folder, d))
            if not d.startswith(".") and real not in seen:  # hidden folders and symlink loops
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        rel_folder = Path(folder).relative_to(root)
        for name in files:
            if name.startswith("."):
                continue
            rel = (rel_folder / name).as_posix()
            (images if is_image_name(name) else ignored).append(rel)
    return sorted(images), sorted(ignored)


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, str | None]:
    """Load an image as RGB uint8 ``H x W x 3`` plus a note on any conversion made (None if none).

    Raises :class:`ImageError` naming the file and the reason.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageError(path, f"cannot read file: {err.strerror or err}") from None
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            depth16 = _sixteen_bit(image)  # the decoder tiles are gone after load()
            image.load()
    except Image.DecompressionBombError as err:
        raise ImageError(path, f"image too large to decode safely ({err})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not an image Pillow can identify (non-image or unsupported format)") from None
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError ... for damaged data
        raise ImageError(path, f"truncated or corrupt image data ({type(err).__name__}: {err})") from None
    try:
        array, note = _to_rgb8(image, path, depth16)
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(path, f"cannot convert {image.mode} image to RGB ({err})") from None
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageError(path, f"image has no pixels ({array.shape[1]}x{array.shape[0]})")
    return np.ascontiguousarray(array), note


def load_image(path: str | os.PathLike) -> np.ndarray:
    """:func:`read_image` without the conversion note."""
    return read_image(path)[0]


def _sixteen_bit(image: Image.Image) -> bool:
    """Whether Pillow decoded the file from 16 bits per sample (it keeps only the high byte for RGB)."""
    for tile in getattr(image, "tile", None) or []:
        args = tile.args if hasattr(tile, "args") else tile[3]
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and ";16" in rawmode:
            return True
    return False


def _to_rgb8(image: Image.Image, path: Path, depth16: bool) -> tuple[np.ndarray, str | None]:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image), ("16-bit RGB -> 8-bit" if depth16 else None)
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(path, "32-bit integer image with values outside 0..65535: unknown range")
        gray = (values.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2), "16-bit grayscale -> 8-bit RGB"
    if mode == "F":
        raise ImageError(path, "floating-point image: value range unknown, no sound 8-bit conversion")
    if mode == "CMYK":
        icc = image.info.get("icc_profile")
        if not icc:
            return np.asarray(image.convert("RGB")), CMYK_WITHOUT_PROFILE
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        rgb = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        return np.asarray(rgb), "CMYK -> sRGB (embedded ICC profile)"
    notes = {
        "L": "grayscale -> RGB",
        "1": "1-bit -> RGB",
        "LA": "grayscale+alpha -> RGB (alpha dropped)",
        "La": "grayscale+alpha -> RGB (alpha dropped)",
        "P": "palette -> RGB",
        "PA": "palette+alpha -> RGB (alpha dropped)",
        "RGBA": "RGBA -> RGB (alpha dropped)",
        "RGBa": "RGBA -> RGB (alpha dropped)",
        "RGBX": "RGBX -> RGB",
        "YCbCr": "YCbCr -> RGB",
    }
    if mode not in notes:
        raise ImageError(path, f"unsupported image mode {mode!r}")
    note = notes[mode] + (" (16-bit -> 8-bit)" if depth16 else "")
    if mode in ("P", "PA"):
        image = image.convert("RGBA")  # palette entries may carry alpha; colours are kept either way
    return np.asarray(image.convert("RGB")), note
