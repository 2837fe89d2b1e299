"""Ablations: arms parsed as given, identical batches across arms, and a real 2-arm x 2-seed run on 2 CPU ranks
that is killed in the middle of the second arm and resumed."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import REPO, TINY, write_rrdb_weights, write_shards

from samdiffsr.ablation.plan import AblationSpec, AblationSpecError, Arm, parse_arm
from samdiffsr.data.stream import TrainStream

CONFIG = str(REPO / "configs" / "demo.yaml")


def test_arms_are_parsed_with_list_values_and_reserved_keys_refused():
    assert parse_arm("sam=") == Arm("sam", ())
    assert parse_arm("plain=model.sam_modulation=false") == Arm("plain", ("model.sam_modulation=false",))
    assert parse_arm("wide=model.dim_mults=[1,2,4],model.hidden_size=16") == \
        Arm("wide", ("model.dim_mults=[1,2,4]", "model.hidden_size=16"))
    for bad in ("noequals", "=x.y=1", "a b=", "s=train.seed=3", "r=train.run_dir=x"):
        with pytest.raises(AblationSpecError):
            parse_arm(bad)


def _spec(tmp_path: Path, shards: str, *arms: Arm, seeds: int = 2) -> AblationSpec:
    return AblationSpec(config=CONFIG, arms=arms, seeds=seeds, sets=("v=unused",), out=str(tmp_path / "out"),
                        overrides=(*TINY, f"data.train_shards={shards}"))


def _batches(spec: AblationSpec, arm: Arm, seed: int, rank: int) -> list[dict]:
    cfg = spec.config_of(arm, seed)
    stream = TrainStream(cfg.data, batch_size=cfg.train.batch_size // 2, scale=cfg.model.sr_scale,
                         seed=cfg.train.seed, rank=rank, world_size=2)
    return list(stream.iter_epoch(0))


def _same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True)
                                    for k in ("hr", "lr", "mask"))


def test_arms_with_the_same_seed_see_identical_batches(tmp_path):
    shards = write_shards(tmp_path / "shards")
    sam, plain = Arm("sam"), Arm("plain", ("model.sam_modulation=false", "model.mask_coefficient=false"))
    spec = _spec(tmp_path, shards, sam, plain)
    first, second = spec.seed_values()
    assert second == first + 1
    for rank in (0, 1):
        assert _same(_batches(spec, sam, first, rank), _batches(spec, plain, first, rank))
        assert not _same(_batches(spec, sam, first, rank), _batches(spec, sam, second, rank))
    assert spec.check() == []
    moved = _spec(tmp_path, shards, sam, Arm("big", ("data.patch_size=16",)))
    assert moved.check() == ["arm big sets data.patch_size: its batches differ from the other arms', so its "
                             "differences are not paired by data"]


def _ablate(tmp_path: Path, shards: str, rrdb: str, val: Path) -> list[str]:
    return [sys.executable, str(REPO / "launcher" / "ablate.py"), "--config", CONFIG, *TINY,
            f"data.train_shards={shards}", f"train.rrdb_ckpt={rrdb}", "train.max_steps=6", "train.ckpt_every=2",
            "train.keep_last=3",
            "--arm", "sam=", "--arm", "plain=model.sam_modulation=false", "--seeds", "2", "--sets", f"v={val}",
            "--sampler", "ddim", "--steps", "2", "--out", str(tmp_path / "out"), "--ranks", "2"]


@pytest.mark.slow
def test_two_arms_two_seeds_killed_in_the_second_arm_then_resumed(tmp_path):
    shards = write_shards(tmp_path / "shards")
    rrdb = write_rrdb_weights(tmp_path / "rrdb.pt")
    val = tmp_path / "val"
    val.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(val / f"im{i}.png")
    cmd, out = _ablate(tmp_path, shards, rrdb, val), tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    second_arm = out / "runs" / "plain" / "seed1234"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while not (second_arm / "checkpoints" / "latest").exists():  # the second arm has saved its first checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (second_arm / "summary.json").exists()  # killed before the arm finished

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for seed in (1234, 1235):  # the first arm is not trained again
        assert f"{out / 'runs' / 'sam' / f'seed{seed}'}: already trained to train.max_steps" in done.stdout
    resumed = json.loads((second_arm / "summary.json").read_text())
    assert resumed["step"] == 6 and resumed["resumed_from"] is not None

    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert {(r["arm"], r["baseline"], int(r["step"]), r["metric"]) for r in rows} == {
        ("plain", "sam", step, metric) for step in (2, 4, 6) for metric in ("psnr_y", "ssim_y")}
    assert all(int(r["seeds"]) == 2 and int(r["images"]) == 3 for r in rows)
    report = json.loads((out / "ablation.json").read_text())
    assert set(report["curves"]["arms"]) == {"sam", "plain"} and report["verdicts"]
    assert (out / "plot_psnr_y.png").stat().st_size > 0 and "## Verdict" in (out / "ablation.md").read_text()
    page = (out / "ablation.html").read_text()
    assert "plain vs sam, step 6, psnr_y" in page and "<img src='plot_psnr_y.png'" in page
    for arm in ("sam", "plain"):  # each run's benchmark page is linked, and the link resolves
        for seed in (1234, 1235):
            assert f"href='bench/{arm}/seed{seed}/results.html'" in page
            assert (out / "bench" / arm / f"seed{seed}" / "results.html").is_file()
    # Paired per image: the difference is that of each run's own per-image scores.
    per_image = {arm: [list(csv.DictReader((out / "bench" / arm / f"seed{s}" / "results_per_image.csv").open()))
                       for s in (1234, 1235)] for arm in ("sam", "plain")}
    mean = {arm: np.mean([float(r["psnr_y"]) for runs in per_image[arm] for r in runs if r["step"] == "6"])
            for arm in per_image}
    last = next(r for r in rows if r["metric"] == "psnr_y" and r["step"] == "6")
    assert float(last["diff"]) == pytest.approx(mean["plain"] - mean["sam"], abs=1e-6)
