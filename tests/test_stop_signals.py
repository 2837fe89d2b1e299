"""SIGTERM / SIGUSR2 sent to a whole process group (as Slurm and `kill -- -PGID` do) while DataLoader workers run.

Every process gets the signal, the workers included: they must leave it to their rank, which saves a
checkpoint at the next step and stops. Real training processes under each launcher, tiny model, CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import REPO, TINY, rank_env, write_rrdb_weights, write_shards

from samdiffsr.distributed import free_port
from samdiffsr.train import checkpoints

pytestmark = pytest.mark.slow

TRAIN = str(REPO / "launcher" / "train.py")
LAUNCHERS = {
    "python": [sys.executable, TRAIN],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port={port}",
                 TRAIN],
    "deepspeed": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes", "1", "--num_gpus", "2",
                  "--master_port", "{port}", TRAIN],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("signals")
    return {"shards": write_shards(root / "train", sizes=(4, 4)), "rrdb": write_rrdb_weights(root / "rrdb.pt")}


def _logged_steps(run_dir: Path) -> int:
    try:
        return len((run_dir / "losses.jsonl").read_text().splitlines())
    except OSError:
        return 0


def _wait_for_group_to_end(pgid: int, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {pgid} still run {timeout:.0f} s after the signal")


@pytest.mark.parametrize("launcher, name", [("python", "SIGTERM"), ("python", "SIGUSR2"), ("torchrun", "SIGTERM"),
                                            ("deepspeed", "SIGTERM")])
def test_group_signal_with_data_workers_saves_a_checkpoint_at_the_stop_step(data, tmp_path, launcher, name):
    signum = getattr(signal, name)
    run_dir = tmp_path / "run"
    cmd = [c.format(port=free_port()) for c in LAUNCHERS[launcher]]
    cmd += ["--config", str(REPO / "configs" / "demo.yaml"), *TINY, "data.workers=2",
            f"data.train_shards={data['shards']}", "data.val_shards=", f"train.rrdb_ckpt={data['rrdb']}",
            f"train.run_dir={run_dir}", "train.max_steps=100000", "train.log_every=1",
            "data.samples_per_epoch=100000"]  # workers that live through the whole test
    log = tmp_path / "out.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=rank_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group, as a Slurm step
    try:
        deadline = time.time() + 300
        while _logged_steps(run_dir) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()[-4000:]
        os.killpg(proc.pid, signum)  # every process of the group: launcher, ranks, DataLoader workers
        proc.wait(timeout=120)
        _wait_for_group_to_end(proc.pid, timeout=120)  # the deepspeed runner exits before its ranks
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert "killed by signal" not in output, output[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"], summary
    stop_step = summary["step"]
    latest = (run_dir / "checkpoints" / checkpoints.LATEST).read_text().strip()
    assert latest == checkpoints.tag_for(stop_step), output[-4000:]
    assert (run_dir / "checkpoints" / latest / checkpoints.COMPLETE).is_file()
    assert (run_dir / "weights" / f"{latest}.pt").is_file()
    last_logged = json.loads((run_dir / "losses.jsonl").read_text().splitlines()[-1])["step"]
    assert last_logged == stop_step
    if launcher == "python":  # a launcher reports its ranks' stop in its own way
        expected = 128 + signal.SIGTERM if signum == signal.SIGTERM else 3
        assert proc.returncode == expected, output[-4000:]
