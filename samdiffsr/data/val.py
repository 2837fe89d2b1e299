"""A small held-out validation set: whole images from benchmark-format shards or an HR image folder.

Each image comes as a batch of one in the training stream's layout (``hr`` 1 x 3 x H x W uint8, ``lr``
1 x 3 x H/s x W/s uint8, ``mask`` 1 x 1 x H x W float32, plus ``key``), so `stream.to_model_inputs`
applies unchanged.
"""

from __future__ import annotations

import os
from itertools import islice
from typing import Any

import numpy as np
import torch
from PIL import Image

from samdiffsr.data.reader import read_samples
from samdiffsr.data.shardlist import expand_shards
from samdiffsr.imresize import imresize

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _as_batch(key: str, hr: np.ndarray, lr: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    return {
        "key": key,
        "hr": torch.from_numpy(np.array(hr)).permute(2, 0, 1)[None],
        "lr": torch.from_numpy(np.array(lr)).permute(2, 0, 1)[None],
        "mask": torch.from_numpy(np.array(mask, np.float32))[None, None],
    }


def _folder_images(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    return [os.path.join(folder, n) for n in names]


def load_val_images(source: str, limit: int, scale: int) -> list[dict[str, Any]]:
    """The first ``limit`` images (all when ``limit <= 0``) of ``source``, in a fixed order.

    ``source``: a shard pattern / file / folder of ``.tar`` shards (benchmark format, whole images), or a
    folder of HR images, which are mod-cropped to a multiple of ``scale`` and downscaled with MATLAB
    bicubic ``imresize``; folder images have an all-zero mask (masks only shape the training noise).
    """
    stop = limit if limit > 0 else None
    images = _folder_images(source) if os.path.isdir(source) else []
    if images:
        out = []
        for path in islice(images, stop):
            with Image.open(path) as img:
                hr = np.array(img.convert("RGB"))  # writable: torch tensors share it
            h, w = hr.shape[0] - hr.shape[0] % scale, hr.shape[1] - hr.shape[1] % scale
            if h == 0 or w == 0:
                raise ValueError(f"validation image {path} is smaller than the scale {scale}")
            hr = hr[:h, :w]
            out.append(_as_batch(os.path.splitext(os.path.basename(path))[0], hr, imresize(hr, 1 / scale),
                                 np.zeros((h, w), np.float32)))
        return out
    out = []
    for sample in islice(read_samples(expand_shards(source)), stop):
        if sample["hr"].shape[0] != sample["lr"].shape[0] * scale:
            raise ValueError(f"validation sample {sample['key']} is not a x{scale} pair")
        out.append(_as_batch(sample["key"], sample["hr"], sample["lr"], sample["mask"]))
    return out
