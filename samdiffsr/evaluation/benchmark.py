"""Benchmark sweeps: checkpoints x sets x metrics -> results.csv/.json/.md and a plot per metric.

    python launcher/benchmark.py --run runs/x --sets Set5=shards/benchmark/set5 HR/Set14 --ckpts every:10000
    python launcher/benchmark.py --weights model_ckpt_steps_400000.ckpt --sets ... --out bench_paper
    torchrun --nproc_per_node 8 launcher/benchmark.py --run runs/x --sets ...     (one process per GPU)
    python launcher/benchmark.py --sr-dir SR --hr-dir HR --out eval             (score existing outputs)

Rows are the checkpoints plus ``bicubic`` (MATLAB-bicubic upsampling of the same LR: the baseline). Work is
shared image by image between the processes (``RANK`` / ``WORLD_SIZE`` from torchrun or deepspeed, or
Slurm's ``SLURM_PROCID`` / ``SLURM_NTASKS``); rank 0 gathers through files and writes the report (see
:mod:`samdiffsr.evaluation.results`). Batching: images whose (padded) size is equal, or with ``--tile``
all tiles of equal size from any images, share network calls, ``--batch`` at a time; no padding between
images, so a score never depends on the batch (see :mod:`samdiffsr.evaluation.tiling`). Finished
(checkpoint, set) pairs and scored images are not recomputed on a rerun.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..cli import ArgumentParser, UserError, run_cli
from ..config import Config, load_config
from ..imresize import imresize
from ..models.samplers import SAMPLERS
from . import metrics as pixel
from .inference import (
    LoadedModel,
    SamplerSettings,
    SuperResolver,
    default_device,
    load_model,
    read_checkpoint,
    resolve_config,
    save_png,
)
from .results import FID, HR_LABEL, GatherTimeout, ResultStore, SettingsMismatch
from .sets import Pair, SetSource, find_sr_file, load_share, match_sr, names, parse_set
from .tiling import lr_multiple

LPIPS_ALEX = "lpips_alex"
ALL_METRICS = (*pixel.PIXEL_METRICS, LPIPS_ALEX, FID)
STEP_FILE = re.compile(r"^step(\d+)\.pt$")


class BenchmarkError(UserError, RuntimeError):
    """A user-facing problem with the sweep's arguments or inputs."""


# ----------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Entry:
    """One row of the table: a weights file, the bicubic baseline, or a folder of existing SR images."""

    label: str
    source: str  # "model" | "bicubic" | "folder"
    path: str | None = None
    step: int | None = None


def run_checkpoints(run_dir: str | Path, spec: str | Sequence[str] = "all") -> list[Entry]:
    """Weights files ``<run>/weights/stepN.pt`` chosen by ``all | latest | every:K | <steps...>``."""
    folder = Path(run_dir) / "weights"
    found = {int(m.group(1)): p for p in folder.glob("step*.pt") if (m := STEP_FILE.match(p.name))}
    if not found:
        raise BenchmarkError(f"no checkpoints (weights/stepN.pt) in run folder {run_dir}")
    words = [spec] if isinstance(spec, str) else list(spec)
    steps = sorted(found)
    if words == ["all"]:
        chosen = steps
    elif words == ["latest"]:
        chosen = steps[-1:]
    elif len(words) == 1 and words[0].startswith("every:"):
        try:
            k = int(words[0].split(":", 1)[1])
        except ValueError:
            raise BenchmarkError(f"--ckpts {words[0]!r}: expected every:K with an integer K") from None
        chosen = [s for s in steps if k > 0 and s % k == 0]
        if not chosen:
            raise BenchmarkError(f"--ckpts every:{k}: no step is a multiple of {k} (steps: {steps})")
    else:
        try:
            chosen = sorted({int(w) for w in words})
        except ValueError:
            raise BenchmarkError(f"--ckpts {' '.join(words)}: use all, latest, every:K or step numbers") from None
        absent = [s for s in chosen if s not in found]
        if absent:
            raise BenchmarkError(f"--ckpts: no checkpoint for step(s) {absent} in {folder} (have {steps})")
    return [Entry(f"step{s:08d}", "model", str(found[s]), s) for s in chosen]


