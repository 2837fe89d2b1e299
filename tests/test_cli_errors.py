"""Every launcher: a user error is one line ``PROG: error: ...`` on stderr, printed once, with exit status 2.

The real launchers run as subprocesses; nothing is mocked.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from samdiffsr.cli import EXIT_USAGE
from samdiffsr.config import load_config
from samdiffsr.models import build_model, save_weights

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=8", "model.dim_mults=[1,2]", "model.rrdb_num_block=2", "model.rrdb_num_feat=8",
        "model.rrdb_growth=4", "model.timesteps=4"]


def launch(name: str, *args: str, runner: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *runner, str(REPO / "launcher" / f"{name}.py"), *args]
    environ = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, line: str, code: int = EXIT_USAGE) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [line], proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """Files a user may take for a checkpoint: a saved HTML page, random bytes, zeros, a truncated save."""
    root = tmp_path_factory.mktemp("bad")
    files = {"html": root / "model.ckpt", "random": root / "random.ckpt", "zeros": root / "zeros.ckpt",
             "truncated": root / "truncated.pt"}
    files["html"].write_text("<!DOCTYPE html><html><head><title>Sign in</title></head></html>\n")
    files["random"].write_bytes(np.random.default_rng(0).integers(1, 127, 4096, dtype=np.uint8).tobytes())
    files["zeros"].write_bytes(bytes(4096))
    buffer = io.BytesIO()
    torch.save({"model": torch.zeros(1000)}, buffer)
    files["truncated"].write_bytes(buffer.getvalue()[:2000])
    lr = root / "lr"
    lr.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(lr / "a.png")
    files["lr"] = lr
    return files


# --- train -----------------------------------------------------------------------------------------------
def test_train_config_error_is_one_line():
    proc = launch("train", "--config", "configs/demo.yaml", "train.max_step=3")
    assert_one_line(proc, "train: error: unknown config key 'train.max_step' (did you mean 'max_steps'?)")


@pytest.mark.parametrize("override, line", [
    ("train.max_steps=0", "train: error: config key 'train.max_steps': must be >= 1, got 0"),
    ("optim.lr=-1e-3", "train: error: config key 'optim.lr': must be > 0, got -0.001"),
    ("train.log_every=0", "train: error: config key 'train.log_every': must be >= 1, got 0"),
])
def test_train_refuses_bad_values_before_anything_runs(tmp_path, override, line):
    proc = launch("train", "--config", "configs/demo.yaml", f"train.run_dir={tmp_path / 'run'}", override)
    assert_one_line(proc, line)
    assert not (tmp_path / "run").exists()


def test_train_usage_error_is_one_line():
    assert_one_line(launch("train", "--config", "configs/demo.yaml", "--bogus"),
                    "train: error: unrecognized arguments: --bogus (see --help)")


@pytest.mark.slow
def test_train_error_is_printed_once_with_two_ranks():
    runner = ("-m", "deepspeed.launcher.runner", "--num_nodes", "1", "--num_gpus", "2", "--master_port", "29517")
    proc = launch("train", "--config", "configs/demo.yaml", "train.max_step=3", runner=runner)
    assert_one_line(proc, "train: error: unknown config key 'train.max_step' (did you mean 'max_steps'?)")


# --- make_shards -----------------------------------------------------------------------------------------
def test_make_shards_errors_are_one_line(tmp_path):
    assert_one_line(launch("make_shards", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "out"),
                           "--masker", "none"),
                    f"make_shards: error: image folder not found: {tmp_path / 'none'}")
    assert_one_line(launch("make_shards", "--images", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--masker", "sam"),
                    "make_shards: error: --masker sam needs --sam-checkpoint PATH (see --help)")


# --- submit (nothing is queued: these fail before submitit is asked) ---------------------------------------
@pytest.mark.parametrize("overrides, line", [
    (["train.max_steps=-5"], "submit: error: config key 'train.max_steps': must be >= 1, got -5"),
    (["train.rrdb_ckpt={tmp}/rrdb.pt"], "submit: error: config key 'train.rrdb_ckpt': file not found: {tmp}/rrdb.pt"),
    (["train.rrdb_ckpt="], "submit: error: config key 'train.rrdb_ckpt': a frozen RRDB (train.freeze_rrdb=true) "
                           "needs pretrained weights (run the rrdb task first, or give the authors' checkpoint)"),
    (["data.train_shards={tmp}/shards", "train.task=rrdb"],
     "submit: error: config key 'data.train_shards': shards not found: {tmp}/shards"),
])
def test_submit_refuses_before_queueing(tmp_path, overrides, line):
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    proc = launch("submit", "--config", "configs/demo.yaml", "--run-dir", str(tmp_path / "run"), *overrides,
                  PATH="/usr/bin:/bin")  # no sbatch needed: nothing may be submitted
    assert_one_line(proc, line.format(tmp=tmp_path))
    assert not (tmp_path / "run").exists()


def test_submit_command_errors_are_one_line():
    assert_one_line(launch("submit", "shards", "--parts", "2"),
                    "submit: error: put the shards arguments after '--' (submit.py shards [options] -- ARGS)")


# --- infer and benchmark on files that are not checkpoints ----------------------------------------------
@pytest.mark.parametrize("kind", ["html", "random", "zeros"])
def test_infer_on_a_file_that_is_not_a_checkpoint(tmp_path, bad_files, kind):
    path = bad_files[kind]
    proc = launch("infer", "--ckpt", str(path), "--img-dir", str(bad_files["lr"]), "--save-dir", str(tmp_path))
    assert_one_line(proc, f"infer: error: {path}: not a checkpoint (neither a torch zip file nor a pickle)")
    assert "weights_only" not in proc.stderr


def test_benchmark_on_a_truncated_checkpoint(tmp_path, bad_files):
    path = bad_files["truncated"]
    proc = launch("benchmark", "--weights", str(path), "--sets", str(bad_files["lr"]), "--out", str(tmp_path),
                  "--metrics", "psnr_y", "--quiet")
    assert_one_line(proc, f"benchmark: error: {path}: not a readable checkpoint, damaged or truncated "
                          "(PytorchStreamReader failed reading zip archive: failed finding central directory)")


def test_benchmark_on_a_truncated_benchmark_shard(tmp_path, bad_files):
    shards = tmp_path / "set5"
    shards.mkdir()
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(shards / "test-000000.tar")) as sink:
        for i in range(3):
            hr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            arrays = {"hr.npy": hr, "lr.npy": hr[::4, ::4].copy()}
            sample = {}
            for name, array in arrays.items():
                buffer = io.BytesIO()
                np.save(buffer, array)
                sample[name] = buffer.getvalue()
            sink.write({"__key__": f"img{i}", **sample, "json": json.dumps({"scale": 4}).encode()})
    shard = shards / "test-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    proc = launch("benchmark", "--sets", f"Set5={shards}", "--out", str(tmp_path / "out"), "--metrics", "psnr_y",
                  "--quiet")
    assert_one_line(proc, f"benchmark: error: benchmark set Set5 ({shards}): {shard}: truncated shard: 0-byte "
                          "header, no end-of-archive marker")


def test_infer_refuses_weights_with_nan(tmp_path, bad_files):
    cfg = load_config(None, TINY)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.denoise_fn.final_conv[1].weight[0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    save_weights(path, model, step=1, config=cfg.to_dict())
    proc = launch("infer", "--ckpt", str(path), "--img-dir", str(bad_files["lr"]), "--save-dir", str(tmp_path / "sr"))
    assert_one_line(proc, f"infer: error: {path}: tensor 'denoise_fn.final_conv.1.weight' holds NaN or Inf "
                          "values; refusing to load it")
    assert not (tmp_path / "sr" / "a.png").exists()


def test_infer_refuses_a_sampler_and_step_count_that_do_not_go_together(tmp_path, bad_files):
    cfg = load_config(None, TINY)
    path = tmp_path / "w.pt"
    save_weights(path, build_model(cfg.model), step=1, config=cfg.to_dict())
    proc = launch("infer", "--ckpt", str(path), "--img-dir", str(bad_files["lr"]), "--save-dir", str(tmp_path / "sr"),
                  "--sampler", "ddpm", "--steps", "1")
    assert_one_line(proc, f"infer: error: --sampler/--steps: the ddpm sampler runs all {cfg.model.timesteps} "
                          "steps; use ddim or dpmpp_2m for 1")


# --- demo -------------------------------------------------------------------------------------------------
def test_demo_refuses_bad_settings_before_the_first_stage(tmp_path):
    proc = launch("demo", "--workdir", str(tmp_path / "runs"), "--shards", str(tmp_path / "shards"),
                  "train.max_step=3")
    assert_one_line(proc, "demo: error: unknown config key 'train.max_step' (did you mean 'max_steps'?)")
    assert not (tmp_path / "shards").exists()
