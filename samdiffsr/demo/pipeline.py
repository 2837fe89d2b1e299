"""The whole system in one command, on built-in photos: ``python launcher/demo.py [--long]``.

    demo shards (scikit-image / matplotlib photos, Felzenszwalb masks)  ->  RRDB pretraining (2 ranks)
    ->  modulated-diffusion training on the frozen RRDB (2 ranks, DeepSpeed; CPU when there is no GPU)
    ->  benchmark sweep over the checkpoints it wrote, on 26 held-out crops, against plain bicubic
    ->  three rows side by side (bicubic, the RRDB alone, SAM-DiffSR), paired differences with 95% intervals,
        a verdict and a comparison picture.

``--long`` trains longer (configs/demo_long.yaml, demo_rrdb_long.yaml). Every stage resumes: rerunning the
command skips finished shards, continues (or skips) finished training runs from their latest checkpoint,
and does not recompute finished benchmark pairs.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from samdiffsr.bundled import shipped_config
from samdiffsr.cli import EXIT_FAILED, EXIT_OK, ArgumentParser, UserError, run_cli
from samdiffsr.train.launch import launch_training


class DemoError(UserError):
    """A stage of the demo failed; the message names the stage and where its log is."""

    exit_code = EXIT_FAILED


@dataclass(frozen=True)
class DemoSettings:
    """Everything a demo run depends on; ``None`` keeps the config files' values."""

    workdir: str = "runs"
    shards: str = "shards/demo"
    ranks: int = 2
    long: bool = False
    rrdb_steps: int | None = None
    steps: int | None = None
    ckpt_every: int | None = None
    overrides: tuple[str, ...] = ()
    # The benchmark's sampler: respaced ancestral sampling (DDIM with eta 1), 10 network calls per image.
    # On the demo model it scores above the paper's 100-step chain, 9x faster (bench/RESULTS.md, "Samplers").
    bench_sampler: str = "ddim"
    bench_steps: int = 10
    bench_eta: float = 1.0

    @property
    def suffix(self) -> str:
        return "_long" if self.long else ""

    def configs(self) -> tuple[Path, Path]:
        """The RRDB and diffusion config files of this mode."""
        return shipped_config(f"demo_rrdb{self.suffix}"), shipped_config(f"demo{self.suffix}")  # package data

    def run_dirs(self) -> tuple[Path, Path]:
        """The RRDB and diffusion run folders of this mode (apart, so that neither resumes the other)."""
        work = Path(self.workdir)
        return work / f"demo_rrdb{self.suffix}", work / f"demo{self.suffix}"

    def stage_overrides(self, max_steps: int | None) -> list[str]:
        extra = [f"train.max_steps={max_steps}"] if max_steps is not None else []
        if self.ckpt_every is not None:
            extra += [f"train.ckpt_every={self.ckpt_every}", f"train.val_every={self.ckpt_every}"]
        return [*self.overrides, *extra]


def check_settings(settings: DemoSettings) -> None:
    """Refuse bad settings before the first stage runs (ConfigError names the key)."""
    from samdiffsr.config import load_config
    from samdiffsr.models.samplers import resolve_sampler

    if settings.ranks < 1 or settings.bench_steps < 1:
        raise UserError(f"--ranks and --bench-steps must be >= 1 (got {settings.ranks}, {settings.bench_steps})")
    rrdb_config, sr_config = settings.configs()
    load_config(rrdb_config, settings.stage_overrides(settings.rrdb_steps))
    cfg = load_config(sr_config, settings.stage_overrides(settings.steps))
    try:
        resolve_sampler(settings.bench_sampler, settings.bench_steps, cfg.model.timesteps)
    except ValueError as exc:
        raise UserError(f"--bench-sampler: {exc}") from None


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def launch(config: Path, overrides: list[str], ranks: int, run_dir: Path) -> None:
    if launch_training(config, overrides, ranks, run_dir) != 0:
        raise DemoError(f"training with {config} failed (see the output above)")