def weight_entries(paths: Sequence[str]) -> list[Entry]:
    """Entries for explicit weights files, labelled by file name (their step is read when loaded)."""
    out, labels = [], set()
    for p in paths:
        if not Path(p).is_file():
            raise BenchmarkError(f"--weights: file not found: {p}")
        label, n = Path(p).stem, 2
        while label in labels:
            label, n = f"{Path(p).stem}-{n}", n + 1
        labels.add(label)
        out.append(Entry(label, "model", str(p)))
    return out


# ---------------------------------------------------------------------------------------- metrics


class MetricSuite:
    """The requested metrics; LPIPS / FID networks are built up front so a missing file fails first."""

    def __init__(self, names_: Sequence[str], scale: int, *, lpips_weights: Any = None, fid_weights: Any = None,
                 device: Any = "cpu"):
        unknown = [m for m in names_ if m not in ALL_METRICS]
        if unknown:
            raise BenchmarkError(f"unknown metric(s) {unknown}; choose from {', '.join(ALL_METRICS)}")
        self.names = list(dict.fromkeys(names_))
        self.scale = scale
        self.lpips = self.fid = None
        if LPIPS_ALEX in self.names:
            from .perceptual import LPIPS

            self.lpips = LPIPS(lpips_weights, device=device)
        if FID in self.names:
            from .fid import FIDFeatures

            self.fid = FIDFeatures(fid_weights, device=device)

    def score(self, sr: np.ndarray, hr: np.ndarray) -> dict[str, float]:
        """Per-image metrics (all but FID) of a uint8 SR against its uint8 HR."""
        out: dict[str, float] = {}
        fns = {pixel.PSNR_Y: lambda: pixel.psnr_y(sr, hr, self.scale),
               pixel.SSIM_Y: lambda: pixel.ssim_y(sr, hr, self.scale),
               pixel.PSNR_Y_PAPER: lambda: pixel.psnr_y_paper(sr, hr),
               pixel.SSIM_Y_PAPER: lambda: pixel.ssim_y_paper(sr, hr)}
        for m in self.names:
            if m in fns:
                out[m] = float(fns[m]())
            elif m == LPIPS_ALEX:
                out[m] = float(self.lpips(sr, hr)[0])
        return out

    def features(self, img: np.ndarray) -> np.ndarray:
        return self.fid([img])[0]


# ----------------------------------------------------------------------------------------- sweep


@dataclass
class SweepSpec:
    """Everything a sweep needs (what the CLI parses)."""

    out: str
    entries: list[Entry]
    sets: list[SetSource]
    metrics: list[str]
    config: Config
    config_path: str | None = None
    overrides: tuple[str, ...] = ()
    sampler: SamplerSettings | None = None
    lr_up_divisor: float | None = None
    prefer_ema: bool = True
    lpips_weights: Any = None
    fid_weights: Any = None
    device: str | None = None
    save_images: bool = False
    sr_dir: str | None = None
    rank: int = 0
    world: int = 1
    gather_timeout: float = 6 * 3600.0
    progress: bool = True


