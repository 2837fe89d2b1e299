"""The package as a user on a cluster installs it: a plain (non-editable) wheel in a fresh virtual environment,
used from a folder outside the repository. Every console script answers --help, make_shards writes shards,
and the DeepSpeed launcher trains through ``python -m samdiffsr.train`` with a config shipped in the wheel.

The environment is created with --system-site-packages so that torch, deepspeed ... are not reinstalled;
the test checks that ``samdiffsr`` itself is the venv's copy, not the repository's (editable) one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["samdiffsr-make-shards", "samdiffsr-train", "samdiffsr-submit", "samdiffsr-benchmark", "samdiffsr-infer",
           "samdiffsr-demo", "samdiffsr-ablate"]
TINY = ["model.hidden_size=8", "model.dim_mults=[1,2]", "model.rrdb_num_block=2", "model.rrdb_num_feat=8",
        "model.rrdb_growth=4", "model.timesteps=10", "data.patch_size=32", "data.workers=0",
        "data.shuffle_buffer=4", "train.batch_size=2", "train.log_every=1", "train.val_every=0",
        "train.ckpt_every=2", "train.max_steps=2"]


def entry_points() -> list[str]:
    """The console scripts setup.py declares (so that a new one cannot be left out of this test)."""
    text = (REPO / "setup.py").read_text()
    return sorted(line.split("=")[0].strip().strip('"') for line in text.splitlines()
                  if line.strip().startswith('"samdiffsr-'))


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> dict:
    """A wheel built from the repository, installed (no deps) into a new venv; its bin/ first on PATH."""
    tmp = tmp_path_factory.mktemp("packaging")
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(REPO)], check=True, timeout=600, cwd=tmp)
    (wheel,) = wheels.glob("samdiffsr-*.whl")
    env_dir = tmp / "venv"
    # --without-pip: the system pip (visible through --system-site-packages) installs into the venv.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)],
                   check=True, timeout=300)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", str(wheel)],
                   check=True, timeout=600, cwd=tmp)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(env_dir), PYTHONUNBUFFERED="1")
    outside = tmp / "elsewhere"  # a working folder that is not the repository
    outside.mkdir()
    return {"wheel": wheel, "bin": env_dir / "bin", "python": python, "env": env, "cwd": outside}


@pytest.mark.slow
def test_the_wheel_ships_the_configs_and_the_module_entry(venv):
    names = zipfile.ZipFile(venv["wheel"]).namelist()
    shipped = sorted(n.split("/")[-1] for n in names if n.startswith("samdiffsr/configs/"))
    assert shipped == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert "authors_samdiffsr_df2k4x.yaml" in shipped and "demo.yaml" in shipped
    assert "samdiffsr/train/__main__.py" in names
    assert not [n for n in names if n.startswith(("launcher/", "tests/"))]


@pytest.mark.slow
def test_the_installed_package_is_the_venvs_and_finds_its_configs(venv):
    code = ("import samdiffsr, samdiffsr.bundled as b; print(samdiffsr.__file__); "
            "print(b.shipped_config('demo')); print(b.config_path('configs/authors_samdiffsr_df2k4x.yaml'))")
    out = run([str(venv["python"]), "-c", code], venv["cwd"], venv["env"]).stdout.split()
    env_dir = venv["bin"].parent.resolve()
    package = Path(out[0]).resolve()
    assert env_dir in package.parents and REPO not in package.parents, out
    for config in out[1:]:
        assert Path(config).resolve().parent == package.parent / "configs", out


@pytest.mark.slow
def test_every_console_script_answers_help_from_outside_the_repository(venv):
    assert entry_points() == sorted(SCRIPTS)
    for script in SCRIPTS:
        exe = venv["bin"] / script
        assert exe.is_file(), f"{script} is not installed in the venv"
        out = run([str(exe), "--help"], venv["cwd"], venv["env"]).stdout
        assert out.startswith("usage: "), (script, out[:300])


@pytest.mark.slow
def test_make_shards_then_training_through_the_deepspeed_launcher_from_the_wheel(venv):
    cwd, rng = venv["cwd"], np.random.default_rng(0)
    (cwd / "images").mkdir()
    for name in ("a.png", "b.png"):  # smooth random images, 96 x 96
        small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        Image.fromarray(small).resize((96, 96), Image.BICUBIC).save(cwd / "images" / name)
    run([str(venv["bin"] / "samdiffsr-make-shards"), "--images", "images", "--out", "shards", "--masker", "none",
         "--tile", "48", "--thresh", "0", "--workers", "1", "--no-progress"], cwd, venv["env"])
    sizes = json.loads((cwd / "shards" / "sizes.json").read_text())
    assert sum(sizes.values()) == 8  # 2 images x 2 x 2 tiles of 48 pixels
    # What samdiffsr-demo does for each stage: the deepspeed launcher runs `python -m samdiffsr.train` on a
    # config found inside the installed package, relative paths meaning the caller's folder.
    code = ("import sys; from pathlib import Path; from samdiffsr.bundled import shipped_config; "
            "from samdiffsr.train.launch import launch_training; "
            "sys.exit(launch_training(shipped_config('demo_rrdb'), sys.argv[1:], 1, Path('runs/rrdb')))")
    run([str(venv["python"]), "-c", code, *TINY, "data.train_shards=shards", "data.val_shards="], cwd, venv["env"])
    summary = json.loads((cwd / "runs" / "rrdb" / "summary.json").read_text())
    assert summary["step"] == 2 and summary["world_size"] == 1
    assert (cwd / "runs" / "rrdb" / "weights" / "latest.pt").is_file()
