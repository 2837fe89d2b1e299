"""Elastic resume: a run saved on 2 ranks with ZeRO 2 resumes on 1 rank with ZeRO 1, on 2 ranks with ZeRO 0,
and back (ZeRO 0 / 1 -> ZeRO 2 on 2 ranks). Real torchrun ranks (gloo, CPU) and in-process runs.

What is compared at the resume point with the saving run's state there: Adam's step and every moment
tensor, the weights, the EMA, the loss scale and the lr; the data position (another number of ranks
continues at the start of the next epoch: no sample of the current epoch is seen twice) and the diffusion
RNG (restored on the same number of ranks, reseeded from (seed, rank, step) on another). End to end, a 2-rank
run switched from ZeRO 2 to ZeRO 0 halfway ends with the weights of the uninterrupted ZeRO-2 run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from elastic_probe import probe
from train_helpers import REPO, TINY, load_net_state, rank_env, torchrun, write_rrdb_weights, write_shards

from samdiffsr.distributed import derive_seed, free_port
from samdiffsr.io import torch_load
from samdiffsr.train import checkpoints
from samdiffsr.train.engine import main
from samdiffsr.train.optimizer_state import FULL_STATE

pytestmark = pytest.mark.slow

# 8 tiles, batch 4: an epoch is 1 step on 2 ranks (2 per rank), 2 steps on 1 rank. EMA on, so it is compared.
COMMON = ["train.ema_decay=0.9", "train.ckpt_every=2", "train.keep_last=5", "data.workers=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("elastic")
    return {"shards": write_shards(root / "train", sizes=(4, 4)), "rrdb": write_rrdb_weights(root / "rrdb.pt")}


def args(data: dict[str, str], run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "demo.yaml"), *TINY, *COMMON, f"data.train_shards={data['shards']}",
            "data.val_shards=", f"train.rrdb_ckpt={data['rrdb']}", f"train.run_dir={run_dir}", *extra]


def probe_ranks(probes: list[tuple[Path, list[str]]]) -> None:
    """tests/elastic_probe.py on 2 torchrun ranks, one process group for all ``probes`` (out, argv)."""
    argv = [a for i, (out, p) in enumerate(probes) for a in ([] if i == 0 else ["--"]) + [str(out), *p]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "tests" / "elastic_probe.py"), *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]


def saved(run_dir: Path, step: int) -> dict:
    """What the saving run had at ``step``: its optimizer_full.pt, the weights file (weights, EMA), the
    client state (data position) as DeepSpeed wrote it."""
    tag_dir = run_dir / "checkpoints" / checkpoints.tag_for(step)
    weights = torch.load(run_dir / "weights" / f"{checkpoints.tag_for(step)}.pt", weights_only=True)
    client = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)
    return {"full": torch_load(tag_dir / FULL_STATE, AssertionError), "weights": weights["model"],
            "ema": weights["ema"], "position": client["data_position"], "world_size": client["stream_key"][0],
            "seed": client["config"]["train"]["seed"], "rng": [torch.load(f, weights_only=True)["generator"]
                                                              for f in sorted(tag_dir.glob("rng_rank*.pt"))]}


def next_draws(state: torch.Tensor | None = None, seed: int = 0) -> list[float]:
    generator = torch.Generator()
    generator.set_state(state) if state is not None else generator.manual_seed(seed)
    return torch.rand(2, generator=generator).tolist()


def assert_restored(got: dict, ref: dict, step: int, world_size: int) -> None:
    full = ref["full"]
    assert got["step"] == step and got["adam_step"] == full["step"] == step  # no skipped update here
    for key in ("exp_avg", "exp_avg_sq"):
        assert got[key].keys() == full[key].keys()
        for name, value in full[key].items():  # gathered, set and gathered again: the same fp32 numbers
            assert torch.equal(got[key][name], value), (key, name)
        assert any(v.abs().max() > 0 for v in got[key].values())  # not a fresh Adam
    assert all(torch.equal(got["weights"][n], ref["weights"][n].float()) for n in got["weights"])
    averaged = [n for n in got["ema"] if n in got["weights"]]  # (the EMA's state also holds a counter)
    assert averaged and all(torch.equal(got["ema"][n], ref["ema"][n].float()) for n in averaged)
    assert any(not torch.equal(got["ema"][n], got["weights"][n]) for n in averaged)  # an average, not a copy
    assert got["loss_scale"] is None and got["lr"] == 5e-4  # fp32; the lr is the config's, step-decay far away
    epoch, index = ref["position"]
    if world_size == ref["world_size"]:  # each rank's diffusion RNG continues where it was
        assert got["position"] == [epoch, index]
        assert got["draws"] == [next_draws(state) for state in ref["rng"]]
    else:  # another number of ranks: the next epoch, from its start; the RNG reseeded from (seed, rank, step)
        assert got["position"] == [epoch + 1, 0]
        assert got["draws"] == [next_draws(seed=derive_seed(ref["seed"], r, 1, step) >> 1) for r in range(world_size)]


def test_zero2_on_2_ranks_resumes_on_1_rank_zero1_and_2_ranks_zero0_and_back(data, tmp_path):
    a, b, c = tmp_path / "a_2xZ2", tmp_path / "b_2xZ0", tmp_path / "c_1xZ1"
    torchrun(args(data, a, "train.zero_stage=2", "train.max_steps=4"))

    # 2 x ZeRO 2 -> 2 x ZeRO 0 from step 2, trained to 4: the uninterrupted ZeRO-2 run's weights and EMA
    # (ZeRO 2 reduces the gradients in another order: rounding only; a fresh Adam would differ by ~lr).
    step2 = a / "checkpoints" / checkpoints.tag_for(2)
    torchrun(args(data, b, "train.zero_stage=0", "train.max_steps=4", f"train.resume={step2}"))
    wa, wb = load_net_state(a), load_net_state(b)
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < 1e-6, worst

    # 2 x ZeRO 2 -> 1 x ZeRO 1, in this process: the state at the resume point, then 2 more steps.
    step4 = a / "checkpoints" / checkpoints.tag_for(4)
    got = probe(args(data, c, "train.zero_stage=1", "train.max_steps=6", f"train.resume={step4}"))
    assert_restored(got, saved(a, 4), step=4, world_size=1)
    main(args(data, c, "train.zero_stage=1", "train.max_steps=6", f"train.resume={step4}"))

    # And back, on 2 ranks with ZeRO 2: from the 1 x ZeRO-1 checkpoint, and from the 2 x ZeRO-0 one (whose
    # RNG states are this world size's: restored, the same draws as the saving run's next ones).
    out_c, out_b = tmp_path / "from_c.pt", tmp_path / "from_b.pt"
    probe_ranks([(out_c, args(data, c, "train.zero_stage=2", f"train.resume={c / 'checkpoints'}")),
                 (out_b, args(data, b, "train.zero_stage=2", f"train.resume={b / 'checkpoints'}"))])
    assert_restored(torch.load(out_c, weights_only=False), saved(c, 6), step=6, world_size=2)
    assert_restored(torch.load(out_b, weights_only=False), saved(b, 4), step=4, world_size=2)
