"""A full disk: one line naming the file, exit status 5, no partial files, and a resume once space is freed.

The disk is a real small tmpfs (mounting one needs root, as in CI; skipped otherwise). Training and
make_shards run as the user runs them, as processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import REPO, TINY, rank_env, write_rrdb_weights, write_shards

from samdiffsr.cli import EXIT_NO_SPACE
from samdiffsr.train import checkpoints


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves about ``leave`` bytes free on ``disk``."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    with filler.open("wb") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return filler


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if ".tmp" in p.name)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    return {"shards": write_shards(root / "train"), "rrdb": write_rrdb_weights(root / "rrdb.pt")}


def train(data: dict[str, str], run_dir: Path, max_steps: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launcher" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
           *TINY, "data.workers=0", f"data.train_shards={data['shards']}", "data.val_shards=",
           f"train.rrdb_ckpt={data['rrdb']}", f"train.run_dir={run_dir}", "train.ckpt_every=2",
           f"train.max_steps={max_steps}"]
    return subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600)


# Free space left before the step-4 save, for each file it writes in turn: too little for DeepSpeed's model
# file (~600 kB); enough for DeepSpeed's files but not for the rank-independent optimizer state (~290 kB
# more); enough for both but not for the weights file (~280 kB more).
@pytest.mark.parametrize("leave, failing", [(250_000, "checkpoints/step00000004"),
                                            (760_000, "checkpoints/step00000004/optimizer_full.pt"),
                                            (1_050_000, "weights/step00000004.pt")])
def test_training_on_a_full_disk_names_the_file_exits_5_and_resumes_later(data, small_disk, leave, failing):
    run_dir = small_disk / "run"
    assert train(data, run_dir, 2).returncode == 0
    filler = fill(small_disk, leave)

    proc = train(data, run_dir, 4)
    assert proc.returncode == EXIT_NO_SPACE, proc.stderr[-3000:]
    assert f"train: error: no space left on device writing {run_dir / failing}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert leftovers(run_dir) == []
    assert not (run_dir / "checkpoints" / "step00000004").exists()
    assert not (run_dir / "weights" / "step00000004.pt").exists()
    assert (run_dir / "checkpoints" / "latest").read_text() == checkpoints.tag_for(2)

    filler.unlink()
    proc = train(data, run_dir, 4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == checkpoints.tag_for(4)


def make_shards(images: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launcher" / "make_shards.py"), "--images", str(images), "--out", str(out),
           "--masker", "felzenszwalb", "--workers", "1", "--no-progress", "--max-count", "1"]
    return subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600)


def test_make_shards_on_a_full_disk_names_the_file_exits_5_and_resumes_later(small_disk, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # noise: one tile of ~0.4 MB each, which does not compress
        Image.fromarray(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = small_disk / "shards"
    filler = fill(small_disk, 700_000)

    proc = make_shards(images, out)
    assert proc.returncode == EXIT_NO_SPACE, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = f"make_shards: error: no space left on device writing {out}"
    assert line in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert leftovers(out) == []

    filler.unlink()
    proc = make_shards(images, out)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.tar"))  # the shards are there
    assert leftovers(out) == []
