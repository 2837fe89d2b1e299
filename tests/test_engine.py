"""Training engine, in one process: DeepSpeed config, exact resume, checkpoints, RRDB loading, NaN skips, bad data.

Every test runs the real engine (DeepSpeed on CPU, gloo, world size 1) on tiny shards and a tiny model.
The multi-process acceptance tests are in test_distributed_training.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import (
    REPO,
    TINY,
    load_net_state,
    rank_env,
    read_losses,
    stop_after,
    write_rrdb_weights,
    write_shards,
)

from samdiffsr.cli import EXIT_FAILED, EXIT_USAGE
from samdiffsr.config import ConfigError, load_config
from samdiffsr.models import RRDBNet, WeightsError, build_model, save_weights
from samdiffsr.train import checkpoints
from samdiffsr.train.build import deepspeed_config
from samdiffsr.train.engine import main
from samdiffsr.train.nonfinite import NonFiniteLossError


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    return {"shards": write_shards(root / "train"), "val": write_shards(root / "val", sizes=(2,), tile=64),
            "rrdb": write_rrdb_weights(root / "rrdb.pt")}


def run(data: dict[str, str], run_dir: Path, *extra: str, config: str = "demo.yaml", stop=None) -> dict:
    argv = ["--config", str(REPO / "configs" / config), *TINY, f"data.train_shards={data['shards']}",
            "data.val_shards=", f"train.rrdb_ckpt={data['rrdb']}", f"train.run_dir={run_dir}", *extra]
    return main(argv, stop_requested=stop)


# `engine.cli` in a fresh process, as launcher/train.py runs it (process_main); then the DataLoader workers alive.
PROBE = """
import multiprocessing
from samdiffsr.train.engine import cli
code = cli()
print("live child processes:", len(multiprocessing.active_children()), flush=True)
raise SystemExit(code)
"""


def launch(data: dict[str, str], run_dir: Path, *extra: str, shards: str | None = None) -> subprocess.CompletedProcess:
    """The train command in a subprocess; a hang (a worker left alive blocks the exit) fails after 120 s."""
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), *TINY, f"data.train_shards={shards or data['shards']}",
            "data.val_shards=", f"train.rrdb_ckpt={data['rrdb']}", f"train.run_dir={run_dir}", *extra]
    return subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=REPO, env=rank_env(), capture_output=True,
                          text=True, timeout=120)


# --- DeepSpeed config ------------------------------------------------------------------------------
def test_deepspeed_config_is_derived_from_train_and_optim(tmp_path):
    cfg = load_config(None, ["train.batch_size=64", "train.grad_accum=2", "train.zero_stage=2",
                             "train.precision=bf16", "optim.grad_clip=10"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_clipping"] == 10.0  # explicit, not DeepSpeed's default of 1.0
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bf16"}
    assert "torch_autocast" not in deepspeed_config(load_config(None, ["train.batch_size=4"]), 1)

    # The deepspeed section (or a JSON file it names) is merged over the derived values; a key that disagrees
    # with a derived one is refused (tests/test_engine_settings.py).
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": True}, "gradient_clipping": 10}))
    cfg = load_config(None, ["train.batch_size=8", "train.zero_stage=1", f"deepspeed={path}",
                             "deepspeed.wall_clock_breakdown=true"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert ds["gradient_clipping"] == 10 and ds["wall_clock_breakdown"] is True


@pytest.mark.parametrize("overrides, world, message", [
    (["train.batch_size=6", "train.grad_accum=2"], 2, "not divisible"),
    (["deepspeed.optimizer={type: Adam}"], 1, "deepspeed.optimizer"),
    (["deepspeed.bf16={enabled: true}"], 1, "train.precision=bf16"),
    (["train.batch_size=8", "deepspeed.train_micro_batch_size_per_gpu=3"], 1, "train_micro_batch_size_per_gpu': 3"),
])
def test_deepspeed_config_errors_name_the_key(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        deepspeed_config(load_config(None, overrides), world)


# --- exact resume, checkpoints, retention ----------------------------------------------------------
def test_stop_request_checkpoints_and_resume_continues_exactly(data, tmp_path):
    common = ["train.max_steps=6", "train.ckpt_every=2", "train.keep_last=1", "train.keep_every=4",
              "train.ema_decay=0.9", "train.grad_accum=2", "train.batch_size=4"]
    full = run(data, tmp_path / "full", *common)
    assert full["step"] == 6 and not full["stopped"] and full["resumed_from"] is None

    # The stop hook: polled after every step; the run checkpoints at that step boundary and returns.
    part = run(data, tmp_path / "part", *common, stop=stop_after(3))
    assert part["stopped"] and part["step"] == 3
    assert checkpoints.read_latest(tmp_path / "part" / "checkpoints").tag == "step00000003"
    rest = run(data, tmp_path / "part", *common)
    assert rest["step"] == 6 and rest["resumed_from"].endswith("step00000003")

    assert read_losses(tmp_path / "full") == read_losses(tmp_path / "part")
    assert list(read_losses(tmp_path / "part")) == [1, 2, 3, 4, 5, 6]
    for name in ("step00000006.pt", "latest.pt"):
        a = torch.load(tmp_path / "full" / "weights" / name, weights_only=True)
        b = torch.load(tmp_path / "part" / "weights" / name, weights_only=True)
        assert a["step"] == b["step"] == 6
        for key in ("model", "ema"):
            assert a[key].keys() == b[key].keys()
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    # The EMA moved away from the weights, and covers the trainable UNet only (the RRDB is frozen).
    w = torch.load(tmp_path / "full" / "weights" / "latest.pt", weights_only=True)
    unet = [k for k in w["model"] if k.startswith("denoise_fn.") and k.endswith("weight")]
    assert all(not torch.equal(w["ema"][k], w["model"][k]) for k in unet)
    assert all(torch.equal(w["ema"][k], w["model"][k]) for k in w["model"] if k.startswith("rrdb."))

    # Retention: the last checkpoint plus every 4th step; weights files follow their checkpoints.
    ckpt_dir = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step00000004", "step00000006"]
    assert sorted(p.name for p in (tmp_path / "full" / "weights").iterdir()) == [
        "latest.pt", "step00000004.pt", "step00000006.pt"]
    assert (tmp_path / "full" / "config.yaml").is_file() and any((tmp_path / "full" / "tb").iterdir())


def test_fp16_run_resumes_exactly(data, tmp_path):
    # fp16 autocast with DeepSpeed's GradScaler, whose state the checkpoint carries. (The loss scale
    # itself does not move in 4 steps of this model, so this checks the machinery, not a changed scale.)
    common = ["train.precision=fp16", "train.max_steps=4", "train.log_every=1"]
    run(data, tmp_path / "full", *common)
    assert run(data, tmp_path / "part", *common, stop=stop_after(2))["step"] == 2
    run(data, tmp_path / "part", *common)
    assert read_losses(tmp_path / "full") == read_losses(tmp_path / "part")
    a, b = load_net_state(tmp_path / "full"), load_net_state(tmp_path / "part")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_settings(data, tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint"):
        run(data, tmp_path / "a", "train.max_steps=2", "train.resume=must")
    run(data, tmp_path / "a", "train.max_steps=2")
    with pytest.raises(checkpoints.CheckpointError, match="already holds checkpoints"):
        run(data, tmp_path / "a", "train.max_steps=4", "train.resume=never")

    # An explicit checkpoint folder, here another run's: continue from it into a new run folder.
    tag_dir = tmp_path / "a" / "checkpoints" / "step00000002"
    out = run(data, tmp_path / "b", "train.max_steps=3", f"train.resume={tag_dir}")
    assert out["resumed_from"] == str(tag_dir) and out["step"] == 3

    # A `latest` that names an incomplete checkpoint, with no other to fall back to, is an error, not a
    # silent restart (tests/test_checkpoints.py: the fallback to an older checkpoint).
    marker = (tag_dir / checkpoints.COMPLETE).read_text()
    (tag_dir / checkpoints.COMPLETE).unlink()
    with pytest.raises(checkpoints.CheckpointError, match="none is complete"):
        run(data, tmp_path / "a", "train.max_steps=4")
    # And a checkpoint DeepSpeed cannot read is an error that names it.
    (tag_dir / checkpoints.COMPLETE).write_text(marker)
    (tag_dir / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    with pytest.raises(checkpoints.CheckpointError, match="cannot load checkpoint"):
        run(data, tmp_path / "a", "train.max_steps=4")


def test_resume_refuses_another_model(data, tmp_path):
    run(data, tmp_path, "train.max_steps=1")
    with pytest.raises(checkpoints.CheckpointError, match="model.timesteps"):
        run(data, tmp_path, "train.max_steps=2", "model.timesteps=12")


# --- the frozen RRDB -------------------------------------------------------------------------------
def test_rrdb_checkpoint_is_required_and_checked(data, tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        run(data, tmp_path / "a", "train.max_steps=1", f"train.rrdb_ckpt={tmp_path / 'missing.pt'}")
    with pytest.raises(ConfigError, match="train.rrdb_ckpt"):
        run(data, tmp_path / "b", "train.max_steps=1", "train.rrdb_ckpt=")
    wrong = tmp_path / "wrong.pt"
    save_weights(wrong, RRDBNet(nf=8, nb=3, gc=4))
    with pytest.raises(WeightsError) as err:  # 3 blocks against the config's 2: say which override fits
        run(data, tmp_path / "c", "train.max_steps=1", f"train.rrdb_ckpt={wrong}")
    assert str(err.value) == (
        f"{wrong} does not match the model built from the config (0 missing, 30 unexpected, 0 mis-shaped keys): "
        "pass the config it was trained with (--config; the authors' checkpoint is configs/samdiffsr_df2k4x.yaml) "
        "or the overrides model.rrdb_num_block=3")


def test_authors_rrdb_checkpoint_layout_is_loaded_and_stays_frozen(data, tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY)
    torch.manual_seed(123)
    rrdb = build_model(cfg.model).rrdb
    state = {k: v.clone() for k, v in rrdb.state_dict().items()}
    authors = tmp_path / "model_ckpt_steps_100000.ckpt"
    torch.save({"state_dict": {"model": state}, "global_step": 100000, "optimizer_states": []}, authors)
    out = run(data, tmp_path / "run", "train.max_steps=2", f"train.rrdb_ckpt={authors}", "train.channels_last=true")
    assert out["step"] == 2
    final = load_net_state(tmp_path / "run")
    assert all(torch.equal(final[f"rrdb.{k}"], v) for k, v in state.items())


# --- NaN/Inf losses and bad data --------------------------------------------------------------------
@pytest.mark.parametrize("zero", [0, 1])
def test_nonfinite_losses_skip_the_update_and_stop_the_run(data, tmp_path, zero):
    # lr 1e30: the first update blows the weights up, every later loss is NaN/Inf. (ZeRO 0: our found_inf
    # skip in the fused Adam; ZeRO 1: DeepSpeed's own skip on non-finite gradients, on top.)
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        run(data, tmp_path, f"train.zero_stage={zero}", "optim.lr=1e30", "train.max_steps=20", "train.max_bad_steps=3",
            "train.log_every=1", "train.ckpt_every=1", "train.keep_last=10", "train.ema_decay=0.5")
    losses = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in losses] == [False, True, True, True]
    assert torch.isfinite(torch.tensor(losses[0]["loss"]))
    after_1 = torch.load(tmp_path / "weights" / "step00000001.pt", weights_only=True)
    after_3 = torch.load(tmp_path / "weights" / "step00000003.pt", weights_only=True)
    for key in ("model", "ema"):  # skipped steps changed neither the weights nor the EMA
        assert all(torch.equal(after_1[key][k], after_3[key][k]) for k in after_1[key]), key


def test_skipped_steps_are_reported_with_their_own_step_numbers(data, tmp_path, caplog):
    # Steps 2.. are NaN; the log interval (5) ends later than the run of bad steps starts.
    with pytest.raises(NonFiniteLossError, match=r"4 optimizer steps in a row were skipped .* \(steps 2 to 5;"):
        run(data, tmp_path, "optim.lr=1e30", "train.max_steps=20", "train.max_bad_steps=2", "train.log_every=5")
    assert "step(s) 2-5: update skipped (NaN/Inf loss or gradients)" in caplog.text


def test_nonfinite_losses_end_the_command_with_one_line_and_exit_4(data, tmp_path):
    proc = launch(data, tmp_path, "optim.lr=1e30", "train.max_steps=20", "train.max_bad_steps=2",
                  "train.log_every=5")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "train: error: 4 optimizer steps in a row were skipped for a NaN/Inf loss or gradients (steps 2 to 5; limit "
        "train.max_bad_steps=2); the weights are those of the last good step: rerun the same command with "
        f"optim.lr=5e+29 (or check the data): it resumes from {tmp_path / 'checkpoints' / 'step00000005'}"), proc.stderr
    assert proc.stderr.count("train: error:") == 1
    assert proc.returncode == EXIT_FAILED and "live child processes: 0" in proc.stdout


def test_shards_without_a_usable_sample_end_the_run_with_one_line_and_no_worker_left(data, tmp_path):
    # NaN mask values: the reader rejects every sample. The workers ignore SIGTERM / SIGUSR2 (train/stop.py),
    # so torch's own shutdown cannot end one that lingers; the run must still end, with no worker left.
    shards = write_shards(tmp_path / "nan", sizes=(2, 2), mask_values=(float("nan"),) * 3)
    proc = launch(data, tmp_path / "run", "train.max_steps=4", shards=shards)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert re.fullmatch(
        rf"train: error: config key 'data\.train_shards': 124 shard reads in a row gave no usable sample \(last: "
        rf"{re.escape(shards)}/train-00000[01]\.tar\); skipped: [1-9]\d* corrupt samples, 0 unreadable shards, "
        r"0 tiles smaller than the patch \(see the warnings above\)", proc.stderr.splitlines()[-1]), proc.stderr
    assert "mask values (segval.npy) must be finite numbers" in proc.stderr
    assert proc.returncode == EXIT_USAGE and "live child processes: 0" in proc.stdout, (proc.stdout, proc.stderr)


def test_corrupt_shard_is_skipped_counted_and_training_goes_on(tmp_path, data):
    shards = write_shards(tmp_path / "shards", sizes=(4, 4, 4), corrupt_shard=1)
    out = main(["--config", str(REPO / "configs" / "demo.yaml"), *TINY, f"data.train_shards={shards}",
                "data.val_shards=", f"train.rrdb_ckpt={data['rrdb']}", f"train.run_dir={tmp_path / 'run'}",
                "train.max_steps=8"])
    assert out["step"] == 8
    assert out["data_errors"]["read_errors"] + out["data_errors"]["bad_samples"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in read_losses(tmp_path / "run").values())


# --- the two tasks, from their configs ---------------------------------------------------------------
def test_rrdb_pretraining_then_diffusion_from_the_demo_configs(data, tmp_path):
    val = ["data.val_shards=" + data["val"], "train.val_every=2", "train.val_crop=32", "train.val_steps=3"]
    rrdb_run = tmp_path / "demo_rrdb"
    out = main(["--config", str(REPO / "configs" / "demo_rrdb.yaml"), *TINY, f"data.train_shards={data['shards']}",
                f"train.run_dir={rrdb_run}", "train.max_steps=2", *val])
    assert out["step"] == 2
    rrdb_weights = torch.load(rrdb_run / "weights" / "latest.pt", weights_only=True)
    assert all(not k.startswith(("rrdb.", "denoise_fn.")) for k in rrdb_weights["model"])  # the RRDBNet alone

    diff_run = tmp_path / "demo"
    out = main(["--config", str(REPO / "configs" / "demo.yaml"), *TINY, f"data.train_shards={data['shards']}",
                f"train.rrdb_ckpt={rrdb_run / 'weights' / 'latest.pt'}", f"train.run_dir={diff_run}",
                "train.max_steps=2", *val])
    assert out["step"] == 2
    final = load_net_state(diff_run)
    assert all(torch.equal(final[f"rrdb.{k}"], v) for k, v in rrdb_weights["model"].items())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(diff_run / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "data/wait_fraction",
                "train/nonfinite_steps", "data/read_errors", "val/psnr_y", "val/ssim_y", "val/bicubic_psnr_y"):
        assert tag in tags["scalars"], tag
    assert {"val/0/lr", "val/0/bicubic", "val/0/sr", "val/0/hr"} <= set(tags["images"])
    assert load_config(diff_run / "config.yaml").train.rrdb_ckpt == str(rrdb_run / "weights" / "latest.pt")
