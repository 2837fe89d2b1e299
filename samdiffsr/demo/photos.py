"""The demo's shards, from photos that ship inside the dependencies (what ``make_shards`` with no arguments builds).

The photos are written as PNGs under ``shards/demo/images/`` and sharded with the Felzenszwalb masker
(recorded as ``felzenszwalb`` in every sample, never mistaken for SAM): the train photos tiled into
``shards/demo/train/`` (19 tiles of 320, in ``train-000000.tar`` and ``train-000001.tar``), the held-out
photos as whole-image benchmark pairs (no masks) into ``shards/demo/val/test-000000.tar``.
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


def write_demo_images(root: Path) -> tuple[Path, Path]:
    """Save the demo photos as PNG under ``root/train`` and ``root/val`` (once; the files are reused)."""
    from PIL import Image

    for split, names in (("train", DEMO_TRAIN), ("val", DEMO_VAL)):
        for name in names:
            path = root / split / f"{name}.png"
            if not path.exists():
                buffer = io.BytesIO()
                Image.fromarray(demo_photo(name)).save(buffer, format="PNG")
                atomic_write_bytes(path, buffer.getvalue())
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