def run_demo(settings: DemoSettings) -> Path:
    """Run every stage; returns the benchmark output folder."""
    from samdiffsr.config import load_config
    from samdiffsr.demo import report
    from samdiffsr.demo.photos import run_demo as make_demo_shards
    from samdiffsr.evaluation.benchmark_cli import main as benchmark_main

    start = time.perf_counter()
    work, shards_dir = Path(settings.workdir), Path(settings.shards)
    rrdb_run, sr_run = settings.run_dirs()
    rrdb_config, sr_config = settings.configs()
    data = [f"data.train_shards={shards_dir / 'train'}", f"data.val_shards={shards_dir / 'val'}"]

    _banner("1/5 demo shards: built-in photos -> Felzenszwalb masks -> SPE -> WebDataset tars")
    code = make_demo_shards(shards_dir)
    if code not in (0, 1):
        raise DemoError(f"make_shards failed with exit status {code}")

    _banner("2/5 RRDB pretraining (the LR encoder), data-parallel")
    rrdb = [*data, *settings.stage_overrides(settings.rrdb_steps)]
    launch(rrdb_config, rrdb, settings.ranks, rrdb_run)

    _banner("3/5 SAM-DiffSR: modulated-diffusion training on the frozen RRDB, data-parallel")
    rrdb_weights = rrdb_run / "weights" / "latest.pt"
    sr = [*data, f"train.rrdb_ckpt={rrdb_weights}", *settings.stage_overrides(settings.steps)]
    print(f"{sr_config.name} {report.recipe(load_config(sr_config, sr))}", flush=True)
    launch(sr_config, sr, settings.ranks, sr_run)

    # The paper's 100-step chain on whole photos takes minutes per image on a CPU; the demo samples with
    # fewer network calls (benchmark.py without --sampler/--steps runs the full chain).
    sampler = f"{settings.bench_sampler}, {settings.bench_steps} steps, eta {settings.bench_eta:g}"
    _banner(f"4/5 benchmark: every checkpoint vs bicubic on the held-out images ({sampler})")
    # One folder per sampler setting: a rerun with another --bench-* resumes nothing it should not.
    out = sr_run / f"benchmark-{settings.bench_sampler}{settings.bench_steps}-eta{settings.bench_eta:g}"
    argv = ["--run", str(sr_run), "--ckpts", "all", "--sets", f"demo_val={shards_dir / 'val'}",
            "--metrics", "psnr_y,ssim_y,psnr_y_paper,ssim_y_paper", "--out", str(out), "--save-images",
            "--sampler", settings.bench_sampler, "--steps", str(settings.bench_steps),
            "--eta", str(settings.bench_eta)]
    if benchmark_main(argv) != 0:
        raise DemoError("the benchmark sweep failed (see the output above)")

    _banner("5/5 bicubic, the RRDB alone and SAM-DiffSR side by side; comparison picture")
    summary, picture = summarize(sr_run, rrdb_weights, shards_dir / "val", out, sampler)
    print(f"({time.perf_counter() - start:.0f} s in all)\n")
    print(summary)
    if not settings.long and "not beaten" in summary:
        print("to go further: python launcher/demo.py --long trains five times longer (about 45 minutes on 2 "
              "Intel Xeon cores, longer on AMD EPYC ones); on the earlier 2-photo held-out set it beat bicubic "
              "in both metrics (bench/RESULTS.md, 'Demo learning curves')")
    print(f"\ntable:       {out / 'demo.md'}  (every checkpoint: {out / 'results.md'})\n"
          f"picture:     {picture}\n"
          f"per image:   {out / 'results.csv'}  {out / 'results.json'}\n"
          f"plots:       {', '.join(str(p) for p in sorted(out.glob('*.png')) if p != picture)}\n"
          f"weights:     {sr_run / 'weights'}  (python launcher/infer.py --ckpt {sr_run / 'weights' / 'latest.pt'}"
          f" --img-dir LR --save-dir SR --sampler {settings.bench_sampler} --steps {settings.bench_steps}"
          f" --eta {settings.bench_eta:g})\n"
          f"TensorBoard: tensorboard --logdir {work}   (curves, and LR / bicubic / SR / HR images)")
    return out


