"""Helpers for the training tests: tiny shards in the reader's format, tiny configs, launching ranks."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from samdiffsr.data.reader import encode_mask
from samdiffsr.distributed import free_port
from samdiffsr.imresize import imresize

REPO = Path(__file__).resolve().parents[1]
SCALE = 4
# A model small enough for 2 CPU cores: ~0.1 s per step at batch 4, patch 32.
TINY = [
    "model.hidden_size=8", "model.dim_mults=[1,2]", "model.rrdb_num_block=2", "model.rrdb_num_feat=8",
    "model.rrdb_growth=4", "model.timesteps=10",
    "data.patch_size=32", "data.workers=1", "data.shuffle_buffer=4", "data.prefetch_factor=2",
    "train.batch_size=4", "train.log_every=2", "train.ckpt_every=1000", "train.val_every=0",
    "train.keep_last=2",
    # Pinned to what the tests were written against, whatever configs/demo.yaml tunes for the demo.
    "optim.lr=5e-4", "optim.decay_steps=200000", "train.ema_decay=0.0",
]


def write_rrdb_weights(path: Path, *overrides: str) -> str:
    """Random RRDB weights of the TINY model (seed 0), as a frozen-RRDB run loads them; returns the path."""
    from samdiffsr.config import load_config
    from samdiffsr.models import build_model, save_weights

    torch.manual_seed(0)
    save_weights(path, build_model(load_config(REPO / "configs" / "demo.yaml", [*TINY, *overrides]).model).rrdb)
    return str(path)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_shards(folder: Path, sizes: tuple[int, ...] = (6, 6), tile: int = 48, seed: int = 0,
                 corrupt_shard: int | None = None, mask_values: tuple[float, ...] = (0.0, 0.3, -0.2)) -> str:
    """Shards ``train-%06d.tar`` (+ sizes.json) of smooth random tiles, LR by MATLAB bicubic, a 3-label mask.

    ``corrupt_shard``: that shard's bytes are garbage after its first sample (a truncated download).
    ``mask_values``: the 3 labels' mask values (NaN ones make every sample bad: the reader rejects them).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, n in enumerate(sizes):
        path = folder / f"train-{i:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for j in range(n):
                coarse = rng.integers(0, 256, (tile // 8, tile // 8, 3)).astype(np.uint8)
                hr = imresize(coarse, output_shape=(tile, tile))
                labels = np.zeros((tile, tile), np.uint16)
                labels[: tile // 2] = 1
                labels[:, : tile // 3] = 2
                values = np.array(mask_values, np.float32)
                sample = {"hr.npy": _npy(hr), "lr.npy": _npy(imresize(hr, 1 / SCALE)),
                          **{k: _npy(v) for k, v in encode_mask(labels, values).items()},
                          "json": json.dumps({"scale": SCALE}).encode()}
                sink.write({"__key__": f"s{i}_{j}", **sample})
        if corrupt_shard == i:
            data = path.read_bytes()
            path.write_bytes(data[:2048] + rng.bytes(len(data) - 2048))
    (folder / "sizes.json").write_text(json.dumps({f"train-{i:06d}.tar": n for i, n in enumerate(sizes)}))
    return str(folder)


def rank_env(**extra: str) -> dict[str, str]:
    """The environment for launched ranks: CPU DeepSpeed, one thread per rank (2 ranks on 2 cores)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def torchrun(args: list[str], nproc: int = 2, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N launcher/train.py args``; raises with the output on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(REPO / "launcher" / "train.py"), *args]
    return _run(cmd, timeout, rank_env(**env))


def deepspeed_launch(args: list[str], nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """The ``deepspeed`` launcher on CPU: ``--num_gpus`` ranks on localhost."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes", "1", "--num_gpus", str(nproc),
           "--master_port", str(free_port()), str(REPO / "launcher" / "train.py"), *args]
    return _run(cmd, timeout, rank_env())


def _run(cmd: list[str], timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-8000:]}")
    return proc


def read_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "losses.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def load_net_state(run_dir: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    name = "latest.pt" if step is None else f"step{step:08d}.pt"
    return torch.load(run_dir / "weights" / name, map_location="cpu", weights_only=True)["model"]


def stop_after(n: int):
    """A ``stop_requested`` callable that asks to stop at its ``n``-th poll (after step ``n`` of this start)."""
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) >= n

    return stop
