"""One source for each engine setting, and the DeepSpeed step right in every configuration it accepts.

- fp16 with ZeRO 1/2 is refused (DeepSpeed's ZeRO optimizer never backs the loss scale off), and a
  ``deepspeed:`` key that disagrees with ``train.*`` / ``optim.*`` is refused, each in one line naming the keys.
- The lr schedule is ours (train/schedule.py): checked by hand at a few steps; a skipped step moves it the same
  way on ZeRO 0 and ZeRO 2; a new ``optim.lr`` / decay / warm-up / ``optim.grad_clip`` given on resume applies
  from the first resumed step, also over an old checkpoint that carries a DeepSpeed scheduler state.
- Every update not applied counts as skipped (fp16 back-offs too), so ``train.max_bad_steps`` fires; the stop
  saves a checkpoint and its one-line advice is a rerun that really resumes from it with the lower lr.
- The version floors of setup.py are checked at start, in one line.

Engine runs are real and in one process (DeepSpeed on CPU, world size 1, the tiny model); what the optimizer
really used is read from the DeepSpeed checkpoint of each step, not from what the loop logs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_train_numerics import losses, scalars, weights, write_masked_shards
from train_helpers import REPO, TINY, write_rrdb_weights, write_shards

from samdiffsr.config import ConfigError, OptimConfig, load_config
from samdiffsr.train.build import deepspeed_config
from samdiffsr.train.engine import main
from samdiffsr.train.nonfinite import NonFiniteLossError

LR = 1e-3


# --- refused in one line, before anything runs ----------------------------------------------------------
@pytest.mark.parametrize("zero", [1, 2])
def test_fp16_with_zero_1_or_2_is_refused_naming_both_keys(zero):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.precision=fp16", f"train.zero_stage={zero}"])
    message = str(err.value)
    assert "\n" not in message and "'train.precision' and 'train.zero_stage'" in message
    assert f"fp16 with ZeRO {zero} is refused" in message and "train.zero_stage=0" in message
    # What stays accepted: fp16 on ZeRO 0, bf16 and fp32 on every stage.
    load_config(None, ["train.precision=fp16", "train.zero_stage=0"])
    load_config(None, ["train.precision=bf16", f"train.zero_stage={zero}"])


@pytest.mark.parametrize("overrides, message", [
    (["train.zero_stage=2", "deepspeed.zero_optimization={stage: 1}"],
     "'deepspeed.zero_optimization.stage': 1 disagrees with train.zero_stage=2"),
    (["deepspeed.gradient_clipping=1.0"], "'deepspeed.gradient_clipping': 1.0 disagrees with optim.grad_clip=10"),
    (["train.grad_accum=2", "train.batch_size=8", "deepspeed.gradient_accumulation_steps=4"],
     "'deepspeed.gradient_accumulation_steps': 4 disagrees with train.grad_accum=2"),
    (["train.batch_size=8", "deepspeed.train_batch_size=16"], "'deepspeed.train_batch_size': 16 disagrees with "
                                                                "train.batch_size=8"),
    (["deepspeed.torch_autocast={enabled: true, dtype: bf16}"],
     "'deepspeed.torch_autocast.enabled': True disagrees with train.precision=fp32"),
    (["train.precision=bf16", "deepspeed.torch_autocast={dtype: fp16}"],
     "'deepspeed.torch_autocast.dtype': 'fp16' disagrees with train.precision=bf16"),
])
def test_a_deepspeed_key_that_disagrees_is_refused_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_deepspeed_json_and_micro_batch_are_checked_against_the_world_size(tmp_path):
    # The micro batch needs the world size: checked where the engine's config is made, before DeepSpeed runs.
    cfg = load_config(None, ["train.batch_size=8", "deepspeed.train_micro_batch_size_per_gpu=4"])
    assert deepspeed_config(cfg, world_size=2)["train_micro_batch_size_per_gpu"] == 4  # 8 / (1 x 2): agrees
    with pytest.raises(ConfigError, match=re.escape(
            "'deepspeed.train_micro_batch_size_per_gpu': 4 disagrees with train.batch_size=8 / (train.grad_accum=1 "
            "x 1 ranks) (which sets 8)")):
        deepspeed_config(cfg, world_size=1)
    # A DeepSpeed JSON file is read when the engine starts: its keys are checked then.
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": True}}))
    cfg = load_config(None, ["train.batch_size=8", f"deepspeed={path}"])
    with pytest.raises(ConfigError, match=re.escape("'deepspeed.zero_optimization.stage': 1 disagrees with "
                                                    "train.zero_stage=0")):
        deepspeed_config(cfg, world_size=1)
    # Equal values and keys that train / optim do not decide pass through.
    cfg = load_config(None, ["train.batch_size=8", "train.zero_stage=1", f"deepspeed={path}",
                             "deepspeed.gradient_clipping=10", "deepspeed.wall_clock_breakdown=true"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert ds["gradient_clipping"] == 10 and ds["wall_clock_breakdown"] is True


# --- the lr schedule, by hand -----------------------------------------------------------------------------
def test_lr_schedule_formula_by_hand():
    from samdiffsr.train.schedule import lr_at

    paper = OptimConfig(lr=2e-4, decay_steps=200_000, decay_gamma=0.5)
    assert [lr_at(paper, s) for s in (0, 199_999, 200_000, 399_999, 400_000)] == [2e-4, 2e-4, 1e-4, 1e-4, 5e-5]
    warm = OptimConfig(lr=1e-3, decay_steps=10, decay_gamma=0.5, warmup_steps=4)
    # lr_at(s) is the lr of update s + 1: 1/4, 2/4, 3/4 of lr, then lr; the decay applies on top.
    expected = {0: 0.25e-3, 1: 0.5e-3, 2: 0.75e-3, 3: 1e-3, 4: 1e-3, 9: 1e-3, 10: 0.5e-3, 25: 0.25e-3}
    for step, lr in expected.items():
        assert lr_at(warm, step) == pytest.approx(lr, rel=1e-12), step
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        load_config(None, ["optim.warmup_steps=-1"])


# --- engine runs ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("settings")
    return {"good": write_shards(root / "good"), "inf": write_masked_shards(root / "inf", 3e38),
            "rrdb": write_rrdb_weights(root / "rrdb.pt")}


def run(data: dict[str, str], run_dir: Path, shards: str, *extra: str) -> dict:
    return main(["--config", str(REPO / "configs" / "demo.yaml"), *TINY, f"data.train_shards={data[shards]}",
                 "data.val_shards=", f"train.rrdb_ckpt={data['rrdb']}", f"train.run_dir={run_dir}",
                 "train.log_every=1", "train.ckpt_every=1", "train.keep_last=20", f"optim.lr={LR}", *extra])


def used(run_dir: Path, step: int) -> dict:
    """What the optimizer held after update ``step`` (its lr is the one that update used), from DeepSpeed's
    checkpoint: ZeRO 0 keeps it with the model, ZeRO 1/2 in their partitioned optimizer file."""
    tag = run_dir / "checkpoints" / f"step{step:08d}"
    zero_file = tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if zero_file.is_file():
        state = torch.load(zero_file, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        return {"lr": state["base_optimizer_state"]["param_groups"][0]["lr"], "clip_grad": state["clip_grad"]}
    state = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {"lr": state["optimizer"]["param_groups"][0]["lr"]}


@pytest.mark.parametrize("zero", [0, 2])
def test_a_skipped_step_moves_the_lr_schedule_the_same_on_every_zero_stage(data, tmp_path, zero):
    sched = [f"train.zero_stage={zero}", "optim.decay_gamma=0.5", "optim.decay_steps=3"]
    run(data, tmp_path, "good", *sched, "train.max_steps=2")
    assert run(data, tmp_path, "inf", *sched, "train.max_steps=3")["nonfinite_steps"] == 1  # step 3: skipped
    run(data, tmp_path, "good", *sched, "train.max_steps=5")
    assert [losses(tmp_path)[s]["skipped"] for s in range(1, 6)] == [False, False, True, False, False]
    # The schedule counts the loop's steps, the skipped one included: update s uses lr * 0.5 ** ((s - 1) // 3),
    # so update 4 (the first after the skip) already uses the decayed lr, on every stage.
    assert [used(tmp_path, s)["lr"] for s in range(1, 6)] == [LR, LR, LR, LR / 2, LR / 2]
    logged = scalars(tmp_path, "train/lr")  # after step s: the lr of update s + 1
    assert [logged[s] for s in range(1, 6)] == pytest.approx([LR, LR, LR / 2, LR / 2, LR / 2], rel=1e-6)


def test_a_new_lr_decay_and_clip_on_resume_apply_from_the_first_resumed_step(data, tmp_path):
    run(data, tmp_path, "good", "train.zero_stage=1", "train.max_steps=2")
    # An old checkpoint carries DeepSpeed's LambdaLR state (base_lrs = the old lr): it loads, and is ignored.
    model_file = tmp_path / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    state = torch.load(model_file, map_location="cpu", weights_only=False)
    state["lr_scheduler"] = {"base_lrs": [LR], "last_epoch": 2, "_step_count": 3, "_last_lr": [LR],
                             "lr_lambdas": [None], "verbose": False, "_get_lr_called_within_step": False}
    torch.save(state, model_file)
    new = ["train.zero_stage=1", f"optim.lr={LR / 4}", "optim.decay_steps=3", "optim.decay_gamma=0.1",
           "optim.warmup_steps=4", "optim.grad_clip=0.5", "train.max_steps=4"]
    out = run(data, tmp_path, "good", *new)
    assert out["resumed_from"].endswith("step00000002")
    assert used(tmp_path, 2) == {"lr": LR, "clip_grad": 10.0}
    # Update 3 uses the new lr at step 2: no decay yet (2 // 3 = 0), 3/4 of the way through the warm-up;
    # update 4 the new decay (3 // 3 = 1), the warm-up over (update 4 of 4).
    assert used(tmp_path, 3) == {"lr": pytest.approx(LR / 4 * 3 / 4, rel=1e-12), "clip_grad": 0.5}
    assert used(tmp_path, 4) == {"lr": pytest.approx(LR / 4 * 0.1, rel=1e-12), "clip_grad": 0.5}


def inject_loss_scale(run_dir: Path, step: int, scale: float) -> None:
    """A loss scale far too high for these gradients, as a long fp16 run reaches after many clean steps."""
    path = run_dir / "checkpoints" / f"step{step:08d}" / "mp_rank_00_model_states.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["grad_scaler"]["scale"] = scale
    torch.save(state, path)


def test_fp16_back_offs_count_as_skipped_steps_and_max_bad_steps_stops_the_run(data, tmp_path):
    fp16 = ["train.precision=fp16", "train.max_bad_steps=3"]
    run(data, tmp_path, "good", *fp16, "train.max_steps=2")
    inject_loss_scale(tmp_path, 2, 2.0**28)  # steps 3, 4, 5 overflow in fp16 (the losses stay finite)
    with pytest.raises(NonFiniteLossError, match=r"^3 optimizer steps in a row were skipped .*\(steps 3 to 5;"):
        run(data, tmp_path, "good", *fp16, "train.max_steps=20")
    record = losses(tmp_path)
    assert all(torch.isfinite(torch.tensor(record[s]["loss"])) for s in range(1, 6))
    assert [record[s]["skipped"] for s in range(1, 6)] == [False, False, True, True, True]
    assert [scalars(tmp_path, "train/loss_scale")[s] for s in (3, 4, 5)] == [2.0**27, 2.0**26, 2.0**25]
    assert [scalars(tmp_path, "train/nonfinite_steps")[s] for s in (2, 3, 4, 5)] == [0, 1, 2, 3]
    w2, w5 = weights(tmp_path, 2)["model"], weights(tmp_path, 5)["model"]
    assert all(torch.equal(w2[k], w5[k]) for k in w2)  # none of the skipped updates changed the weights


def test_the_nonfinite_stop_saves_and_its_advice_resumes_from_there_with_the_lower_lr(data, tmp_path):
    run(data, tmp_path, "good", "train.max_steps=2", "train.ckpt_every=1000")
    with pytest.raises(NonFiniteLossError) as err:  # steps 3 and 4: non-finite losses (checkpoints every 1000)
        run(data, tmp_path, "inf", "train.max_steps=20", "train.max_bad_steps=2", "train.ckpt_every=1000")
    tag = tmp_path / "checkpoints" / "step00000004"
    message = str(err.value)
    assert "\n" not in message and message.startswith("2 optimizer steps in a row were skipped")
    assert message.endswith(f"rerun the same command with optim.lr={LR / 2:g} (or check the data): it resumes "
                            f"from {tag}"), message
    assert (tag / "complete.json").is_file()
    w2, w4 = weights(tmp_path, 2)["model"], weights(tmp_path, 4)["model"]
    assert all(torch.equal(w2[k], w4[k]) for k in w2)  # the last good step's weights

    lower = re.search(r"optim\.lr=(\S+)", message).group(1)
    out = run(data, tmp_path, "good", "train.max_steps=5", "train.ckpt_every=1000", f"optim.lr={lower}")
    assert out["resumed_from"] == str(tag) and out["nonfinite_steps"] == 0
    assert used(tmp_path, 5)["lr"] == LR / 2 and scalars(tmp_path, "train/lr")[5] == pytest.approx(LR / 2)



def test_the_rerun_advice_names_the_checkpoint_when_the_command_resumes_from_another():
    from samdiffsr.train.nonfinite import rerun_advice

    tag = Path("runs/x/checkpoints/step00000400")
    assert rerun_advice(2e-4, "auto", tag) == ("rerun the same command with optim.lr=0.0001 (or check the data): "
                                               "it resumes from runs/x/checkpoints/step00000400")
    # An explicit train.resume (or never) would not reach the checkpoint just saved: the advice names it.
    for setting in ("runs/old/checkpoints/step00000100", "never"):
        assert rerun_advice(2e-4, setting, tag).startswith(
            f"rerun the same command with optim.lr=0.0001 train.resume={tag} (or check the data)")


# --- version floors -----------------------------------------------------------------------------------
def test_version_floors_are_those_of_setup_py_and_refuse_an_older_install_in_one_line():
    from samdiffsr.train.versions import FLOORS, VersionError, check_version, check_versions

    setup = (REPO / "setup.py").read_text()
    for name, (floor, _) in FLOORS.items():
        assert f'"{name}>={floor}",' in setup, name
    with pytest.raises(VersionError) as err:
        check_version("deepspeed", "0.15.1")
    assert str(err.value) == ("deepspeed 0.15.1 is installed; samdiffsr needs deepspeed>=0.18.0 "
                              "(engine.torch_autocast_z0_gradscaler, the ZeRO-0 fp16 GradScaler of torch_autocast)")
    for older in ("0.17.6", "0.17.99+cu12", "0.9.0"):
        with pytest.raises(VersionError, match=f"deepspeed {re.escape(older)} is installed"):
            check_version("deepspeed", older)
    for newer in ("0.18.0", "0.18", "0.19.8", "0.20.0rc1", "1.0"):
        check_version("deepspeed", newer)
    with pytest.raises(VersionError, match=r"torch 2\.3\.1\+cu121 is installed; samdiffsr needs torch>=2\.4 \("):
        check_version("torch", "2.3.1+cu121")
    for newer in ("2.4.0", "2.4.0a0+git1234", "2.14.1+cu128", "3.0"):
        check_version("torch", newer)
    check_versions()  # what is installed here passes