def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun / deepspeed (RANK, WORLD_SIZE) or Slurm; (0, 1) otherwise."""
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and world_var in os.environ:
            rank, world = int(os.environ[rank_var]), int(os.environ[world_var])
            if not 0 <= rank < world:
                raise BenchmarkError(f"{rank_var}={rank} is not in [0, {world_var}={world})")
            return rank, world
    return 0, 1


class _Sources:
    """Produces SR images for an entry; keeps the last model loaded (one at a time)."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.loaded: tuple[str, LoadedModel] | None = None

    def model(self, entry: Entry) -> LoadedModel:
        if self.loaded is None or self.loaded[0] != entry.path:
            self.loaded = None  # free the previous model first
            s = self.spec
            self.loaded = (entry.path, load_model(entry.path, s.config_path or None, overrides=s.overrides,
                                                  device=s.device, prefer_ema=s.prefer_ema,
                                                  lr_up_divisor=s.lr_up_divisor))
        return self.loaded[1]

    def run(self, entry: Entry, pairs: Sequence[Pair]) -> Iterator[tuple[Pair, np.ndarray, float, int | None]]:
        """Yield (pair, SR uint8, seconds per image, step) for every pair."""
        scale = self.spec.config.model.sr_scale
        if entry.source == "bicubic":
            for p in pairs:
                t = time.perf_counter()
                yield p, imresize(p.lr, scale), time.perf_counter() - t, None
        elif entry.source == "folder":
            from ..images import read_image

            for p in pairs:
                t = time.perf_counter()
                sr = read_image(find_sr_file(entry.path, p.key))[0]
                yield p, sr, time.perf_counter() - t, None
        else:
            loaded = self.model(entry)
            resolver = SuperResolver(loaded, self.spec.sampler)
            step = loaded.info.get("step")
            for wave in resolver.plan_waves([p.lr.shape[:2] for p in pairs]):
                t = time.perf_counter()
                srs = resolver.sample([pairs[i].lr for i in wave], [pairs[i].key for i in wave])
                per = (time.perf_counter() - t) / len(wave)
                for i, sr in zip(wave, srs, strict=True):
                    yield pairs[i], sr, per, step


def _settings(spec: SweepSpec) -> dict[str, Any]:
    """What the numbers depend on (stored with the results; batch and device are not in it)."""
    scale = spec.config.model.sr_scale
    # Crop as the authors' test loader does: HR to a multiple of scale x the UNet's LR multiple (8).
    hr_multiple = 1 if spec.sr_dir else scale * lr_multiple(spec.config.model)
    return {"scale": scale, "hr_multiple": hr_multiple, "lr_up_divisor": spec.lr_up_divisor,
            "ema": spec.prefer_ema, **(spec.sampler.identity() if spec.sampler else {})}


def _score_share(spec: SweepSpec, store: ResultStore, suite: MetricSuite, settings: dict[str, Any]) -> dict:
    """Score this rank's images of every unfinished (entry, set) pair; returns every set's keys in order."""
    from tqdm import tqdm

    scale = settings["scale"]
    sources = _Sources(spec)
    bar = tqdm(total=0, desc="benchmark", unit="img", disable=not spec.progress)
    keys_of: dict[str, list[str]] = {}
    for src in spec.sets:
        keys, mine = load_share(src, scale, settings["hr_multiple"], spec.rank, spec.world)
        keys_of[src.name] = keys
        for entry in spec.entries:
            if store.is_done(entry.label, src.name, suite.names):
                continue
            have = store.records(entry.label, src.name)
            todo = [p for p in mine if not store.complete(have.get(p.key), entry.label, src.name, suite.names)]
            if not todo:
                continue
            bar.total += len(todo)
            bar.set_description(f"{entry.label} / {src.name}")
            for p, sr, secs, step in sources.run(entry, todo):
                where = f"{entry.label}/{src.name}/{p.key}"
                hr = match_sr(sr, p.hr, max(8, 2 * scale), where) if entry.source == "folder" else p.hr
                try:
                    scores = suite.score(sr, hr)
                except ValueError as exc:
                    raise BenchmarkError(f"{where}: cannot score ({exc})") from exc
                if suite.fid is not None:
                    if not store.features_path(HR_LABEL, src.name, p.key).is_file():
                        store.save_features(HR_LABEL, src.name, p.key, suite.features(hr))
                    store.save_features(entry.label, src.name, p.key, suite.features(sr))
                if spec.save_images and entry.source != "folder":
                    save_png(Path(spec.out) / "images" / entry.label / src.name / f"{p.key}.png", sr)
                store.append(entry.label, src.name, spec.rank, spec.world,
                             {"key": p.key, "metrics": scores, "sr_seconds": secs,
                              "step": step if step is not None else entry.step})
                bar.update(1)
    bar.close()
    return keys_of


