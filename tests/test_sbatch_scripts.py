"""The sbatch scripts choose a Python that has samdiffsr, and the cluster tests' log reader shows every file.

No Slurm needed: the interpreter check runs before the scripts call srun or scontrol.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from slurm_cluster import cluster_env, logs

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train.sbatch", "masks_array.sbatch", "benchmark.sbatch")


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A real interpreter without samdiffsr or torch: a fresh venv, as a job gets when the right one is not on PATH."""
    folder = tmp_path_factory.mktemp("bare") / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    return folder / "bin"


def run_script(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "slurm" / name), "--merge", "--out", "x"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", SCRIPTS)
def test_sbatch_script_refuses_a_python_without_samdiffsr(bare_python, name):
    env = {"PATH": f"{bare_python}{os.pathsep}/usr/bin{os.pathsep}/bin", "SAMDIFFSR_REPO": str(REPO),
           "HOME": os.environ.get("HOME", "/tmp")}
    proc = run_script(name, env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"{name}: 'python' cannot import samdiffsr: submit with PYTHON set to the interpreter it is installed in, "
        "e.g. PYTHON=$(command -v python) sbatch ..."], proc.stderr


def test_sbatch_script_runs_the_python_named_by_PYTHON(bare_python):
    env = {"PATH": f"{bare_python}{os.pathsep}/usr/bin{os.pathsep}/bin", "SAMDIFFSR_REPO": str(REPO),
           "HOME": os.environ.get("HOME", "/tmp"), "PYTHON": sys.executable}
    proc = run_script("masks_array.sbatch", env)  # --merge: runs make_shards --merge at once, no srun
    assert "cannot import samdiffsr" not in proc.stderr, proc.stderr
    assert proc.returncode == 3 and "cannot merge x" in proc.stdout, (proc.stdout, proc.stderr)


def test_cluster_jobs_get_this_interpreter(tmp_path):
    assert cluster_env(tmp_path, base={"PATH": "/usr/bin"})["PYTHON"] == sys.executable
    assert cluster_env(tmp_path, base={"PATH": "/usr/bin", "PYTHON": "/opt/py"})["PYTHON"] == "/opt/py"


def test_job_logs_skip_folders_and_show_every_file(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "slurm-7.out").write_text("ModuleNotFoundError: No module named 'torch'\n")
    text = logs(tmp_path)
    assert "ModuleNotFoundError: No module named 'torch'" in text and "checkpoints" not in text
