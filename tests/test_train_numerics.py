"""Training numerics end to end, in one process: the lr step decay, the EMA formula, fp16 dynamic loss scaling.

Each test is a real run of the engine (DeepSpeed on CPU, world size 1, tiny model) split into parts that
resume one another, so that what is checked also holds across a resume. Parts may read other shards (a
resume keeps the model and task, nothing else): a shard set whose every sample makes the loss non-finite
(a mask of 3e38: finite, so the reader accepts it, but the modulated noise overflows float32) or overflows
only fp16 (a mask of 1e9) places a skipped step exactly where the test wants it.
Every expected value is recomputed here from its formula, not read back from the engine's own state.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from train_helpers import REPO, SCALE, TINY, _npy, write_rrdb_weights, write_shards

from samdiffsr.config import load_config
from samdiffsr.data.reader import encode_mask
from samdiffsr.imresize import imresize
from samdiffsr.models import build_model
from samdiffsr.train.engine import main

LR, GAMMA = 1e-3, 0.5


def write_masked_shards(folder: Path, mask_value: float, n: int = 4, tile: int = 48) -> str:
    """One shard of ``n`` smooth tiles whose whole mask is ``mask_value`` (huge: see the module docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    with wds.TarWriter(str(folder / "train-000000.tar")) as sink:
        for j in range(n):
            hr = imresize(rng.integers(0, 256, (tile // 8, tile // 8, 3)).astype(np.uint8), output_shape=(tile, tile))
            fields = {"hr.npy": hr, "lr.npy": imresize(hr, 1 / SCALE),
                      **encode_mask(np.zeros((tile, tile), np.uint16), np.array([mask_value], np.float32))}
            sample = {key: _npy(value) for key, value in fields.items()}
            sink.write({"__key__": f"bad{j}", **sample, "json": json.dumps({"scale": SCALE}).encode()})
    (folder / "sizes.json").write_text(json.dumps({"train-000000.tar": n}))
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("numerics")
    return {"good": write_shards(root / "good"), "inf": write_masked_shards(root / "inf", 3e38),
            "huge": write_masked_shards(root / "huge", 1e9), "rrdb": write_rrdb_weights(root / "rrdb.pt")}


def run(data: dict[str, str], run_dir: Path, shards: str, *extra: str) -> dict:
    return main(["--config", str(REPO / "configs" / "demo.yaml"), *TINY, f"data.train_shards={data[shards]}",
                 "data.val_shards=", f"train.rrdb_ckpt={data['rrdb']}", f"train.run_dir={run_dir}",
                 "train.log_every=1", "train.ckpt_every=1", "train.keep_last=20", *extra])


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """The last value logged for each step under ``tag`` (a resumed part overwrites a redone step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in sorted(events.Scalars(tag), key=lambda e: e.wall_time)}


def losses(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "losses.jsonl").read_text().splitlines())}


def weights(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "weights" / f"step{step:08d}.pt", map_location="cpu", weights_only=True)


# --- 3. the learning-rate schedule ----------------------------------------------------------------
def test_lr_step_decay_is_exact_and_survives_a_resume_across_a_boundary(data, tmp_path):
    sched = [f"optim.lr={LR}", f"optim.decay_gamma={GAMMA}", "optim.decay_steps=2", "train.ckpt_every=1000"]
    assert run(data, tmp_path, "good", *sched, "train.max_steps=3")["step"] == 3  # checkpoint at the end
    # Resume at step 3 (mid-interval) and cross the boundaries at steps 4 and 6.
    out = run(data, tmp_path, "good", *sched, "train.max_steps=6")
    assert out["step"] == 6 and out["resumed_from"].endswith("step00000003")
    logged = scalars(tmp_path, "train/lr")  # (TensorBoard keeps float32)
    assert sorted(logged) == list(range(1, 7))
    for step, value in logged.items():  # after `step` updates: lr * gamma ** (step // decay_steps)
        assert value == pytest.approx(LR * GAMMA ** (step // 2), rel=1e-6), f"step {step}"
    assert [logged[s] for s in range(1, 7)] == pytest.approx([LR, LR / 2, LR / 2, LR / 4, LR / 4, LR / 8], rel=1e-6)


# --- 4. the EMA, recomputed from the per-step weights -----------------------------------------------
def test_ema_equals_its_formula_across_a_resume_and_a_skipped_step(data, tmp_path):
    decay = ["train.ema_decay=0.5"]
    run(data, tmp_path, "good", *decay, "train.max_steps=2")
    skip = run(data, tmp_path, "inf", *decay, "train.max_steps=3")  # step 3: Inf/NaN loss, update skipped
    assert skip["nonfinite_steps"] == 1
    run(data, tmp_path, "good", *decay, "train.max_steps=5")
    record = losses(tmp_path)
    assert [record[s]["skipped"] for s in range(1, 6)] == [False, False, True, False, False]

    # Step 0: the weights the engine starts from (seeded build, the RRDB then loaded from its file).
    cfg = load_config(REPO / "configs" / "demo.yaml", TINY)
    torch.manual_seed(cfg.train.seed)
    start = build_model(cfg.model)
    trained = [f"denoise_fn.{n}" for n, _ in start.denoise_fn.named_parameters()]
    prev = {k: v.double() for k, v in start.state_dict().items() if k in trained}
    ema = dict(prev)
    for step in range(1, 6):
        w = weights(tmp_path, step)
        assert w["step"] == step
        now = {k: w["model"][k].double() for k in trained}
        if record[step]["skipped"]:  # the skipped update changed neither the weights nor the EMA
            assert all(torch.equal(now[k], prev[k]) for k in trained)
        else:
            assert any(not torch.equal(now[k], prev[k]) for k in trained)
            ema = {k: 0.5 * ema[k] + 0.5 * now[k] for k in trained}  # ema_s = d ema_{s-1} + (1 - d) w_s
        for k in trained:
            torch.testing.assert_close(w["ema"][k].double(), ema[k], rtol=1e-6, atol=1e-7, msg=f"step {step} {k}")
        # Everything that is not trained (frozen RRDB, buffers) is the model's own value.
        assert all(torch.equal(w["ema"][k], v) for k, v in w["model"].items() if k not in trained)
        prev = now
    # The EMA is really behind the weights (so the comparison above is not of weights with themselves).
    assert any(not torch.allclose(ema[k], prev[k]) for k in trained)


# --- 6. fp16 dynamic loss scaling ---------------------------------------------------------------------
def test_fp16_overflow_halves_the_loss_scale_which_is_saved_restored_and_the_step_counted(data, tmp_path):
    fp16 = ["train.precision=fp16"]
    run(data, tmp_path, "good", *fp16, "train.max_steps=2")
    # Step 3: masks of 1e9 overflow fp16 (max 65504) in the autocast UNet: the GradScaler finds inf gradients.
    over = run(data, tmp_path, "huge", *fp16, "train.max_steps=3")
    assert over["nonfinite_steps"] == 1
    out = run(data, tmp_path, "good", *fp16, "train.max_steps=5")
    assert out["resumed_from"].endswith("step00000003") and out["nonfinite_steps"] == 0

    init = 2.0**16  # torch.amp.GradScaler's initial scale; it grows only after 2000 clean steps
    scale = scalars(tmp_path, "train/loss_scale")
    assert [scale[s] for s in range(1, 6)] == [init, init, init / 2, init / 2, init / 2]
    assert [losses(tmp_path)[s]["skipped"] for s in range(1, 6)] == [False, False, True, False, False]
    assert scalars(tmp_path, "train/nonfinite_steps")[3] == 1.0
    # Saved with the step-3 checkpoint (DeepSpeed does not keep the autocast GradScaler: the client state does).
    client = torch.load(tmp_path / "checkpoints" / "step00000003" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)
    assert client["grad_scaler"]["scale"] == init / 2
    # The overflowing step was not applied; the steps after it were.
    w2, w3, w4 = (weights(tmp_path, s)["model"] for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)