def _gather(spec: SweepSpec, store: ResultStore, suite: MetricSuite,
            keys_of: dict[str, list[str]]) -> tuple[list[dict], list[dict]]:
    """Rank 0: wait for every pair's images, write the pair files; return summaries and per-image rows."""
    summaries, per_image = [], []
    for src in spec.sets:
        keys = keys_of[src.name]
        for entry in spec.entries:
            if not store.is_done(entry.label, src.name, suite.names):
                recs = store.wait_complete(entry.label, src.name, keys, suite.names, spec.world,
                                           spec.gather_timeout)
                step = entry.step
                if step is None:  # explicit weights files: the step recorded when they were loaded
                    step = next((r.get("step") for r in recs.values() if r.get("step") is not None), None)
                store.finalize(entry.label, src.name, keys, suite.names, recs, step, entry.source)
            summary = store.summary(entry.label, src.name)
            summaries.append(summary)
            recs = store.records(entry.label, src.name)
            per_image += [{"checkpoint": entry.label, "step": summary["step"], "set": src.name, **recs[k]}
                          for k in keys]
    return summaries, per_image


def run_sweep(spec: SweepSpec) -> dict[str, Any] | None:
    """Evaluate this rank's share of every (entry, set) pair; on rank 0 also gather and report.

    Returns the report paths and summaries on rank 0, None on the other ranks.
    """
    from .report import write_plots, write_tables

    store = ResultStore(spec.out)
    settings = _settings(spec)
    store.check_settings(settings)
    suite = MetricSuite(spec.metrics, settings["scale"], lpips_weights=spec.lpips_weights,
                        fid_weights=spec.fid_weights, device=spec.device or default_device())
    keys_of = _score_share(spec, store, suite, settings)
    if spec.rank != 0:
        return None
    summaries, per_image = _gather(spec, store, suite, keys_of)
    set_names = names(spec.sets)
    out = Path(spec.out)
    paths = write_tables(out, summaries, per_image, set_names, suite.names, settings)
    plots = write_plots(out, summaries, set_names, suite.names)
    return {"paths": paths, "plots": plots, "summaries": summaries}


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="benchmark", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Evaluate checkpoints of a run (and/or weight files, e.g. the authors' "
        "model_ckpt_steps_400000.ckpt) on benchmark sets, next to plain bicubic upsampling.",
        epilog=__doc__)
    src = p.add_argument_group("what to evaluate")
    src.add_argument("--run", help="training run folder (reads <run>/weights/stepN.pt and <run>/config.yaml)")
    src.add_argument("--ckpts", nargs="+", default=["all"],
                     help="with --run: all | latest | every:K | step numbers (default: all)")
    src.add_argument("--weights", nargs="+", default=[], help="explicit weights files (ours or the authors')")
    src.add_argument("--sets", nargs="+", default=[], help="NAME=PATH or PATH: benchmark shards (folder or "
                     "pattern, from make_shards --benchmark) or a folder of HR images")
    src.add_argument("--sr-dir", help="score existing SR images (matched to --hr-dir by file name) instead")
    src.add_argument("--hr-dir", help="HR folder for --sr-dir")
    src.add_argument("--no-bicubic", action="store_true", help="leave out the bicubic baseline row")
    m = p.add_argument_group("metrics")
    m.add_argument("--metrics", default=",".join(ALL_METRICS),
                   help=f"comma-separated, from {', '.join(ALL_METRICS)} (default: all)")
    m.add_argument("--lpips-weights", nargs="+", default=None,
                   help="alexnet-owt-7be5be79.pth and alex.pth (files or a folder; default: torch hub cache)")
    m.add_argument("--fid-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (file or folder; default: torch hub cache)")
    s = p.add_argument_group("sampling")
    s.add_argument("--config", help="model config (default: <run>/config.yaml, else the weights' own)")
    s.add_argument("--steps", type=int, default=None, help="sampler steps (fewer than T: respaced DDIM)")
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="ddpm (all T steps, the default), ddim or dpmpp_2m (DPM-Solver++ 2M, with --steps)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch", type=int, default=4, help="images (or tiles) per network call")
    s.add_argument("--tile", type=int, default=0, help="tile size in LR pixels (0: whole images)")
    s.add_argument("--overlap", type=int, default=16)
    s.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    s.add_argument("--lr-up-divisor", type=float, default=None,
                   help="default: 256 for the authors' checkpoint, else model.lr_up_divisor")
    s.add_argument("--no-ema", action="store_true")
    s.add_argument("--device", default=None)
    o = p.add_argument_group("output")
    o.add_argument("--out", help="output folder (default: <run>/benchmark)")
    o.add_argument("--save-images", action="store_true", help="also write the SR images under <out>/images")
    o.add_argument("--gather-timeout", type=float, default=6 * 3600.0,
                   help="seconds rank 0 waits for the other ranks' results")
    o.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def _base_config(args: argparse.Namespace) -> tuple[Config, str | None]:
    """The config that fixes scale and crop for every row, and the path models are built from."""
    if args.config:
        return load_config(args.config, args.overrides), args.config
    if args.run and (Path(args.run) / "config.yaml").is_file():
        path = str(Path(args.run) / "config.yaml")
        return load_config(path, args.overrides), path
    if args.weights:
        return resolve_config(read_checkpoint(args.weights[0]), None, args.overrides), None
    if args.run:
        first = run_checkpoints(args.run, "latest")[0].path
        return resolve_config(read_checkpoint(first), None, args.overrides), None
    return load_config(None, args.overrides), None


