"""Benchmark sweeps, the library: rows (checkpoints, the bicubic baseline, a folder of SR images) x sets x
metrics, each rank scoring its share of the images and rank 0 gathering (:func:`run_sweep`). The CLI is
:mod:`samdiffsr.evaluation.benchmark_cli`; results layout in :mod:`samdiffsr.evaluation.results`.

A score never depends on the batch, the number of processes or a restart: images are never padded to each
other's size and each has its own generator (docs/evaluation.md).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samdiffsr.cli import UserError
from samdiffsr.config import Config
from samdiffsr.data.pairs import Pair, SetSource, folder_keys, load_share
from samdiffsr.data.shardlist import expand_shards
from samdiffsr.data.tarread import read_shard
from samdiffsr.evaluation.crops import save_crops
from samdiffsr.evaluation.inference import SamplerSettings, SuperResolver, save_png
from samdiffsr.evaluation.results import ResultStore
from samdiffsr.evaluation.sets import find_sr_file, match_sr, names
from samdiffsr.evaluation.suite import DEFAULT_FID_MODE, MetricSuite
from samdiffsr.evaluation.tiling import lr_multiple
from samdiffsr.images import read_image
from samdiffsr.imresize import imresize
from samdiffsr.models.loading import LoadedModel, default_device, load_model
from samdiffsr.progress import progress_bar

STEP_FILE = re.compile(r"^step(\d+)\.pt$")


class BenchmarkError(UserError, RuntimeError):
    """A user-facing problem with the sweep's arguments or inputs."""


# ----------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class SweepRow:
    """One row of the table: a weights file, the bicubic baseline, or a folder of existing SR images."""

    label: str
    source: str  # "model" | "bicubic" | "folder"
    path: str | None = None
    step: int | None = None


def run_checkpoints(run_dir: str | Path, spec: str | Sequence[str] = "all") -> list[SweepRow]:
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
    return [SweepRow(f"step{s:08d}", "model", str(found[s]), s) for s in chosen]


def weight_rows(paths: Sequence[str]) -> list[SweepRow]:
    """Rows for explicit weights files, labelled by file name (their step is read when loaded)."""
    out, labels = [], set()
    for p in paths:
        if not Path(p).is_file():
            raise BenchmarkError(f"--weights: file not found: {p}")
        label, n = Path(p).stem, 2
        while label in labels:
            label, n = f"{Path(p).stem}-{n}", n + 1
        labels.add(label)
        out.append(SweepRow(label, "model", str(p)))
    return out


# ----------------------------------------------------------------------------------------- sweep


@dataclass
class SweepSpec:
    """Everything a sweep needs (what the CLI parses)."""

    out: str
    rows: list[SweepRow]
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
    crop_size: int = 0  # > 0: write the HTML report's crops of this side (crops.py)
    fid_mode: str = DEFAULT_FID_MODE
    sr_dir: str | None = None
    rank: int = 0
    world: int = 1
    gather_timeout: float = 6 * 3600.0
    progress: bool = True


