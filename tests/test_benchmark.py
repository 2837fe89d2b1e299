"""Benchmark sweeps: checkpoints of a run x sets, tables and plots, resume, ranks, metric weights errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from PIL import Image
from skimage import data as skdata

from samdiffsr.config import load_config
from samdiffsr.evaluation import metrics
from samdiffsr.evaluation.benchmark_cli import main
from samdiffsr.evaluation.fid import FIDFeatures, random_fid_state
from samdiffsr.evaluation.inference import SamplerSettings, SuperResolver
from samdiffsr.evaluation.perceptual import LPIPS
from samdiffsr.evaluation.sweep import BenchmarkError, run_checkpoints
from samdiffsr.imresize import imresize
from samdiffsr.models import build_model, save_weights
from samdiffsr.models.loading import LoadedModel

REPO = Path(__file__).resolve().parents[1]
TINY = {"model": {"hidden_size": 8, "dim_mults": [1, 1, 2, 2], "rrdb_num_block": 2, "rrdb_num_feat": 8,
                  "rrdb_growth": 4, "timesteps": 10}}
PIXEL = "psnr_y,ssim_y,psnr_y_paper,ssim_y_paper"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo_hr(name: str, hw: tuple[int, int]) -> np.ndarray:
    """A real photo, MATLAB-bicubic downscaled by 4 to HR size ``hw`` (content, not just noise)."""
    img = getattr(skdata, name)()
    return imresize(np.ascontiguousarray(img[: hw[0] * 4, : hw[1] * 4]), 1 / 4)


def make_run(root: Path, steps=(100, 200, 300)) -> Path:
    """A run folder as the training engine writes it: config.yaml and weights/stepN.pt."""
    run = root / "run"
    (run / "weights").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(TINY))
    cfg = load_config(run / "config.yaml")
    for i, step in enumerate(steps):
        torch.manual_seed(i)
        save_weights(run / "weights" / f"step{step:08d}.pt", build_model(cfg.model), step=step,
                     config=cfg.to_dict())
    return run


def make_sets(root: Path) -> tuple[Path, Path]:
    """An HR folder set and a benchmark-format shard set (the same kind of pairs make_shards writes)."""
    folder = root / "hr_set"
    folder.mkdir()
    for name, hw in zip(PHOTOS[:3], [(50, 44), (48, 64), (41, 37)], strict=True):  # odd sizes: mod-crop
        Image.fromarray(photo_hr(name, hw)).save(folder / f"{name}.png")
    shards = root / "shard_set"
    shards.mkdir()
    with wds.TarWriter(str(shards / "test-000000.tar")) as sink:
        for name, hw in zip(PHOTOS[1:], [(48, 40), (56, 48), (40, 40)], strict=True):
            hr = photo_hr(name, hw)
            sink.write({"__key__": name, "hr.npy": _npy(hr), "lr.npy": _npy(imresize(hr, 1 / 4)),
                        "json": json.dumps({"source": name}).encode()})
    return folder, shards


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bench_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    run = make_run(root)
    folder, shards = make_sets(root)
    return run, folder, shards


def sweep(run: Path, folder: Path, shards: Path, out: Path, *extra: str) -> int:
    return main(["--run", str(run), "--sets", f"Folder={folder}", f"Shards={shards}", "--out", str(out),
                 "--metrics", PIXEL, "--batch", "3", "--seed", "1", "--quiet", *extra])


def test_checkpoint_selection(tmp_path):
    run = make_run(tmp_path, steps=(100, 200, 300, 400))
    steps = [e.step for e in run_checkpoints(run, "all")]
    assert steps == [100, 200, 300, 400]
    assert [e.step for e in run_checkpoints(run, "latest")] == [400]
    assert [e.step for e in run_checkpoints(run, "every:200")] == [200, 400]
    assert [e.step for e in run_checkpoints(run, ["300", "100"])] == [100, 300]
    with pytest.raises(BenchmarkError, match="no checkpoint for step"):
        run_checkpoints(run, ["150"])
    with pytest.raises(BenchmarkError, match="no step is a multiple"):
        run_checkpoints(run, "every:1000")


def test_sweep_evaluates_every_checkpoint_and_writes_table_and_plots(bench_inputs, tmp_path):
    run, folder, shards = bench_inputs
    out = tmp_path / "out"
    assert sweep(run, folder, shards, out) == 0
    summary = json.loads((out / "results.json").read_text())
    rows = {(s["checkpoint"], s["set"]): s for s in summary["summary"]}
    labels = ["bicubic", "step00000100", "step00000200", "step00000300"]
    assert set(rows) == {(c, s) for c in labels for s in ("Folder", "Shards")}
    assert rows[("step00000200", "Shards")]["step"] == 200 and rows[("bicubic", "Folder")]["step"] is None
    md = (out / "results.md").read_text()
    for label in labels:
        assert f"| {label} |" in md
    assert "| checkpoint | step | Folder | Shards |" in md
    for m in PIXEL.split(","):
        png = out / f"plot_{m}.png"
        assert png.is_file() and Image.open(png).size[0] > 100
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(labels) * 2 * 4
    assert len(summary["per_image"]) == len(labels) * 6

    # bicubic row: MATLAB bicubic of the (cropped) LR scored with the standard metric, by hand
    # 50 x 44: mod-crop to 48 x 44, LR of that whole image, then both cropped to a multiple of 8 (48 x 40)
    hr = np.asarray(Image.open(folder / "astronaut.png"))[:48, :44]
    lr = imresize(hr, 1 / 4)[:12, :10]
    hr = hr[:48, :40]
    want = metrics.psnr_y(imresize(lr, 4), hr, 4)
    got = next(r for r in summary["per_image"] if r["checkpoint"] == "bicubic" and r["key"] == "astronaut")
    assert got["metrics"]["psnr_y"] == pytest.approx(want, abs=1e-9)
    # a model row: the same SR as inference with the same seed gives the same score
    cfg = load_config(run / "config.yaml")
    model = build_model(cfg.model)
    from samdiffsr.models import load_weights

    load_weights(model, run / "weights" / "step00000200.pt")
    sr = dict(SuperResolver(LoadedModel(model.eval(), cfg, {}, 255.0),
                            SamplerSettings(seed=1)).run([("astronaut", lr)]))["astronaut"]
    got = next(r for r in summary["per_image"] if r["checkpoint"] == "step00000200" and r["key"] == "astronaut")
    assert got["metrics"]["psnr_y"] == pytest.approx(metrics.psnr_y(sr, hr, 4), abs=1e-6)
    assert got["metrics"]["psnr_y_paper"] == pytest.approx(metrics.psnr_y_paper(sr, hr), abs=1e-6)

    # resume: a rerun recomputes nothing (pair summaries untouched), and asking other settings is refused
    stamps = {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json")}
    assert sweep(run, folder, shards, out) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "results").rglob("*.json")} == stamps
    assert sweep(run, folder, shards, out, "--steps", "3") == 2


def test_resume_skips_done_pairs_and_scored_images(bench_inputs, tmp_path):
    run, folder, shards = bench_inputs
    out = tmp_path / "out"
    assert sweep(run, folder, shards, out, "--ckpts", "100", "--no-bicubic") == 0
    done = out / "results" / "step00000100" / "Folder.json"
    stamp = done.stat().st_mtime_ns
    # a crashed earlier run left one scored image (a sentinel value) and a torn line for step 200
    part = out / "results" / "step00000200" / "Folder.part-0-of-1.jsonl"
    part.parent.mkdir(parents=True)
    sentinel = {"psnr_y": 99.0, "ssim_y": 0.5, "psnr_y_paper": 98.0, "ssim_y_paper": 0.25}
    part.write_text(json.dumps({"key": "chelsea", "metrics": sentinel, "sr_seconds": 1.0, "step": 200})
                    + "\n" + '{"key": "coffee", "metr')
    assert sweep(run, folder, shards, out, "--ckpts", "100", "200", "--no-bicubic") == 0
    assert done.stat().st_mtime_ns == stamp  # the finished pair was not recomputed
    lines = [json.loads(x) for x in (out / "results" / "step00000200" / "Folder.jsonl").read_text().splitlines()]
    assert [x["key"] for x in lines] == ["astronaut", "chelsea", "coffee"]
    assert lines[1]["metrics"] == sentinel  # the scored image was kept, not redone
    assert lines[2]["metrics"]["psnr_y"] < 60  # the torn one was computed
    assert not part.exists()  # parts are folded into the pair's file


@pytest.mark.slow
def test_two_ranks_share_the_work_and_rank0_gathers(bench_inputs, tmp_path):
    run, folder, shards = bench_inputs
    single = tmp_path / "single"
    args = ["--run", str(run), "--ckpts", "300", "--sets", f"Folder={folder}", f"Shards={shards}",
            "--metrics", PIXEL, "--seed", "1", "--quiet"]
    assert main([*args, "--out", str(single)]) == 0
    multi = tmp_path / "multi"
    procs = []
    for rank in (1, 0):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "launcher" / "benchmark.py"), *args,
                                       "--out", str(multi)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "| step00000300 |" in outs[1][0] and outs[0][0] == ""  # only rank 0 reports

    def per_image(path):
        data = json.loads((path / "results.json").read_text())
        return {(r["checkpoint"], r["set"], r["key"]): r["metrics"] for r in data["per_image"]}

    a, b = per_image(single), per_image(multi)
    assert a.keys() == b.keys() and len(a) == 12
    for k in a:
        for m in a[k]:
            assert b[k][m] == pytest.approx(a[k][m], abs=1e-4), (k, m)


def test_missing_lpips_and_fid_weights_are_clear_errors(bench_inputs, tmp_path, monkeypatch, capsys):
    _, folder, _ = bench_inputs
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))  # no cached weights either
    (tmp_path / "empty").mkdir()
    base = ["--sets", str(folder), "--out", str(tmp_path / "o"), "--quiet"]
    assert main([*base, "--metrics", "psnr_y,lpips_alex", "--lpips-weights", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "alexnet-owt-7be5be79.pth" in err and "--lpips-weights" in err and "--metrics" in err
    assert main([*base, "--metrics", "fid"]) == 2  # default: the (empty) torch hub cache
    err = capsys.readouterr().err
    assert "pt_inception-2015-12-05-6726825d.pth" in err and "--fid-weights" in err
    assert not (tmp_path / "o" / "results").exists()  # failed before any work


def write_bicubic_sr(hr_dir: Path, sr_dir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Existing SR images: plain bicubic upsampling of each HR image's LR, saved as PNG; (sr, hr) pairs."""
    sr_dir.mkdir()
    pairs = []
    for p in sorted(hr_dir.glob("*.png")):
        hr = np.asarray(Image.open(p))
        hr = hr[: hr.shape[0] // 4 * 4, : hr.shape[1] // 4 * 4]
        sr = imresize(imresize(hr, 1 / 4), 4)
        Image.fromarray(sr).save(sr_dir / p.name)
        pairs.append((sr, hr))
    return pairs


@pytest.mark.slow  # FID's 2048-d sqrtm: tens of seconds on 2 cores
def test_lpips_and_fid_from_weight_files_and_sr_dir_mode(bench_inputs, tmp_path):
    _, folder, _ = bench_inputs
    wdir = tmp_path / "weights"
    lpips_files = LPIPS.random_init(seed=1).export_weights(wdir)
    fid_file = FIDFeatures.random_init(seed=2).export_weights(wdir)
    pairs = write_bicubic_sr(folder, tmp_path / "bicubic_sr")
    out = tmp_path / "out"
    # --sr-dir: one row, no bicubic row, so one FID pair only (its 2048-d matrix square root is the slow part)
    rc = main(["--sr-dir", str(tmp_path / "bicubic_sr"), "--hr-dir", str(folder), "--out", str(out), "--quiet",
               "--metrics", "psnr_y,lpips_alex,fid", "--lpips-weights", *map(str, lpips_files),
               "--fid-weights", str(fid_file)])
    assert rc == 0
    rows = {s["checkpoint"]: s["metrics"] for s in json.loads((out / "results.json").read_text())["summary"]}
    assert set(rows) == {"sr_dir"}
    got = rows["sr_dir"]
    assert set(got) == {"psnr_y", "lpips_alex", "fid_clean"}  # fid: the default --fid-mode, clean (the paper's)
    lpips = LPIPS.random_init(seed=1)
    assert got["psnr_y"] == pytest.approx(np.mean([metrics.psnr_y(sr, hr, 4) for sr, hr in pairs]), rel=1e-9)
    assert got["lpips_alex"] == pytest.approx(np.mean([float(lpips(sr, hr)[0]) for sr, hr in pairs]), rel=1e-5)
    assert np.isfinite(got["fid_clean"]) and got["fid_clean"] >= 0
    assert len(list((out / "features" / "fid_clean").rglob("*.npy"))) == 6  # SR and HR features of 3 images
    hr_feat = np.load(next((out / "features" / "fid_clean" / "hr").rglob("astronaut.npy")))
    np.testing.assert_allclose(hr_feat, FIDFeatures.random_init(seed=2, mode="clean")([pairs[0][1]])[0], rtol=1e-6)
    md = (out / "results.md").read_text()
    assert "lpips_alex" in md and "`fid_clean`: FID, clean-fid pipeline" in md


def test_fid_legacy_mode_names_its_column_and_uses_the_pytorch_fid_pipeline(tmp_path):
    hr_dir, sr_dir = tmp_path / "hr", tmp_path / "sr"
    hr_dir.mkdir()
    Image.fromarray(photo_hr("coffee", (40, 48))).save(hr_dir / "coffee.png")
    (sr, hr), = write_bicubic_sr(hr_dir, sr_dir)
    state = random_fid_state(seed=2)
    fid_file = FIDFeatures(state).export_weights(tmp_path / "weights")
    out = tmp_path / "out"
    assert main(["--sr-dir", str(sr_dir), "--hr-dir", str(hr_dir), "--out", str(out), "--quiet",
                 "--metrics", "psnr_y,fid", "--fid-mode", "legacy", "--fid-weights", str(fid_file)]) == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert [set(s["metrics"]) for s in summary] == [{"psnr_y", "fid_legacy"}]
    assert np.isnan(summary[0]["metrics"]["fid_legacy"])  # one image: FID is undefined, no sqrtm
    md = (out / "results.md").read_text()
    assert "Each cell: psnr_y / fid_legacy." in md and "`fid_legacy`: FID, pytorch-fid pipeline" in md
    feat = np.load(out / "features" / "fid_legacy" / "hr" / "sr" / "coffee.npy")
    legacy = FIDFeatures(state, mode="legacy_pytorch")([hr])[0]
    clean = FIDFeatures(state, mode="clean")([hr])[0]
    np.testing.assert_allclose(feat, legacy, rtol=1e-6)
    assert not np.allclose(legacy, clean, rtol=1e-3)  # the two pipelines differ: the mode is not just a name


def test_sr_dir_mode_scores_the_folder_alone_and_reports_only_its_settings(bench_inputs, tmp_path, capsys):
    _, folder, _ = bench_inputs
    pairs = write_bicubic_sr(folder, tmp_path / "my_method")
    out = tmp_path / "out"
    assert main(["--sr-dir", str(tmp_path / "my_method"), "--hr-dir", str(folder), "--out", str(out),
                 "--metrics", "psnr_y,ssim_y", "--quiet", "--html-crops", "--crop-size", "16"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert [(s["checkpoint"], s["set"]) for s in data["summary"]] == [("sr_dir", "my_method")]  # no bicubic row
    assert data["summary"][0]["metrics"]["psnr_y"] == pytest.approx(
        np.mean([metrics.psnr_y(sr, hr, 4) for sr, hr in pairs]), rel=1e-9)
    assert data["settings"] == {"scale": 4, "hr_multiple": 1}  # no sampler, divisor or EMA settings
    md = (out / "results.md").read_text()
    assert "\nSettings: scale=4, hr_multiple=1\n" in md and md in printed and "bicubic" not in md
    assert "| checkpoint | step | my_method |" in md and "| sr_dir |" in md
    # the page's crops: SR and HR (the LR of existing SR images is unknown)
    crops = out / "crops" / "my_method" / "chelsea"
    assert sorted(p.name for p in crops.glob("*.thumb.png")) == ["hr.thumb.png", "row-sr_dir.thumb.png"]
    assert 'src="crops/my_method/chelsea/row-sr_dir.thumb.png"' in (out / "results.html").read_text()

    # NAME=PATH names the set; sampler options are refused, not silently ignored
    assert main(["--sr-dir", f"Set5={tmp_path / 'my_method'}", "--hr-dir", str(folder), "--out",
                 str(tmp_path / "named"), "--metrics", "psnr_y", "--quiet"]) == 0
    assert json.loads((tmp_path / "named" / "results.json").read_text())["sets"] == ["Set5"]
    capsys.readouterr()
    assert main(["--sr-dir", str(tmp_path / "my_method"), "--hr-dir", str(folder), "--out", str(tmp_path / "x"),
                 "--steps", "3", "--seed", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps, --seed do(es) not apply" in err


def test_every_option_has_help_that_shows_its_default():
    import argparse

    from samdiffsr.evaluation.benchmark_cli import build_parser

    parser = build_parser()
    formatter = argparse.HelpFormatter("benchmark")
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = formatter._expand_help(action) if action.help else ""
        assert "(default: " in text, f"{action.option_strings or action.dest}: {text!r}"
    assert parser.get_default("fid_mode") == "clean" and "fid" in parser.get_default("metrics").split(",")
    from samdiffsr.evaluation.suite import MetricError, resolve_metrics

    assert resolve_metrics(["psnr_y", "fid"]) == ["psnr_y", "fid_clean"]
    assert resolve_metrics(["fid", "fid_legacy"], "legacy") == ["fid_legacy"]
    with pytest.raises(MetricError, match="--metrics"):
        resolve_metrics(["psnr", "fid"])


@pytest.mark.slow  # a real training process (DeepSpeed on CPU), then the sweep
def test_sweep_over_a_real_short_training_run(bench_inputs, tmp_path):
    from train_helpers import TINY as TRAIN_TINY
    from train_helpers import rank_env, write_shards

    _, folder, shards = bench_inputs
    cfg = load_config(REPO / "configs" / "demo.yaml", TRAIN_TINY)
    rrdb = tmp_path / "rrdb.pt"
    torch.manual_seed(0)
    save_weights(rrdb, build_model(cfg.model).rrdb)
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launcher" / "train.py"), "--config", str(REPO / "configs" / "demo.yaml"),
           *TRAIN_TINY, f"data.train_shards={write_shards(tmp_path / 'train')}", "data.val_shards=",
           f"train.rrdb_ckpt={rrdb}", f"train.run_dir={run}", "train.max_steps=4", "train.ckpt_every=2",
           "train.keep_last=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=rank_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in (run / "weights").glob("step*.pt")) == ["step00000002.pt", "step00000004.pt"]
    out = run / "benchmark"  # the default output folder
    assert main(["--run", str(run), "--sets", f"Folder={folder}", f"Shards={shards}", "--metrics", PIXEL,
                 "--steps", "5", "--quiet"]) == 0
    rows = {(s["checkpoint"], s["step"]) for s in json.loads((out / "results.json").read_text())["summary"]}
    assert rows == {("bicubic", None), ("step00000002", 2), ("step00000004", 4)}
    assert (out / "plot_psnr_y.png").is_file() and "| step00000004 | 4 |" in (out / "results.md").read_text()


def test_table_shows_the_papers_reported_numbers_next_to_sets_named_like_theirs():
    from samdiffsr.evaluation.report import markdown_table

    rows = [{"checkpoint": "bicubic", "step": None, "set": s, "source": "bicubic",
             "metrics": {"psnr_y": 28.0, "psnr_y_paper": 28.5}} for s in ("Set5", "B100", "mine")]
    md = markdown_table(rows, ["Set5", "B100", "mine"], ["psnr_y", "psnr_y_paper"], {})
    assert "| paper, reported (400k) | 400000 | - / 30.99 | - / 26.47 | - / - |" in md
    assert "paper, reported" not in markdown_table(rows, ["mine"], ["psnr_y"], {})