def spec_from_args(args: argparse.Namespace) -> SweepSpec:
    rank, world = dist_env()
    cfg, config_path = _base_config(args)
    entries: list[Entry] = []
    if args.sr_dir:
        if not args.hr_dir or args.run or args.weights or args.sets:
            raise BenchmarkError("--sr-dir goes with --hr-dir only (no --run / --weights / --sets)")
        if not Path(args.sr_dir).is_dir():
            raise BenchmarkError(f"--sr-dir: not a folder: {args.sr_dir}")
        entries.append(Entry(Path(args.sr_dir).resolve().name, "folder", args.sr_dir))
        sets = [SetSource(Path(args.hr_dir).resolve().name, args.hr_dir, "folder")]
    else:
        if args.run:
            entries += run_checkpoints(args.run, args.ckpts)
        entries += weight_entries(args.weights)
        if not entries and args.no_bicubic:
            raise BenchmarkError("nothing to evaluate: give --run, --weights or --sr-dir")
        if not args.sets:
            raise BenchmarkError("give the benchmark sets with --sets NAME=PATH ...")
        sets = [parse_set(s) for s in args.sets]
    if not args.no_bicubic:
        entries.insert(0, Entry("bicubic", "bicubic"))
    out = args.out or (str(Path(args.run) / "benchmark") if args.run else None)
    if not out:
        raise BenchmarkError("give --out (the default, <run>/benchmark, needs --run)")
    sampler = SamplerSettings(steps=args.steps, eta=args.eta, sampler=args.sampler, seed=args.seed,
                              tile=args.tile, overlap=args.overlap, precision=args.precision, batch=args.batch)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    return SweepSpec(out=out, entries=entries, sets=sets, metrics=metrics,
                     config=cfg, config_path=config_path, overrides=tuple(args.overrides), sampler=sampler,
                     lr_up_divisor=args.lr_up_divisor, prefer_ema=not args.no_ema,
                     lpips_weights=args.lpips_weights, fid_weights=args.fid_weights, device=args.device,
                     save_images=args.save_images, sr_dir=args.sr_dir, rank=rank, world=world,
                     gather_timeout=args.gather_timeout, progress=not args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """``launcher/benchmark.py``: 0 done, 2 a user error (one line by rank 0; samdiffsr.cli)."""
    return run_cli("benchmark", lambda: _sweep_cli(argv))


def _sweep_cli(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        if spec.world > 1 and (spec.device or str(default_device())) == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            import torch

            # Several CPU processes on one machine: split the cores instead of oversubscribing them.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world))
        result = run_sweep(spec)
    except (GatherTimeout, SettingsMismatch) as exc:
        raise UserError(str(exc)) from exc
    if result is None:
        return 0
    print(Path(result["paths"]["md"]).read_text())
    print("written:", *[str(p) for p in result["paths"].values()], *[str(p) for p in result["plots"]], sep="\n  ")
    return 0