class SRProducer:
    """Produces SR images for a row; keeps the last model loaded (one at a time)."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.loaded: tuple[str, LoadedModel] | None = None

    def model(self, row: SweepRow) -> LoadedModel:
        if self.loaded is None or self.loaded[0] != row.path:
            self.loaded = None  # free the previous model first
            s = self.spec
            self.loaded = (row.path, load_model(row.path, s.config_path or None, overrides=s.overrides,
                                                device=s.device, prefer_ema=s.prefer_ema,
                                                lr_up_divisor=s.lr_up_divisor))
        return self.loaded[1]

    def run(self, row: SweepRow, pairs: Sequence[Pair]) -> Iterator[tuple[Pair, np.ndarray, float, int | None]]:
        """Yield (pair, SR uint8, seconds per image, step) for every pair."""
        scale = self.spec.config.model.sr_scale
        if row.source == "bicubic":
            for p in pairs:
                t = time.perf_counter()
                yield p, imresize(p.lr, scale), time.perf_counter() - t, None
        elif row.source == "folder":
            for p in pairs:
                t = time.perf_counter()
                sr = read_image(find_sr_file(row.path, p.key))[0]
                yield p, sr, time.perf_counter() - t, None
        else:
            loaded = self.model(row)
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
    if spec.sr_dir:  # existing SR images: no model, sampler or divisor is involved
        return {"scale": scale, "hr_multiple": 1}
    hr_multiple = scale * lr_multiple(spec.config.model)
    return {"scale": scale, "hr_multiple": hr_multiple, "lr_up_divisor": spec.lr_up_divisor,
            "ema": spec.prefer_ema, **(spec.sampler.identity() if spec.sampler else {})}


def set_keys(src: SetSource) -> list[str]:
    """A set's image keys in order, without decoding its images (folder names, or the shards' headers)."""
    if src.kind == "folder":
        return [key for key, _ in folder_keys(src.path)]
    return [raw["__key__"] for url in expand_shards(src.path) for raw in read_shard(url)]


def sweep_extent(spec: SweepSpec, store: ResultStore, metrics: Sequence[str]) -> tuple[int, int]:
    """(total, done) images of this rank's whole sweep: rows x sets x its share of each set's images.

    ``done``: those already scored (a rerun continues); the progress bar's ETA is on the rest. A set that
    cannot be listed counts 0 here: loading it (:func:`load_share`) reports the problem.
    """
    total = done = 0
    for src in spec.sets:
        try:
            keys = set_keys(src)[spec.rank::spec.world]
        except Exception:  # noqa: BLE001 - the set's own error comes, worded, from load_share
            continue
        for row in spec.rows:
            total += len(keys)
            if store.is_done(row.label, src.name, metrics):
                done += len(keys)
                continue
            have = store.records(row.label, src.name)
            done += sum(store.complete(have.get(k), row.label, src.name, metrics) for k in keys)
    return total, done


def _score_share(spec: SweepSpec, store: ResultStore, suite: MetricSuite, settings: dict[str, Any]) -> dict:
    """Score this rank's images of every unfinished (row, set) pair; returns every set's keys in order."""
    scale = settings["scale"]
    producer = SRProducer(spec)
    total, done = sweep_extent(spec, store, suite.names) if spec.progress else (0, 0)
    bar = progress_bar(total=total, initial=done, desc="benchmark", unit="img", disable=not spec.progress)
    keys_of: dict[str, list[str]] = {}
    for src in spec.sets:
        keys, mine = load_share(src, scale, settings["hr_multiple"], spec.rank, spec.world)
        keys_of[src.name] = keys
        for row in spec.rows:
            if store.is_done(row.label, src.name, suite.names):
                continue
            have = store.records(row.label, src.name)
            todo = [p for p in mine if not store.complete(have.get(p.key), row.label, src.name, suite.names)]
            if not todo:
                continue
            bar.set_description(f"benchmark {row.label} / {src.name}")
            for p, sr, secs, step in producer.run(row, todo):
                where = f"{row.label}/{src.name}/{p.key}"
                hr = match_sr(sr, p.hr, max(8, 2 * scale), where) if row.source == "folder" else p.hr
                try:
                    scores = suite.score(sr, hr)
                except ValueError as exc:
                    raise BenchmarkError(f"{where}: cannot score ({exc})") from exc
                suite.save_features(store, row.label, src.name, p.key, sr, hr)
                if spec.crop_size:
                    lr = None if row.source == "folder" else p.lr
                    save_crops(spec.out, src.name, p.key, row.label, sr, hr, lr, scale, spec.crop_size)
                if spec.save_images and row.source != "folder":
                    save_png(Path(spec.out) / "images" / row.label / src.name / f"{p.key}.png", sr)
                store.append(row.label, src.name, spec.rank, spec.world,
                             {"key": p.key, "metrics": scores, "sr_seconds": secs,
                              "step": step if step is not None else row.step})
                bar.update(1)
    bar.close()
    return keys_of


def _gather(spec: SweepSpec, store: ResultStore, suite: MetricSuite,
            keys_of: dict[str, list[str]]) -> tuple[list[dict], list[dict]]:
    """Rank 0: wait for every pair's images, write the pair files; return summaries and per-image rows."""
    summaries, per_image = [], []
    for src in spec.sets:
        keys = keys_of[src.name]
        for row in spec.rows:
            if not store.is_done(row.label, src.name, suite.names):
                recs = store.wait_complete(row.label, src.name, keys, suite.names, spec.world,
                                           spec.gather_timeout)
                step = row.step
                if step is None:  # explicit weights files: the step recorded when they were loaded
                    step = next((r.get("step") for r in recs.values() if r.get("step") is not None), None)
                store.finalize(row.label, src.name, keys, suite.names, recs, step, row.source)
            summary = store.summary(row.label, src.name)
            summaries.append(summary)
            recs = store.records(row.label, src.name)
            per_image += [{"checkpoint": row.label, "step": summary["step"], "set": src.name, **recs[k]}
                          for k in keys]
    return summaries, per_image


def run_sweep(spec: SweepSpec) -> dict[str, Any] | None:
    """Evaluate this rank's share of every (row, set) pair; on rank 0 also gather and report.

    Returns the report paths and summaries on rank 0, None on the other ranks.
    """
    from samdiffsr.evaluation.html_report import write_html
    from samdiffsr.evaluation.report import write_plots, write_tables

    store = ResultStore(spec.out)
    settings = _settings(spec)
    store.check_settings(settings)
    suite = MetricSuite(spec.metrics, settings["scale"], lpips_weights=spec.lpips_weights,
                        fid_weights=spec.fid_weights, device=spec.device or default_device(),
                        fid_mode=spec.fid_mode)
    keys_of = _score_share(spec, store, suite, settings)
    if spec.rank != 0:
        return None
    summaries, per_image = _gather(spec, store, suite, keys_of)
    set_names = names(spec.sets)
    out = Path(spec.out)
    paths = write_tables(out, summaries, per_image, set_names, suite.names, settings)
    plots = write_plots(out, summaries, set_names, suite.names)
    paths["html"] = write_html(out, summaries, per_image, set_names, suite.names, settings, plots)
    return {"paths": paths, "plots": plots, "summaries": summaries}
