"""Resume across changes, in one process: channels_last toggled, `latest` as the truth, rollbacks, and the
key-by-key contract of docs/training.md ("Resume: the contract").

Real runs of the engine (DeepSpeed on CPU, world size 1) on tiny shards and a tiny model. Resuming on another
number of ranks or ZeRO stage is tests/test_elastic_resume.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, TINY, load_net_state, read_losses, stop_after, write_rrdb_weights, write_shards

from samdiffsr.train import checkpoints
from samdiffsr.train.engine import main


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    return {"shards": write_shards(root / "train"), "rrdb": write_rrdb_weights(root / "rrdb.pt")}


def run(data: dict[str, str], run_dir: Path, *extra: str, stop=None) -> dict:
    return main(["--config", str(REPO / "configs" / "demo.yaml"), *TINY, "data.workers=0",
                 f"data.train_shards={data['shards']}", "data.val_shards=", f"train.rrdb_ckpt={data['rrdb']}",
                 f"train.run_dir={run_dir}", *extra], stop_requested=stop)


# --- channels_last toggled across a resume (ZeRO 0) --------------------------------------------------------
def test_channels_last_toggled_at_a_resume_keeps_adam_right(data, tmp_path):
    # Fused Adam pairs a parameter with its moments by memory position: moments restored in the other layout
    # would update each weight with another weight's moments. A run toggled either way at step 2 must end
    # where the uninterrupted one does, up to the rounding of the two convolution layouts (measured: ~1e-7;
    # corrupted moments move weights by ~lr = 5e-4, 1.6e-3 measured on the code before the fix).
    common = ["train.max_steps=4", "train.ckpt_every=1000"]
    run(data, tmp_path / "full", *common, "train.channels_last=false")
    full = load_net_state(tmp_path / "full")
    for before, after in ((False, True), (True, False)):
        part = tmp_path / f"part_{before}_{after}"
        run(data, part, *common, f"train.channels_last={before}", stop=stop_after(2))
        run(data, part, *common, f"train.channels_last={after}")
        weights = load_net_state(part)
        worst = max(float((full[k] - weights[k]).abs().max()) for k in full)
        assert worst < 2e-6, (before, after, worst)


# --- `latest` is the truth; rollbacks ----------------------------------------------------------------------
def fake_checkpoints(ckpt_dir: Path, steps: list[int], latest: int) -> None:
    """Tag folders with a complete.json (what resolution reads) and a `latest` naming step ``latest``."""
    for step in steps:
        (ckpt_dir / checkpoints.tag_for(step)).mkdir(parents=True)
        (ckpt_dir / checkpoints.tag_for(step) / checkpoints.COMPLETE).write_text(f'{{"step": {step}}}')
    (ckpt_dir / checkpoints.LATEST).write_text(checkpoints.tag_for(latest))


def test_auto_resume_and_retention_follow_latest(tmp_path, caplog):
    ckpt_dir = tmp_path / "checkpoints"
    fake_checkpoints(ckpt_dir, [2, 4, 6], latest=4)
    with caplog.at_level(logging.WARNING):
        points = checkpoints.resolve_resume("auto", ckpt_dir)
    # latest first, then the older complete ones as fallbacks; the newer step 6 is off the committed branch.
    assert [p.tag for p in points] == [checkpoints.tag_for(4), checkpoints.tag_for(2)]
    assert "not resuming from the newer step00000006" in caplog.text
    # Retention counts back from latest: step 6 is not kept.
    checkpoints.Checkpoints(tmp_path, keep_last=2, keep_every=0, rank=0).prune(4)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest", "step00000002", "step00000004"]


def test_rollback_moves_the_newer_checkpoints_aside_and_a_preemption_continues_the_new_branch(data, tmp_path,
                                                                                               caplog):
    common = ["train.ckpt_every=2", "train.keep_last=5"]
    run(data, tmp_path, *common, "train.max_steps=6")
    ckpt_dir = tmp_path / "checkpoints"
    step2 = ckpt_dir / checkpoints.tag_for(2)
    # Roll back to step 2 with a lower lr; the run is preempted after one step (it checkpoints step 3).
    with caplog.at_level(logging.WARNING):
        out = run(data, tmp_path, *common, "train.max_steps=6", f"train.resume={step2}", "optim.lr=1e-4",
                  stop=stop_after(1))
    assert out["resumed_from"] == str(step2) and out["step"] == 3
    aside = [p for p in ckpt_dir.iterdir() if p.name.startswith("abandoned-step00000002-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step00000004", "step00000006",
                                                                              "weights"]
    assert sorted(p.name for p in (aside[0] / "weights").iterdir()) == ["step00000004.pt", "step00000006.pt"]
    assert "rollback to step00000002: the newer checkpoints step00000004, step00000006" in caplog.text
    # The requeued job (train.resume=auto) continues the new branch, from step 3, not the abandoned step 6.
    out = run(data, tmp_path, *common, "train.max_steps=5", "optim.lr=1e-4")
    assert out["resumed_from"] == str(ckpt_dir / checkpoints.tag_for(3)) and out["step"] == 5
    assert sorted(p.name for p in ckpt_dir.iterdir() if checkpoints.step_of(p.name)) == [
        "step00000002", "step00000003", "step00000004", "step00000005"]
    assert list(read_losses(tmp_path)) == [1, 2, 3, 4, 5]


# --- the contract: docs table == code, refusals, settings applied ------------------------------------------
def docs_table() -> dict[str, tuple[str, str]]:
    from samdiffsr.train.contract import APPLIED, CONVERTED, REFUSED

    text = (REPO / "docs" / "training.md").read_text()
    section = text[text.index("## Resume: the contract"):]
    section = section[:section.index("\n## ")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and cells[1] in (APPLIED, CONVERTED, REFUSED):
            rows["ranks" if cells[0] == "number of ranks" else cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def test_the_docs_table_is_the_contract_and_every_config_key_has_a_row():
    from samdiffsr.train.contract import CONTRACT, config_keys, contract_of  # (new: imported here, so that the
    # other tests of this file also run on the code before it)
    assert docs_table() == CONTRACT
    assert all(contract_of(key) for key in config_keys())  # KeyError names a key without a row


def test_a_refused_change_is_one_line_before_anything_loads(data, tmp_path):
    # A trainable RRDB is another set of trained parameters: DeepSpeed would fail on the optimizer state and
    # the message would advise removing the checkpoints.
    run(data, tmp_path, "train.max_steps=1")
    with pytest.raises(checkpoints.CheckpointError, match=r"^the checkpoint was trained with other "
                                                          r"train\.freeze_rrdb \(train\.freeze_rrdb: True -> False\)"):
        run(data, tmp_path, "train.max_steps=2", "train.freeze_rrdb=false")


def data_position(run_dir: Path, step: int) -> list[int]:
    tag_dir = run_dir / "checkpoints" / checkpoints.tag_for(step)
    return torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["data_position"]


def test_adam_settings_given_on_resume_apply_and_a_new_data_order_starts_at_the_next_epoch(data, tmp_path):
    # The param groups restored from a checkpoint would keep the old betas and weight decay.
    run(data, tmp_path / "a", "train.max_steps=3", stop=stop_after(2))
    step2 = tmp_path / "a" / "checkpoints" / checkpoints.tag_for(2)
    run(data, tmp_path / "same", "train.max_steps=3", f"train.resume={step2}")
    run(data, tmp_path / "adam", "train.max_steps=3", f"train.resume={step2}", "optim.weight_decay=1.0",
        "optim.betas=[0.5,0.9]")
    same, adam = load_net_state(tmp_path / "same"), load_net_state(tmp_path / "adam")
    assert max(float((same[k] - adam[k]).abs().max()) for k in same) > 1e-5
    # 12 tiles, batch 4: 3 batches an epoch. Step 2 ended at (epoch 0, batch 2). Another shuffle buffer is
    # another order of epoch 0: its rest would repeat samples, so the run goes on with epoch 1.
    run(data, tmp_path / "order", "train.max_steps=3", f"train.resume={step2}", "data.shuffle_buffer=2")
    assert data_position(tmp_path / "a", 2) == [0, 2] and data_position(tmp_path / "adam", 3) == [0, 3]
    assert data_position(tmp_path / "order", 3) == [1, 1]


def test_a_checkpoint_without_the_rank_independent_optimizer_state_is_refused_on_another_stage(data, tmp_path):
    # Written before optimizer_full.pt existed (or with it lost). DeepSpeed's ZeRO-1 engine looks for optimizer
    # files of its own, which a ZeRO-0 checkpoint lacks; its error was reported as "remove them to start over".
    run(data, tmp_path, "train.max_steps=1")
    (tmp_path / "checkpoints" / checkpoints.tag_for(1) / "optimizer_full.pt").unlink(missing_ok=True)
    with pytest.raises(checkpoints.CheckpointError, match=r"written on 1 rank\(s\) with ZeRO 0 and has no "
                                                          r"optimizer_full\.pt to resume on 1 rank\(s\) with ZeRO 1: "
                                                          r"resume it on 1 rank\(s\) with train\.zero_stage=0"):
        run(data, tmp_path, "train.max_steps=2", "train.zero_stage=1")
