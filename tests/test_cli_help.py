"""Command-line edges: submit.py's subcommand help, submit.py without Slurm, and option help that shows every
default (infer.py, demo.py). Each command runs as the user runs it, in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def launcher(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launcher" / f"{name}.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command, usage, mentions", [
    ("shards", "usage: submit shards --parts P [options] -- MAKE_SHARDS_ARGS", "passed to make_shards"),
    ("rank", "usage: submit rank", "SLURM_* variables"),
    ("benchmark", "usage: submit benchmark [options] -- BENCHMARK_ARGS", "passed to the benchmark"),
    ("ablate", "usage: submit ablate", "--arm"),
    ("train", "usage: submit", "--gpus-per-node"),
])
def test_submit_subcommands_print_help(command, usage, mentions):
    proc = launcher("submit", command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(usage) and mentions in " ".join(proc.stdout.split()), proc.stdout
    assert proc.stderr == ""


def no_slurm_env(tmp_path: Path) -> dict[str, str]:
    """PATH holding only this Python: no sbatch, srun or squeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    return {**os.environ, "PATH": str(bin_dir)}


@pytest.mark.parametrize("args", [
    ["--config", "configs/demo_rrdb.yaml", "data.train_shards={shards}", "--tasks-per-node", "2",
     "--folder", "{tmp}/slurm"],
    ["shards", "--parts", "2", "--folder", "{tmp}/slurm", "--", "--images", "{images}", "--out", "{tmp}/out",
     "--masker", "none"],
    ["benchmark", "--folder", "{tmp}/slurm", "--", "--weights", "{tmp}/w.pt", "--sets", "{images}", "--out",
     "{tmp}/bench"],
])
def test_submit_without_slurm_says_so_in_one_line(tmp_path, args):
    images, shards = tmp_path / "images", tmp_path / "shards"
    images.mkdir()
    shards.mkdir()
    (shards / "train-000000.tar").write_bytes(b"")  # the config check only needs the shard list to expand
    argv = [a.format(tmp=tmp_path, images=images, shards=shards / "train-000000.tar") for a in args]
    proc = launcher("submit", *argv, env=no_slurm_env(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines() == [
        "submit: error: no Slurm found: sbatch is not on PATH (submit.py queues Slurm jobs; without Slurm, run the "
        "command directly: launcher/train.py, make_shards.py, benchmark.py, ablate.py)"], proc.stderr
    assert not (tmp_path / "slurm").exists()  # nothing was written for a job that was never queued


def test_submit_rank_outside_srun_is_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = launcher("submit", "rank", "--config", "configs/demo.yaml", env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("train: error: not inside a Slurm job step (missing SLURM_PROCID, SLURM_NTASKS, "
                                   "SLURM_JOB_ID): run under srun")


def option_entries(help_text: str) -> dict[str, str]:
    """``--option`` (or positional name) -> its help paragraph, from argparse's --help output."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        if re.match(r"^  \S", line):  # an option's first line (2 spaces); continuations are indented more
            name = line.split()[0].rstrip(",")
            current = name
            entries[name] = line
        elif current and re.match(r"^\s{3,}\S", line):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("name", ["infer", "demo"])
def test_every_option_shows_its_default(name):
    proc = launcher(name, "--help")
    assert proc.returncode == 0, proc.stderr
    entries = option_entries(proc.stdout)
    assert len(entries) >= 10 and "key=value" in entries, sorted(entries)
    lacking = [opt for opt, text in entries.items()
               if opt != "-h" and "(default" not in text and "(required)" not in text]
    assert not lacking, {opt: entries[opt] for opt in lacking}
