"""How multi-rank runs end (samdiffsr/cli.py, samdiffsr/distributed.py, samdiffsr/train/collective.py).

- A user error on one rank alone is printed once, by that rank, and every rank exits with its status, soon.
- DeepSpeed's CPU all-reduce workspaces (``/dev/shm/deepspeed_allreduce_buffer_*``) are gone after the run
  (crashed, finished), and already once the group exists, so that no way of ending (a stop, kill -9) leaves one.
- Relaunching a finished 2-rank run exits 0, with no ``terminate called`` from a thread left at exit.

The ranks are started as plain processes with torchrun's variables (nobody kills a rank for another's exit,
so each rank's own exit status and output are seen), and under torchrun itself. ``LOCAL_SIZE`` = world size
makes DeepSpeed create its shared-memory workspaces, as its own launcher does.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import REPO, TINY, rank_env, write_rrdb_weights, write_shards

from samdiffsr.cli import EXIT_USAGE
from samdiffsr.distributed import free_port

pytestmark = pytest.mark.slow

TRAIN = [sys.executable, str(REPO / "launcher" / "train.py")]
# A rank that fails alone, then waits for its peer in a collective: the peer must end it, not a timeout.
PROBE = """
import atexit, glob, os, sys
import torch.distributed as dist
from samdiffsr.cli import UserError, run_cli
from samdiffsr.train.collective import exit_process, init_distributed

# Registered first, so it runs last: the group must already be destroyed by then.
atexit.register(lambda: print(f"group left at exit: {dist.is_initialized()}", flush=True))

def main():
    rank, _, _ = init_distributed()
    # Its DeepSpeed workspace is unlinked once the group exists: no later way of ending can leave it.
    mine = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{os.environ['MASTER_PORT']}_{rank}")
    print(f"workspace files after init: {len(mine)}", flush=True)
    if rank == 1 and os.environ.get("FAIL_ON_RANK_1"):
        raise UserError("only rank 1 sees this")
    dist.barrier()  # rank 0 waits for rank 1, which may be gone

exit_process(run_cli("probe", main))  # as a training process ends (samdiffsr.train.engine.process_main)
"""


def shm_files(port: int) -> list[str]:
    """The DeepSpeed workspaces of a run with this master port (deepspeed/ops/csrc/cpu/comm/shm.cpp names)."""
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")


def start_ranks(cmd: list[str], port: int, world: int = 2, timeout: float = 180,
                **env: str) -> list[subprocess.CompletedProcess]:
    """``world`` processes of ``cmd`` with torchrun's variables; each one's exit status and output."""
    procs = [subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=rank_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                           LOCAL_WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env))
             for r in range(world)]
    try:
        out = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=timeout)) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, done in zip(procs, out, strict=True):
        done.returncode = p.wait()
    return out


def torchrun_cmd(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *args]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ": error: " in line]


def test_the_ranks_leave_no_workspace_file_and_no_group_at_exit():
    port = free_port()
    ranks = start_ranks([sys.executable, "-c", PROBE], port, timeout=120)
    assert [r.returncode for r in ranks] == [0, 0], [r.stderr for r in ranks]
    assert [r.stdout.splitlines()[-2:] for r in ranks] == [["workspace files after init: 0",
                                                             "group left at exit: False"]] * 2
    assert shm_files(port) == [] and not any("terminate called" in r.stderr for r in ranks)


def test_a_user_error_on_a_nonzero_rank_alone_is_printed_once_by_it():
    port = free_port()
    ranks = start_ranks([sys.executable, "-c", PROBE], port, timeout=120, FAIL_ON_RANK_1="1")
    assert error_lines(ranks[1].stderr) == ["probe: error: only rank 1 sees this"], ranks[1].stderr
    assert error_lines(ranks[0].stderr) == [] and "Traceback" not in ranks[0].stderr, ranks[0].stderr
    assert [r.returncode for r in ranks] == [EXIT_USAGE, EXIT_USAGE], [r.stderr for r in ranks]
    assert shm_files(port) == []


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hygiene")
    held_out = root / "held_out"  # a folder of HR images; b.png, position 1, is rank 1's of 2 ranks
    held_out.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a", 64), ("b", 2), ("c", 64)):  # b: smaller than the scale, a user error
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(held_out / f"{name}.png")
    return {"shards": write_shards(root / "train"), "rrdb": write_rrdb_weights(root / "rrdb.pt"),
            "held_out": str(held_out)}


def train_args(data: dict[str, str], run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "demo.yaml"), *TINY, f"data.train_shards={data['shards']}",
            f"train.rrdb_ckpt={data['rrdb']}", f"train.run_dir={run_dir}", "data.val_shards=", *extra]


def test_a_bad_held_out_image_in_rank_1s_share_ends_every_rank_with_one_line(data, tmp_path):
    args = train_args(data, tmp_path / "run", "train.max_steps=2", f"data.val_shards={data['held_out']}",
                      "train.val_every=1", "train.val_crop=32")
    message = f"train: error: validation image {data['held_out']}/b.png is smaller than the scale 4"
    port = free_port()
    ranks = start_ranks([*TRAIN, *args], port)
    assert error_lines(ranks[1].stderr) == [message], ranks[1].stderr[-3000:]
    assert error_lines(ranks[0].stderr) == [] and "Traceback" not in ranks[0].stderr, ranks[0].stderr[-3000:]
    assert [r.returncode for r in ranks] == [EXIT_USAGE, EXIT_USAGE], [r.stderr[-3000:] for r in ranks]
    assert shm_files(port) == []  # crashed: DeepSpeed's workspaces are gone all the same

    port = free_port()  # the same under torchrun: one line in all of its output, a failed exit, no hang
    proc = subprocess.run(torchrun_cmd(port, *TRAIN[1:], *args), cwd=REPO, env=rank_env(LOCAL_SIZE="2"),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert [line for line in (proc.stdout + proc.stderr).splitlines() if "b.png" in line] == [message], proc.stderr
    assert shm_files(port) == []


def test_relaunching_a_finished_two_rank_run_exits_cleanly(data, tmp_path):
    args = train_args(data, tmp_path / "run", "train.max_steps=1")
    for attempt in range(6):  # trains once, then finds train.max_steps reached 5 times
        port = free_port()
        proc = subprocess.run(torchrun_cmd(port, *TRAIN[1:], *args), cwd=REPO, env=rank_env(LOCAL_SIZE="2"),
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, (attempt, proc.stderr[-3000:])
        assert shm_files(port) == [], attempt
