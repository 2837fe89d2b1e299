"""The local Slurm cluster (slurm/local-cluster.sh, slurm/sacct) with sbatch/srun and submitit.

Runs against a real slurmctld/slurmd (see tests/slurm_cluster.py); skipped when Slurm is not installed
unless SAMDIFFSR_REQUIRE_SLURM=1. Each job is tiny; the whole file takes well under a minute.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit
from slurm_cluster import (
    LOCAL_CLUSTER,
    SlurmCluster,
    cluster_env,
    deadline,
    free_port_pair,
    local_cluster,
    new_cluster_folder,
    start_cluster,
    stop_cluster,
)

pytestmark = pytest.mark.slow

# The submitit callables below live in this test module, which the job's Python cannot import:
# pickle them by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add(a: int, b: int) -> int:
    return a + b


def sleep_then_return(seconds: float) -> str:
    time.sleep(seconds)
    return "woke up"


class Counter:
    """Counts to `total`, one step every `step_s`, keeping the count in `folder`; checkpointable.

    Every start appends "<first step> <time>" to starts.txt, so a test can see the requeue and the resume.
    """

    def __init__(self, folder: str, total: int, step_s: float = 0.5, start: int = 0) -> None:
        self.folder, self.total, self.step_s, self.start = folder, total, step_s, start

    def __call__(self) -> int:
        folder = Path(self.folder)
        with (folder / "starts.txt").open("a") as f:
            f.write(f"{self.start} {time.time()}\n")
        step = self.start
        while step < self.total:
            time.sleep(self.step_s)
            step += 1
            (folder / "step.txt").write_text(str(step))
        return step

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        step_file = Path(self.folder) / "step.txt"
        done = int(step_file.read_text()) if step_file.exists() else self.start
        return submitit.helpers.DelayedSubmission(Counter(self.folder, self.total, self.step_s, done))


def test_sbatch_two_tasks_with_srun(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id = slurm_cluster.sbatch(
        [
            "-n",
            "2",
            "-c",
            "1",
            "-o",
            "out.txt",
            "--wrap",
            'srun bash -c "echo rank=\\$SLURM_PROCID/\\$SLURM_NTASKS"',
        ],
        cwd=tmp_path,
    )
    assert slurm_cluster.wait(job_id, timeout=60) == "COMPLETED"
    lines = sorted(
        line for line in (tmp_path / "out.txt").read_text().splitlines() if line.startswith("rank=")
    )
    assert lines == ["rank=0/2", "rank=1/2"]


def test_sacct_stand_in(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    ok = slurm_cluster.sbatch(["-o", "/dev/null", "--wrap", "true"], cwd=tmp_path)
    failed = slurm_cluster.sbatch(["-o", "/dev/null", "--wrap", "exit 3"], cwd=tmp_path)
    assert slurm_cluster.wait(ok, timeout=60) == "COMPLETED"
    assert slurm_cluster.wait(failed, timeout=60) == "FAILED"
    # exactly the call submitit makes
    out = slurm_cluster.run(
        ["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", ok, "-j", failed]
    ).stdout
    lines = out.splitlines()
    assert lines[0] == "JobID|State|NodeList"
    node = slurm_cluster.node
    assert sorted(lines[1:]) == sorted([f"{ok}|COMPLETED|{node}", f"{failed}|FAILED|{node}"])
    codes = slurm_cluster.run(["sacct", "-P", "-n", "-o", "JobID,ExitCode", "-j", f"{ok},{failed}"]).stdout
    assert sorted(codes.split()) == sorted([f"{ok}|0:0", f"{failed}|3:0"])
    # an unknown job: only the header, like sacct
    assert slurm_cluster.run(["sacct", "-P", "-o", "JobID,State", "-j", "999999"]).stdout == "JobID|State\n"
    assert slurm_cluster.run(["sacct", "-o", "NoSuchField"], check=False).returncode != 0


def test_submitit_job_and_state(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    with slurm_cluster.activated(), deadline(120, "submitit jobs"):
        executor = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="slurm")
        executor.update_parameters(timeout_min=10, cpus_per_task=1, tasks_per_node=1)
        job = executor.submit(add, 2, 3)
        assert slurm_cluster.wait_submitit(job, timeout=60) == "COMPLETED"
        assert job.result() == 5

        # A job that ends without writing its result is seen as finished only through sacct:
        # without the stand-in, done() stays False and result() waits forever.
        killed = executor.submit(sleep_then_return, 300)
        slurm_cluster.wait_until(killed.job_id, {"RUNNING"}, timeout=60)
        killed.cancel()
        assert slurm_cluster.wait_submitit(killed, timeout=60) == "CANCELLED"
        assert killed.state == "CANCELLED"  # submitit's own view, from the sacct stand-in
        assert not killed.paths.result_pickle.exists()


def test_submitit_preempted_job_is_requeued_and_resumes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    total = 12
    with slurm_cluster.activated(), deadline(150, "requeue test"):
        executor = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="slurm", slurm_max_num_timeout=2)
        # a long limit, so that submitit counts the signal as a preemption, not a time-out
        executor.update_parameters(timeout_min=60, cpus_per_task=1, tasks_per_node=1)
        job = executor.submit(Counter(str(tmp_path), total))
        step_file = tmp_path / "step.txt"
        end = time.monotonic() + 60
        while not (step_file.exists() and int(step_file.read_text() or 0) >= 3):
            assert time.monotonic() < end, f"job never reached step 3\n{slurm_cluster.diagnostics()}"
            time.sleep(0.2)
        interrupted_at = time.time()
        job._interrupt()  # scancel --signal TERM, then --signal USR2: what a preemption looks like
        assert slurm_cluster.wait_submitit(job, timeout=90) == "COMPLETED"
        assert job.result() == total

    starts = [line.split() for line in (tmp_path / "starts.txt").read_text().splitlines()]
    assert len(starts) == 2, starts
    assert starts[0][0] == "0"
    assert 3 <= int(starts[1][0]) < total  # resumed from the checkpoint, not from scratch
    gap = float(starts[1][1]) - interrupted_at
    print(f"requeue gap (interrupt -> restarted): {gap:.1f}s")
    log = job.stdout()
    assert "this job is preempted" in log and "Requeued job" in log, log


def test_start_status_stop_leaves_nothing_behind(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:
    # slurm_cluster: only for the skip/fail logic; this test runs a second cluster of its own.
    cluster = start_cluster(new_cluster_folder())
    folder = cluster.folder
    try:
        assert stat.S_IMODE((folder / "munge" / "munge.key").stat().st_mode) == 0o600
        socket_dir = (folder / "munge" / "run").stat().st_mode
        assert not socket_dir & (stat.S_IWGRP | stat.S_IWOTH)
        conf = (folder / "slurm.conf").read_text()
        assert f"AuthInfo=socket={folder}/munge/run/munge.socket.2,cred_expire=5" in conf
        assert f"NodeName={cluster.node} NodeAddr=127.0.0.1 CPUs=" in conf
        assert set(cluster.daemon_pids()) == {"munged", "slurmctld", "slurmd"}
        status = local_cluster("status", folder)
        assert "idle" in status and f"export SLURM_CONF={folder}/slurm.conf" in status

        # starting twice is refused, and does not touch the running daemons
        pids = cluster.daemon_pids()
        again = subprocess.run(
            ["bash", str(LOCAL_CLUSTER), "start", str(folder)],
            env={**os.environ, "SAMDIFFSR_SLURM_PORT": str(free_port_pair())},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert again.returncode != 0 and "already running" in again.stderr
        assert cluster.daemon_pids() == pids

        marker = f"samdiffsr-stop-test-{os.getpid()}"
        job_id = cluster.sbatch(
            ["-o", "/dev/null", "--wrap", f"bash -c 'sleep 300; true {marker}'"], cwd=tmp_path
        )
        cluster.wait_until(job_id, {"RUNNING"}, timeout=60)
    finally:
        stop_cluster(cluster, remove=False)  # raises if a daemon is left

    assert cluster.daemon_pids() == {}
    end = time.monotonic() + 10
    while True:
        leftovers = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environ = (proc / "environ").read_bytes()
            except OSError:
                continue
            if marker in cmdline or f"SLURM_CONF={folder}/slurm.conf".encode() in environ.split(b"\0"):
                leftovers.append(f"{proc.name}: {cmdline}")
        if not leftovers or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert leftovers == [], "processes of the stopped cluster are still alive"
    status = subprocess.run(
        ["bash", str(LOCAL_CLUSTER), "status", str(folder)],
        env=cluster_env(folder),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert status.returncode != 0 and "slurmctld: not running" in status.stdout
    shutil.rmtree(folder)
