"""The demo's shards, from photos that ship inside the dependencies (what ``make_shards`` with no arguments builds).

The photos are written as PNGs under ``shards/demo/images/`` and sharded with the Felzenszwalb masker
(recorded as ``felzenszwalb`` in every sample, never mistaken for SAM): the train photos tiled into
``shards/demo/train/``, the held-out crops as whole-image benchmark pairs (no masks) into
``shards/demo/val/test-000000.tar``.

The held-out set (:func:`held_out_split`): two photos never trained on (``chelsea``, ``coffee``) and, from every
training photo, a band along its bottom edge that is cut off before sharding. Each photo gives two
``HELD_OUT_CROP`` squares, so 26 held-out images in all: enough for a paired bootstrap interval to mean
something, at fewer pixels than the two whole photos the demo used to score. A ``HELD_OUT_MARGIN`` of rows
between the training part and the crops is in neither, so no held-out pixel, nor the bicubic support of its
LR, touches a training pixel or its neighbours.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import numpy as np

from samdiffsr.cli import run_cli
from samdiffsr.io import atomic_write_bytes
from samdiffsr.sharding.cli import main as sharding_main
from samdiffsr.sharding.job import ShardError, ShardSettings, default_workers, make_shards, print_summary
from samdiffsr.sharding.manifest import StateError
from samdiffsr.sharding.samples import MaskSource
from samdiffsr.sharding.workers import WorkerError

# Photos that ship inside the dependencies: scikit-image's data (and matplotlib's Grace Hopper). Training and
# held-out photos are disjoint (skimage's "cat" is chelsea, so it is not used at all).
DEMO_TRAIN = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "stereo_motorcycle", "camera",
              "brick", "grass", "gravel", "retina", "grace_hopper")
DEMO_VAL = ("chelsea", "coffee")
HELD_OUT_CROP = 96  # HR side of every held-out image (LR 24 x 24 at x4)
HELD_OUT_MARGIN = 16  # HR rows between a training photo's kept part and its held-out crops (>= 2 bicubic supports)


def demo_photo(name: str) -> np.ndarray:
    """One demo photo as an RGB uint8 array: a scikit-image sample, or matplotlib's ``grace_hopper``."""
    import skimage.data

    if name == "grace_hopper":
        import matplotlib.cbook
        from PIL import Image

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f, Image.open(f) as img:
            return np.array(img.convert("RGB"))
    photo = getattr(skimage.data, name)()
    if isinstance(photo, tuple):  # stereo_motorcycle: (left, right, disparity); the left view
        photo = photo[0]
    return np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo[..., :3]


def held_out_boxes(name: str, photo: np.ndarray) -> tuple[int | None, dict[str, tuple[int, int]]]:
    """``(rows kept for training or None, {key: (top, left) of a held-out crop})`` of one demo photo.

    A held-out photo gives no training rows; a training photo keeps its rows above the bottom band of
    ``HELD_OUT_CROP + HELD_OUT_MARGIN`` rows. The two crops come from the band's last ``HELD_OUT_CROP`` rows
    (a held-out photo's: its middle rows), one from each half of the width: the most detailed window of
    that half (flat black corners, as in ``retina``, would score an infinite PSNR and say nothing).
    """
    height, width = photo.shape[:2]
    size = HELD_OUT_CROP
    if name in DEMO_VAL:
        kept, top = None, (height - size) // 2
    else:
        kept, top = height - size - HELD_OUT_MARGIN, height - size
    band = photo[top:top + size].astype(np.float64).mean(axis=2)
    column_detail = np.abs(np.diff(band, axis=1)).sum(axis=0)  # column x: |band[:, x + 1] - band[:, x]|
    window = np.convolve(column_detail, np.ones(size - 1), mode="valid")  # detail of the window starting at x
    boxes = {}
    for side, (low, high) in (("left", (0, width // 2 - size)), ("right", (width // 2, width - size))):
        boxes[f"{name}-{side}"] = (top, low + int(np.argmax(window[low:high + 1:4])) * 4)
    return kept, boxes


def held_out_split(name: str, photo: np.ndarray) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """``(training part or None, {key: held-out crop})`` of one demo photo (:func:`held_out_boxes`)."""
    kept, boxes = held_out_boxes(name, photo)
    size = HELD_OUT_CROP
    crops = {key: photo[top:top + size, left:left + size] for key, (top, left) in boxes.items()}
    return (None if kept is None else photo[:kept]), crops


def write_demo_images(root: Path) -> tuple[Path, Path]:
    """Save the training parts under ``root/train`` and the held-out crops under ``root/val`` as PNG (once)."""
    from PIL import Image

    from samdiffsr.cli import UserError

    if (root / "val" / "chelsea.png").exists():  # the layout before the held-out crops: whole photos
        raise UserError(f"{root.parent} holds demo shards of an older layout (2 whole held-out photos); "
                        f"remove it (rm -r {root.parent}) and rerun")

    def save(path: Path, image: np.ndarray) -> None:
        if not path.exists():
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
            atomic_write_bytes(path, buffer.getvalue())

    for name in (*DEMO_TRAIN, *DEMO_VAL):
        if all((root / "val" / f"{name}-{side}.png").exists() for side in ("left", "right")) and (
                name in DEMO_VAL or (root / "train" / f"{name}.png").exists()):
            continue
        kept, crops = held_out_split(name, demo_photo(name))
        if kept is not None:
            save(root / "train" / f"{name}.png", kept)
        for key, crop in crops.items():
            save(root / "val" / f"{key}.png", crop)
    return root / "train", root / "val"


def run_demo(out: str | os.PathLike = "shards/demo", progress: bool = True) -> int:
    """Build the demo shards (train tiles with Felzenszwalb masks, val benchmark pairs) under ``out``."""
    start = time.perf_counter()
    out = Path(out)
    train_images, val_images = write_demo_images(out / "images")
    masks = MaskSource(kind="felzenszwalb", masks_dir=str((out / "masks").resolve()))
    codes, summaries = [], []
    for settings in (
        ShardSettings(images=str(train_images), out=str(out / "train"), masks=masks, max_count=10,
                      workers=default_workers(masks), progress=progress),
        ShardSettings(images=str(val_images), out=str(out / "val"), benchmark=True,
                      workers=default_workers(MaskSource()), progress=progress),
    ):
        try:
            summary = make_shards(settings)
        except (ShardError, StateError, WorkerError) as err:
            print(f"make_shards demo: error: {err}", file=sys.stderr)
            return 2 if not isinstance(err, WorkerError) else 4
        print_summary(summary)
        summaries.append(summary)
        codes.append(summary.exit_code)
    images, tiles, shards = (sum(getattr(done, n) for done in summaries) for n in ("images", "samples", "shards"))
    print(f"demo: {images} images, {tiles} tiles, {shards} shards, "
          f"{time.perf_counter() - start:.1f} seconds -> {out}/train (tiles), {out}/val (whole images)")
    return max(codes)


def make_shards_command(argv: list[str] | None = None) -> int:
    """``make_shards``: with no arguments, build the demo shards; otherwise :func:`samdiffsr.sharding.cli.main`.

    The no-argument default lives here, above the sharding package, so that sharding never imports the demo.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    return run_cli("make_shards", run_demo) if not args else sharding_main(args)
