"""A real one-node Slurm cluster for the tests (slurm/local-cluster.sh), as a session-scoped fixture.

tests/conftest.py registers it (`pytest_plugins = ["slurm_cluster"]`), so a test just asks for it:

    def test_something(slurm_cluster, tmp_path):
        job_id = slurm_cluster.sbatch(["-n", "2", "--wrap", "srun hostname"], cwd=tmp_path)
        assert slurm_cluster.wait(job_id, timeout=60) == "COMPLETED"

`slurm_cluster.env` is the environment for subprocesses (sbatch, launcher scripts): SLURM_CONF and a PATH
whose first entry holds the `sacct` stand-in. `with slurm_cluster.activated():` sets the same in os.environ
for code that submits in-process (submitit). Everything waits with a timeout.

When Slurm is not installed (slurm/install-slurm.sh) or we are not root, the tests are skipped; with
SAMDIFFSR_REQUIRE_SLURM=1 (CI) that is a failure instead. With SAMDIFFSR_SLURM_DIR pointing at a cluster
already started by `slurm/local-cluster.sh start`, that cluster is used and left running; otherwise the
fixture starts its own in a temporary folder on free ports and stops it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "slurm" / "local-cluster.sh"
INSTALL_HINT = "install it with slurm/install-slurm.sh (apt: slurm-wlm munge)"
REQUIRED_COMMANDS = (
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "squeue",
    "scancel",
    "scontrol",
    "sinfo",
)
DAEMONS = ("munged", "slurmctld", "slurmd")
# Job states after which a job will not run again (sacct / squeue names).
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)


class SlurmTimeout(AssertionError):
    """A job or command did not finish in time (the message carries squeue and the daemon logs)."""


@contextlib.contextmanager
def deadline(seconds: float, what: str = "test") -> Iterator[None]:
    """Raise SlurmTimeout in the main thread after `seconds` (guards in-process calls without a timeout)."""

    def on_alarm(signum: int, frame: object) -> None:
        raise SlurmTimeout(f"{what} did not finish within {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class SlurmCluster:
    """A running local cluster: its folder, the environment to reach it and helpers that never hang."""

    folder: Path
    env: dict[str, str]
    owned: bool = True
    started_in_s: float = 0.0

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    @property
    def node(self) -> str:
        return socket.gethostname().split(".")[0]

    def run(
        self, cmd: str | Sequence[str], timeout: float = 60, check: bool = True, cwd: str | Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command (a list, or a string for bash) in the cluster's environment, output captured."""
        args: str | list[str] = cmd if isinstance(cmd, str) else [str(c) for c in cmd]
        if isinstance(args, str):
            args = ["bash", "-c", args]
        try:
            done = subprocess.run(
                args, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise SlurmTimeout(f"{args} did not finish within {timeout}s\n{self.diagnostics()}") from e
        if check and done.returncode != 0:
            raise AssertionError(
                f"{args} exited with {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
            )
        return done

    def sbatch(self, args: Sequence[str], cwd: str | Path | None = None, timeout: float = 30) -> str:
        """Submit with sbatch --parsable; returns the job id (for arrays, the array's main id)."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd, timeout=timeout).stdout.strip()
        return out.split(";")[0]

    def states(self, job_id: str) -> dict[str, str]:
        """{job id (array tasks as ID_TASK): state} as the sacct stand-in reports it ({} once purged)."""
        out = self.run(["sacct", "-j", job_id, "-o", "JobID,State", "--parsable2", "-n"], timeout=30).stdout
        return dict(line.split("|", 1) for line in out.splitlines() if line.strip())

    def state(self, job_id: str) -> str:
        """State of a job (or the worst state of an array's tasks): PENDING, RUNNING, COMPLETED, ..."""
        states = set(self.states(job_id).values())
        if not states:
            return "UNKNOWN"
        unfinished = states - FINAL_STATES
        if unfinished:
            return sorted(unfinished)[0]
        return "COMPLETED" if states == {"COMPLETED"} else sorted(states - {"COMPLETED"})[0]

    def wait(self, job_id: str, timeout: float, poll_s: float = 0.5, cancel_on_timeout: bool = True) -> str:
        """Wait until the job (all of an array's tasks) reached a final state; returns that state.

        On timeout the job is cancelled (unless told not to) and SlurmTimeout carries squeue and the logs.
        """
        end = time.monotonic() + timeout
        while True:
            state = self.state(job_id)
            if state in FINAL_STATES:
                return state
            if time.monotonic() > end:
                report = self.diagnostics()
                if cancel_on_timeout:
                    self.run(["scancel", job_id], check=False, timeout=30)
                raise SlurmTimeout(f"job {job_id} still {state} after {timeout}s\n{report}")
            time.sleep(poll_s)

    def wait_until(self, job_id: str, states: set[str], timeout: float, poll_s: float = 0.2) -> str:
        """Wait until the job is in one of `states` (e.g. {"RUNNING"}); returns the state."""
        end = time.monotonic() + timeout
        while True:
            state = self.state(job_id)
            if state in states:
                return state
            if state in FINAL_STATES or time.monotonic() > end:
                raise SlurmTimeout(
                    f"job {job_id} is {state}, waited {timeout}s for {states}\n{self.diagnostics()}"
                )
            time.sleep(poll_s)

    def wait_submitit(self, job: object, timeout: float, poll_s: float = 0.5) -> str:
        """Wait for a submitit job with a timeout (job.result() alone can wait forever); returns its state.

        Done means both: submitit says done (result file, or sacct says finished) and Slurm has the job
        in a final state (submitit writes its result before the job step ends).
        """
        end = time.monotonic() + timeout
        while not (job.done(force_check=True) and self.state(job.job_id) in FINAL_STATES):  # type: ignore[attr-defined]
            if time.monotonic() > end:
                report = self.diagnostics()
                job.cancel(check=False)  # type: ignore[attr-defined]
                raise SlurmTimeout(f"submitit job {job.job_id} not done after {timeout}s\n{report}")  # type: ignore[attr-defined]
            time.sleep(poll_s)
        return self.state(job.job_id)  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        """Point os.environ at this cluster (SLURM_CONF, PATH) for in-process submission, then restore."""
        saved = {key: os.environ.get(key) for key in ("SLURM_CONF", "PATH")}
        os.environ["SLURM_CONF"] = self.env["SLURM_CONF"]
        os.environ["PATH"] = self.env["PATH"]
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def diagnostics(self, lines: int = 30) -> str:
        """squeue, sinfo and the tails of the daemon logs, for failure messages."""
        parts = []
        for cmd in (["squeue", "-t", "all"], ["sinfo"]):
            try:
                done = subprocess.run(
                    cmd, env=self.env, capture_output=True, text=True, timeout=10, check=False
                )
                parts.append(f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}")
            except subprocess.TimeoutExpired:
                parts.append(f"$ {' '.join(cmd)}: no answer within 10s")
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.folder / "log" / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    def daemon_pids(self) -> dict[str, int]:
        """The daemons of this cluster that are alive: {name: pid} (checked against /proc/PID/comm)."""
        alive = {}
        for name in DAEMONS:
            pidfile = self.folder / "pids" / f"{name}.pid"
            try:
                pid = int(pidfile.read_text())
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, ValueError):
                continue
            if comm == name and state != "Z":
                alive[name] = pid
        return alive


def _missing_requirement() -> str | None:
    missing = [cmd for cmd in REQUIRED_COMMANDS if shutil.which(cmd) is None]
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}): {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd runs as root)"
    return None