def summarize(sr_run: Path, rrdb_weights: Path, val: Path, out: Path, sampler: str) -> tuple[str, Path]:
    """The three rows, the paired differences and the verdict (also written to ``out/demo.md``), and the
    comparison picture."""
    from samdiffsr.config import load_config
    from samdiffsr.data.pairs import load_share
    from samdiffsr.demo import report
    from samdiffsr.evaluation.results import ResultStore
    from samdiffsr.evaluation.sets import parse_set
    from samdiffsr.evaluation.tiling import lr_multiple
    from samdiffsr.images import read_image

    model = load_config(sr_run / "config.yaml").model
    scale = model.sr_scale
    _, pairs = load_share(parse_set(f"demo_val={val}"), scale, scale * lr_multiple(model))
    scores = report.checkpoint_scores(out / "results.csv")
    best = report.best_checkpoint(scores)
    results = ResultStore(out)
    per_image = {name: {key: rec["metrics"] for key, rec in results.records(name, "demo_val").items()}
                 for name in ("bicubic", best)}
    per_image["rrdb"] = report.per_image_metrics(
        report.rrdb_outputs(rrdb_weights, pairs, num_feat=model.rrdb_num_feat, num_block=model.rrdb_num_block,
                            growth=model.rrdb_growth, scale=scale), pairs, scale)
    label = f"SAM-DiffSR {best}"
    table = report.side_by_side([("bicubic", scores["bicubic"]),
                                 ("RRDB alone (regression)", report.mean_metrics(per_image["rrdb"])),
                                 (f"{label} ({sampler})", scores[best])])
    vs_bicubic = report.paired_differences(per_image[best], per_image["bicubic"])
    vs_rrdb = report.paired_differences(per_image[best], per_image["rrdb"])
    lines = [report.recipe(load_config(sr_run / "config.yaml")), report.difference_line(label, "bicubic", vs_bicubic),
             report.difference_line(label, "RRDB alone", vs_rrdb), report.verdict(vs_bicubic)]
    text = table + "\n\n" + "\n".join(lines)
    (out / "demo.md").write_text(text + "\n")
    srs = [read_image(out / "images" / best / "demo_val" / f"{p.key}.png")[0] for p in pairs]
    shown = pairs[:4]  # a picture of every held-out image would be too tall to read
    picture = report.comparison_picture(out / "comparison.png", shown, srs[:len(shown)], label, scale, size=48)
    return text, picture


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="train longer (configs/demo*_long.yaml): under an "
                        "hour on 2 CPU cores instead of about 10 minutes (default: the short demo)")
    parser.add_argument("--workdir", default="runs", help="where the demo's runs go (default: runs/)")
    parser.add_argument("--shards", default="shards/demo", help="where the demo shards go (default: shards/demo)")
    parser.add_argument("--ranks", type=int, default=2, help="data-parallel processes, GPUs or CPU ranks "
                        "(default: 2)")
    parser.add_argument("--rrdb-steps", type=int, default=None, help="RRDB pretraining steps (default: "
                        "train.max_steps of configs/demo_rrdb.yaml, 800; --long 2000)")
    parser.add_argument("--steps", type=int, default=None, help="diffusion training steps (default: "
                        "train.max_steps of configs/demo.yaml, 900; --long 4500)")
    parser.add_argument("--ckpt-every", type=int, default=None, help="checkpoint (and benchmark) interval "
                        "(default: train.ckpt_every of the configs)")
    parser.add_argument("--bench-sampler", default="ddim", help="sampler of the demo's benchmark: ddpm, ddim "
                        "or dpmpp_2m (default: ddim)")
    parser.add_argument("--bench-steps", type=int, default=10, help="sampler steps in the demo's benchmark "
                        "(default: 10)")
    parser.add_argument("--bench-eta", type=float, default=1.0, help="DDIM eta of the benchmark sampler "
                        "(default: 1, respaced ancestral sampling)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for both runs "
                        "(default: none)")
    return run_cli("demo", lambda: _run_demo_cli(parser.parse_args(argv)))


def _run_demo_cli(args: argparse.Namespace) -> int:
    settings = DemoSettings(args.workdir, args.shards, args.ranks, args.long, args.rrdb_steps, args.steps,
                            args.ckpt_every, tuple(args.overrides), args.bench_sampler, args.bench_steps,
                            args.bench_eta)
    check_settings(settings)
    run_demo(settings)
    return EXIT_OK
