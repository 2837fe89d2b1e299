"""Logs that work in batch jobs: train.log in the run folder, progress as plain lines when stderr is a file,
the benchmark sweep's total and ETA, and the resolved config in TensorBoard (text and hparams).

Everything runs for real: in-process training on tiny shards, and the launchers as subprocesses with their
stderr going to a file, as under Slurm.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import REPO, TINY, rank_env, write_rrdb_weights, write_shards

from samdiffsr.cli import EXIT_USAGE
from samdiffsr.imresize import imresize
from samdiffsr.progress import EVERY_ENV, LineProgress, ProgressSettingError, period
from samdiffsr.train.checkpoints import CheckpointError
from samdiffsr.train.engine import main

LINE = re.compile(r"^(?P<desc>[^:]+): (?P<n>\d+)/(?P<total>\d+) (?P<unit>\w+) \((?P<pct>\d+)%\), [\d.]+ \w+/s, "
                  r"elapsed \d+:\d\d:\d\d(, eta \d+:\d\d:\d\d)?")


def train_argv(data: dict[str, str], run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "demo.yaml"), *TINY, f"data.train_shards={data['shards']}",
            f"data.val_shards={data['val']}", "data.val_images=1", "train.val_steps=2",
            f"train.rrdb_ckpt={data['rrdb']}", f"train.run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path | str]:
    """A run started three times: fresh to step 4 (validation at 2 and 4), resumed past a garbled `latest`
    to step 6, then refused (train.resume=never)."""
    root = tmp_path_factory.mktemp("logs")
    data = {"shards": write_shards(root / "train"), "val": write_shards(root / "val", sizes=(1,), tile=64),
            "rrdb": write_rrdb_weights(root / "rrdb.pt")}
    run = root / "run"
    main(train_argv(data, run, "train.max_steps=4", "train.val_every=2"))
    (run / "checkpoints" / "latest").write_text("garbage\n")  # a damaged `latest`: a resume decision to log
    main(train_argv(data, run, "train.max_steps=6", "train.val_every=2"))
    with pytest.raises(CheckpointError, match="resume=never"):
        main(train_argv(data, run, "train.max_steps=8", "train.resume=never"))
    return {"run": run, **data}


# --- 1. train.log ------------------------------------------------------------------------------------
def test_train_log_holds_config_resume_decisions_losses_validation_and_errors(trained):
    text = (trained["run"] / "train.log").read_text()
    starts = [m.start() for m in re.finditer(r"^=== .* start on ", text, re.M)]
    assert len(starts) == 3 and len(re.findall(r"^=== .* end$", text, re.M)) == 3  # appended, three starts
    first, second, third = (text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True))
    # the resolved config, the start decision, the losses of every log interval (log_every=2), validation
    assert "resolved config (config.yaml):" in first and "  hidden_size: 8\n" in first
    assert f"run_dir: {trained['run']}" in first
    assert re.search(r"diffusion: fresh start; 1 rank\(s\)", first)
    assert [int(s) for s in re.findall(r"step (\d+)/4: loss \d+\.\d{4}, lr ", first)] == [2, 4]
    assert [int(s) for s in re.findall(r"validation step (\d+): psnr_y \d+\.\d+", first)] == [2, 4]
    assert "finished at step 4, loss" in first
    # the resume decision: the garbled `latest` (a warning) and where the run continued
    assert re.search(r"WARNING samdiffsr\.train\.checkpoints: .*latest.*trying .*step0+4 instead", second)
    assert re.search(r"resumed from .*step0+4 at step 4", second)
    assert [int(s) for s in re.findall(r"step (\d+)/6: loss", second)] == [6]
    # the error that ended the third start, as the console's one line says it
    assert re.search(r"error: train\.resume=never but .* already holds checkpoints", third)
    assert "step " not in third.split("error:")[0]


@pytest.mark.slow
def test_train_log_gets_the_console_warnings_and_a_failure_of_the_command(trained, tmp_path):
    """The train command in a fresh process: its warnings still reach the console (stderr) as well as
    train.log, and a user error ends both with the same one line."""
    run = tmp_path / "run"
    missing = tmp_path / "no-such-rrdb.pt"
    argv = train_argv({**trained, "rrdb": str(missing)}, run, "train.max_steps=2")
    proc = subprocess.run([sys.executable, str(REPO / "launcher" / "train.py"), *argv], cwd=REPO,
                          env=rank_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    console = proc.stderr.strip().splitlines()[-1]
    assert console.startswith("train: error: ") and str(missing) in console
    log = (run / "train.log").read_text()
    assert f"error: {console.removeprefix('train: error: ')}" in log


# --- 4. TensorBoard: the config as text and as hparams -------------------------------------------------
def test_tensorboard_holds_the_resolved_config_as_text_and_hparams(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(trained["run"] / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    texts = [t.tensor_proto.string_val[0].decode() for t in events.Tensors("config/text_summary")]
    assert len(texts) == 2  # one per start that trained
    assert "    hidden_size: 8\n" in texts[0] and "    max_steps: 4\n" in texts[0] and "max_steps: 6" in texts[1]
    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = session.session_start_info.hparams
    assert hp["model.hidden_size"].number_value == 8 and hp["train.task"].string_value == "diffusion"
    assert json.loads(hp["model.dim_mults"].string_value) == [1, 2]
    assert hp["train.max_steps"].number_value in (4, 6)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"train/loss", "val/psnr_y"} <= metrics and metrics <= set(events.Tags()["scalars"])


# --- 2. progress bars as lines when stderr is a file -----------------------------------------------------
def lines_of(path: Path) -> list[str]:
    raw = path.read_bytes()
    assert b"\r" not in raw and b"\x1b" not in raw, raw[:2000]
    return raw.decode().splitlines()


@pytest.mark.slow
def test_infer_with_stderr_to_a_file_writes_periodic_lines_for_the_bar_and_the_nested_bar(trained, tmp_path):
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), np.uint8)).save(lr_dir / f"{i}.png")
    err = tmp_path / "infer.err"
    with err.open("w") as f:
        subprocess.run([sys.executable, str(REPO / "launcher" / "infer.py"), "--ckpt",
                        str(trained["run"] / "weights" / "latest.pt"), "--img-dir", str(lr_dir), "--save-dir",
                        str(tmp_path / "sr"), "--batch", "1", "--steps", "4"],
                       cwd=REPO, env=rank_env(**{EVERY_ENV: "0"}), stdout=subprocess.DEVNULL, stderr=f,
                       timeout=300, check=True)
    bars = [m.groupdict() for line in lines_of(err) if (m := LINE.match(line))]
    outer = [(int(b["n"]), int(b["total"])) for b in bars if b["desc"] == "super-resolving"]
    assert outer[0] == (0, 3) and outer[-1] == (3, 3) and (1, 3) in outer and (2, 3) in outer
    inner = [(int(b["n"]), int(b["total"])) for b in bars if b["desc"] == "sampling"]
    assert inner == [(n, 4) for n in range(1, 5)] * 3  # every step of each image; no start/end lines
    assert len(list((tmp_path / "sr").glob("*.png"))) == 3


def test_make_shards_with_stderr_to_a_file_prints_every_quarter(tmp_path):
    images = tmp_path / "hr"
    images.mkdir()
    for i in range(4):
        Image.fromarray(imresize(np.random.default_rng(i).integers(0, 256, (12, 12, 3), np.uint8),
                                 output_shape=(96, 96))).save(images / f"{i}.png")
    err = tmp_path / "shards.err"
    with err.open("w") as f:
        subprocess.run([sys.executable, str(REPO / "launcher" / "make_shards.py"), "--images", str(images),
                        "--out", str(tmp_path / "out"), "--masker", "none", "--tile", "48", "--thresh", "0",
                        "--workers", "0"],
                       cwd=REPO, env=rank_env(**{EVERY_ENV: "1000,25%"}), stdout=subprocess.DEVNULL, stderr=f,
                       timeout=300, check=True)
    bars = [m.groupdict() for line in lines_of(err) if (m := LINE.match(line))]
    assert [(int(b["n"]), int(b["total"]), b["pct"]) for b in bars] == \
        [(0, 4, "0"), (1, 4, "25"), (2, 4, "50"), (3, 4, "75"), (4, 4, "100")]  # no repeated last line


def test_on_a_terminal_the_bar_is_tqdms():
    """The same helper under a pseudo-terminal draws a tqdm bar (carriage returns), not lines."""
    code = ("from samdiffsr.progress import progress_bar\n"
            "for _ in progress_bar(range(3), desc='tty', mininterval=0): pass\n")
    pid, fd = pty.fork()
    if pid == 0:  # the child: an 80-column terminal (a new pty has 0 columns, and tqdm would draw nothing)
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        os.execvpe(sys.executable, [sys.executable, "-c", code], rank_env())
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    assert b"\r" in out and b"tty: 100%" in out and b"tty: 3/3 it (100%)" not in out


def test_progress_period_setting():
    for value, want in [("", (30.0, None)), ("5", (5.0, None)), ("10%", (None, 10.0)), ("2s,25%", (2.0, 25.0))]:
        os.environ[EVERY_ENV] = value
        try:
            assert period() == want
        finally:
            del os.environ[EVERY_ENV]
    os.environ[EVERY_ENV] = "often"
    try:
        with pytest.raises(ProgressSettingError, match=f"{EVERY_ENV}='often'"):
            LineProgress(total=3)
    finally:
        del os.environ[EVERY_ENV]


# --- 3. the benchmark sweep: one total for checkpoints x sets x images, with an ETA ------------------------
@pytest.mark.slow
def test_benchmark_sweep_progress_has_the_whole_sweeps_total_and_an_eta(trained, tmp_path):
    sets = {}
    for name, n in (("A", 3), ("B", 2), ("C", 1)):
        folder = sets[name] = tmp_path / name
        folder.mkdir()
        for i in range(n):
            hr = imresize(np.random.default_rng(i).integers(0, 256, (8, 8, 3), np.uint8), output_shape=(32, 32))
            Image.fromarray(hr).save(folder / f"{name}{i}.png")

    def sweep(*names: str) -> list[dict]:
        err = tmp_path / "bench.err"
        with err.open("w") as f:
            subprocess.run([sys.executable, str(REPO / "launcher" / "benchmark.py"), "--run", str(trained["run"]),
                            "--sets", *(f"{s}={sets[s]}" for s in names), "--out", str(tmp_path / "out"),
                            "--metrics", "psnr_y", "--batch", "1", "--steps", "2"],
                           cwd=REPO, env=rank_env(**{EVERY_ENV: "0"}), stdout=subprocess.DEVNULL, stderr=f,
                           timeout=300, check=True)
        return [m.groupdict() | {"line": line} for line in lines_of(err) if (m := LINE.match(line))]

    # rows: the run's checkpoints (steps 4 and 6) and bicubic: 3 x (3 + 2) images in all
    bars = sweep("A", "B")
    assert (bars[0]["n"], bars[0]["total"]) == ("0", "15") and (bars[-1]["n"], bars[-1]["total"]) == ("15", "15")
    assert [int(b["n"]) for b in bars] == list(range(16))
    assert all(", eta " in b["line"] for b in bars[1:])
    # a rerun with one more set: what is done counts as done, the rest (3 x 1) is what the ETA is about
    bars = sweep("A", "B", "C")
    assert [(int(b["n"]), int(b["total"])) for b in bars] == [(15, 18), (16, 18), (17, 18), (18, 18)]
