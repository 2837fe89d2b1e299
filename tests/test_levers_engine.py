"""The convergence levers in real engine runs (DeepSpeed on CPU, one process, the TINY model): the paper configs
train exactly as before with the levers absent, each loss lever changes the training, and the EMA warm-up equals
its formula across a skipped step and a resume. The formulas' own tests: tests/test_levers.py.

This file also runs on the code from before the levers (it imports nothing they added): that is how its
reference values were recorded, and there the lever tests fail (unknown config keys) while the first passes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, TINY, write_rrdb_weights, write_shards

from samdiffsr.config import load_config
from samdiffsr.models import build_model
from samdiffsr.train.engine import main

# --- the paper configs train exactly as before --------------------------------------------------------
# Per-step losses (losses.jsonl) and the sum of the final EMA weights (float64) of the runs below, recorded
# with this file's `engine_run` on the ORIGINAL code (commit e7b3cca, before the levers existed), this file
# copied into that checkout's tests/, on torch 2.14.1, CPU capability AVX512, 2 threads:
#   SAMDIFFSR_RECORD_LEVERS=1 PYTHONPATH=. python -m pytest -q tests/test_levers_engine.py -k record -s
# Float results of the convolutions depend on the kernels the CPU selects and on the thread count: elsewhere
# the comparison is to 1e-5 (see `assert_same`).
RECORDED_ON = ("2.14.1", "AVX512", 2)
PAPER_LOSSES = [0.8175837397575378, 0.8172285556793213, 0.8098910450935364]
AUTHORS_LOSSES = [0.8175838589668274, 0.8172280788421631, 0.8098906874656677, 0.8137955069541931]
AUTHORS_EMA_SUM = 414.6281066693118
PAPER_STEPS, AUTHORS_STEPS = 3, 4


def environment() -> tuple[str, str, int]:
    return torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("levers")
    return {"good": write_shards(root / "good"), "rrdb": write_rrdb_weights(root / "rrdb.pt"),
            # Every mask value so large that the modulated noise overflows float32: each step is skipped.
            "inf": write_shards(root / "inf", sizes=(4,), mask_values=(3e38, 3e38, 3e38))}


def engine_run(data: dict[str, str], run_dir: Path, config: str, *extra: str, shards: str = "good") -> dict:
    """A real engine run of ``configs/<config>`` with the TINY model; returns its per-step losses and final EMA."""
    main(["--config", str(REPO / "configs" / config), *TINY, f"data.train_shards={data[shards]}", "data.val_shards=",
          f"train.rrdb_ckpt={data['rrdb']}", f"train.run_dir={run_dir}", "train.log_every=1", *extra])
    records = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    final = sorted((run_dir / "weights").glob("step*.pt"))[-1]
    ema = torch.load(final, map_location="cpu", weights_only=True)["ema"]
    return {"losses": [r["loss"] for r in records], "skipped": [r["skipped"] for r in records], "ema": ema,
            "ema_sum": sum(v.double().sum().item() for v in ema.values()) if ema else 0.0}


def paper_run(data, tmp_path: Path, *extra: str) -> dict:
    return engine_run(data, tmp_path / "paper", "samdiffsr_df2k4x.yaml", f"train.max_steps={PAPER_STEPS}", *extra)


def authors_run(data, tmp_path: Path, name: str, *extra: str, shards: str = "good") -> dict:
    """The authors' config, with an EMA (the paper trains without one) so that the EMA's path is covered too."""
    return engine_run(data, tmp_path / name, "authors_samdiffsr_df2k4x.yaml", "train.ema_decay=0.9",
                      f"train.max_steps={AUTHORS_STEPS}", *extra, shards=shards)


@pytest.mark.skipif(os.environ.get("SAMDIFFSR_RECORD_LEVERS") != "1", reason="records references (see above)")
def test_record(data, tmp_path):
    """Prints the reference values (run on the original code to record them; see the comment above)."""
    paper, authors = paper_run(data, tmp_path), authors_run(data, tmp_path, "authors")
    print(f"\nRECORDED_ON = {environment()}")
    print(f"PAPER_LOSSES = {paper['losses']}\nAUTHORS_LOSSES = {authors['losses']}\n"
          f"AUTHORS_EMA_SUM = {authors['ema_sum']!r}")


def assert_same(got: list[float] | float, recorded: list[float] | float) -> None:
    """Exactly equal where the reference was recorded (same torch, CPU kernels, threads); to 1e-5 elsewhere."""
    if environment() == RECORDED_ON:
        assert got == recorded
    else:
        assert got == pytest.approx(recorded, rel=1e-5), f"recorded on {RECORDED_ON}, running on {environment()}"


def test_the_paper_configs_train_exactly_as_before_with_the_levers_absent(data, tmp_path):
    paper = paper_run(data, tmp_path)
    assert len(paper["losses"]) == PAPER_STEPS and not any(paper["skipped"])
    assert_same(paper["losses"], PAPER_LOSSES)
    authors = authors_run(data, tmp_path, "authors")
    assert_same(authors["losses"], AUTHORS_LOSSES)
    assert_same(authors["ema_sum"], AUTHORS_EMA_SUM)


@pytest.mark.parametrize("lever", ["train.snr_gamma=5", "train.timestep_sampling=low_noise"])
def test_each_loss_lever_changes_the_training(data, tmp_path, lever):
    on = authors_run(data, tmp_path, "on", lever)
    assert not any(on["skipped"]) and len(on["losses"]) == AUTHORS_STEPS
    assert all(a != b for a, b in zip(on["losses"], AUTHORS_LOSSES, strict=True))  # from the first step on
    assert on["ema_sum"] != AUTHORS_EMA_SUM


def test_ema_warmup_in_training_equals_its_formula_across_a_skipped_step_and_a_resume(data, tmp_path):
    """Per-step weights of a run split into parts (steps 1-2 | 3, every update skipped | 4-5): the EMA of each
    step recomputed with the warm-up decay of its applied-update count (the skipped step 3 does not count)."""
    warm = ("train.ema_warmup_power=0.75", "train.ckpt_every=1", "train.keep_last=20")
    first = authors_run(data, tmp_path, "warm", *warm, "train.max_steps=2")
    assert_same(first["losses"], AUTHORS_LOSSES[:2])  # the warm-up changes only the average, not the training
    assert authors_run(data, tmp_path, "warm", *warm, "train.max_steps=3", shards="inf")["skipped"][2]
    record = authors_run(data, tmp_path, "warm", *warm, "train.max_steps=5")
    assert record["skipped"] == [False, False, True, False, False]

    cfg = load_config(REPO / "configs" / "authors_samdiffsr_df2k4x.yaml", TINY)
    torch.manual_seed(cfg.train.seed)  # the weights the engine starts from (see test_train_numerics.py)
    trained = [f"denoise_fn.{n}" for n, _ in build_model(cfg.model).denoise_fn.named_parameters()]
    ema, applied = None, 0
    for step in range(1, 6):
        w = torch.load(tmp_path / "warm" / "weights" / f"step{step:08d}.pt", map_location="cpu", weights_only=True)
        now = {k: w["model"][k].double() for k in trained}
        if not record["skipped"][step - 1]:
            d = min(0.9, 1 - (1 + applied) ** -0.75)  # t = 0: decay 0, the EMA becomes the weights
            ema = {k: d * ema[k] + (1 - d) * now[k] if ema else now[k] for k in trained}
            applied += 1
        for k in trained:
            torch.testing.assert_close(w["ema"][k].double(), ema[k], rtol=1e-6, atol=1e-7, msg=f"step {step} {k}")
    # Had the resume restarted the warm-up at t = 0 (decay 0), the EMA at step 5 would be the weights themselves.
    assert any(not torch.allclose(ema[k], now[k]) for k in trained)