def _port_pair_free(port: int) -> bool:
    for p in (port, port + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def free_port_pair() -> int:
    """A port P with P and P+1 free (slurmctld, slurmd), away from the default 6817 of a user's cluster."""
    for _ in range(200):
        port = random.randrange(20000, 60000, 2)
        if _port_pair_free(port):
            return port
    raise RuntimeError("no free port pair found for the local Slurm cluster")


def cluster_env(folder: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to reach the cluster; its jobs run this interpreter (PYTHON, slurm/python.sh) even
    when it is not on PATH (a venv that is not activated)."""
    env = dict(os.environ if base is None else base)
    env["SLURM_CONF"] = str(folder / "slurm.conf")
    env["PATH"] = f"{folder / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHON", sys.executable)
    return env


def logs(folder: Path, pattern: str = "*", tail: int = 3000) -> str:
    """The last ``tail`` characters of each file matching ``pattern`` under ``folder`` (folders are skipped)."""
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-tail:]}"
                     for p in sorted(folder.glob(pattern)) if p.is_file())


def local_cluster(action: str, folder: Path, timeout: float = 90, port: int | None = None) -> str:
    """Run slurm/local-cluster.sh ACTION FOLDER; returns its output, raises with it on failure."""
    env = dict(os.environ)
    if port is not None:
        env["SAMDIFFSR_SLURM_PORT"] = str(port)
    try:
        done = subprocess.run(
            ["bash", str(LOCAL_CLUSTER), action, str(folder)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise SlurmTimeout(f"local-cluster.sh {action} {folder} did not finish within {timeout}s") from e
    if done.returncode != 0:
        raise RuntimeError(
            f"local-cluster.sh {action} {folder} exited with {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout + done.stderr


def new_cluster_folder() -> Path:
    """A fresh folder for a cluster. Not pytest's tmp_path: munged refuses a socket below a 0700 folder."""
    folder = Path(tempfile.mkdtemp(prefix="samdiffsr-slurm-", dir="/tmp"))
    folder.chmod(0o755)
    return folder


def start_cluster(folder: Path) -> SlurmCluster:
    """Start a fresh cluster in `folder` on free ports (the caller stops it with stop_cluster)."""
    t0 = time.monotonic()
    last: Exception | None = None
    for _ in range(3):  # a port taken between the check and slurmctld's bind: try another pair
        try:
            local_cluster("start", folder, port=free_port_pair())
            break
        except RuntimeError as e:
            last = e
            local_cluster("stop", folder)
    else:
        raise RuntimeError(f"could not start the local Slurm cluster in {folder}") from last
    return SlurmCluster(folder=folder, env=cluster_env(folder), started_in_s=time.monotonic() - t0)


def stop_cluster(cluster: SlurmCluster, remove: bool = True) -> None:
    """Stop the cluster; raise if any of its daemons is still alive afterwards, else remove its folder."""
    local_cluster("stop", cluster.folder)
    left = cluster.daemon_pids()
    if left:
        raise AssertionError(
            f"daemons left behind by local-cluster.sh stop: {left} (see {cluster.folder}/log)"
        )
    if remove:
        shutil.rmtree(cluster.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running local Slurm cluster for the whole session (see the module docstring)."""
    reason = _missing_requirement()
    if reason is not None:
        if os.environ.get("SAMDIFFSR_REQUIRE_SLURM") == "1":
            pytest.fail(f"SAMDIFFSR_REQUIRE_SLURM=1 but {reason}", pytrace=False)
        pytest.skip(reason)

    external = os.environ.get("SAMDIFFSR_SLURM_DIR")
    if external:
        cluster = SlurmCluster(
            folder=Path(external).resolve(), env=cluster_env(Path(external).resolve()), owned=False
        )
        if set(cluster.daemon_pids()) != set(DAEMONS):
            pytest.fail(
                f"SAMDIFFSR_SLURM_DIR={external} has no running cluster (slurm/local-cluster.sh start)"
            )
        yield cluster
        return

    cluster = start_cluster(new_cluster_folder())
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
