"""Command line of ``make_shards``: argparse -> :func:`samdiffsr.sharding.job.make_shards`, or ``--merge``.

With no arguments the command builds the demo shards instead: the launcher and the console script enter
through :func:`samdiffsr.demo.photos.make_shards_command`, which sits above this package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samdiffsr.cli import ArgumentParser, run_cli
from samdiffsr.distributed import array_task_id
from samdiffsr.sharding.job import ShardError, ShardSettings, default_workers, make_shards, print_summary
from samdiffsr.sharding.manifest import StateError, merge_parts
from samdiffsr.sharding.samples import MaskSource
from samdiffsr.sharding.tiles import TileSpec
from samdiffsr.sharding.workers import WorkerError

AMG_HELP = {
    "points_per_side": "prompt points along one image side (points_per_side**2 prompts)",
    "points_per_batch": "prompt points run through the model at once (GPU memory vs speed)",
    "pred_iou_thresh": "keep masks whose predicted IoU (quality) is above this",
    "stability_score_thresh": "keep masks whose stability (IoU under cutoff shifts) is above this",
    "stability_score_offset": "cutoff shift used to compute the stability score",
    "box_nms_thresh": "box IoU above which duplicate masks are suppressed",
    "crop_n_layers": "if > 0, also segment crops: layer i has 2**i x 2**i crops",
    "crop_nms_thresh": "box IoU for suppressing duplicates between crops",
    "crop_overlap_ratio": "overlap of neighbouring crops, as a fraction of the crop size",
    "crop_n_points_downscale_factor": "points per side on crop layer i are divided by this**i",
    "min_mask_region_area": "if > 0, remove islands and holes smaller than this area (needs OpenCV)",
}
SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "KB": 10**3, "MB": 10**6, "GB": 10**9}

EPILOG = """\
mask sources (pick one for tile mode; benchmark mode defaults to no masks):
  --masks DIR                  read <DIR>/<image path>.json (SAM amg COCO-RLE); a missing JSON is a bad input
  --sam-checkpoint PATH        run SAM; JSONs are cached in --masks DIR (default <out>/masks) and reused
  --masker felzenszwalb        classical fallback (no weights), cached the same way; recorded in metadata
  --masker none                no mask data (the reader yields all-zero masks)

output (one dataset per --out folder):
  <prefix>-000000.tar ...      shards; <prefix>-p<i>-000000.tar ... when --num-parts > 1
  sizes.json manifest.json     sample counts / settings and shard list, merged when every part is done
  report.json                  skipped files with reasons, conversions, ignored files
  parts/                       per-part journals (resume) and manifests

exit status: 0 done; 1 done but bad inputs were skipped (see report.json); 2 bad options, or --out holds a
run with other settings; 3 not finished (--stop-after, or --merge with parts missing); 4 failed (rerun to
resume); 130 interrupted (rerun to resume).
"""


def parse_size(text: str) -> int:
    """``256M``, ``1.5G``, ``100000``, ``3e9`` -> bytes (decimal units)."""
    raw = text.strip().upper().replace("_", "")
    unit = next((u for u in sorted(SIZE_UNITS, key=len, reverse=True) if u and raw.endswith(u)), "")
    try:
        value = float(raw[: len(raw) - len(unit)] if unit else raw) * SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G, 100000)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="make_shards",
        description="Turn an image folder into SAM-DiffSR WebDataset shards: aligned HR / MATLAB-bicubic LR / "
        "SPE-mask tiles (or whole-image benchmark pairs). With no arguments: build the demo shards in "
        "shards/demo/ from scikit-image photos.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for add_arguments in (_input_arguments, _mask_arguments, _tiling_arguments, _run_arguments):
        add_arguments(parser)
    return parser


def _input_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input and output")
    group.add_argument("--images", metavar="DIR",
                       help="folder of HR images (png/jpg/bmp/tif/webp, searched recursively)")
    group.add_argument("--out", metavar="DIR",
                       help="output folder for the shards, manifests and report (one dataset per folder)")
    group.add_argument("--prefix", help="shard name prefix (default: 'train', or 'test' with --benchmark)")
    group.add_argument("--benchmark", action="store_true",
                       help="benchmark set: one whole-image sample per image (mod-cropped HR + MATLAB-bicubic LR), "
                       "no tiling, sorted order; masks only if a mask source is given")


def _mask_arguments(parser: argparse.ArgumentParser) -> None:
    from samdiffsr.masks.sam import AMG_DEFAULTS, MODEL_BUILDERS

    group = parser.add_argument_group("masks")
    group.add_argument("--masks", metavar="DIR",
                       help="folder of mask JSONs, <DIR>/<image path relative to --images, .json>; read-only unless "
                       "a masker is also chosen, then the cache it fills (default cache: <out>/masks)")
    group.add_argument("--masker", choices=("sam", "felzenszwalb", "json", "none"),
                       help="mask source: sam (needs --sam-checkpoint), felzenszwalb (classical, no weights), json "
                       "(only read --masks), none. Default: sam with --sam-checkpoint, json with --masks, none with "
                       "--benchmark; otherwise required")
    group.add_argument("--sam-checkpoint", metavar="PATH", help="local SAM checkpoint (.pth); implies --masker sam")
    group.add_argument("--sam-model-type", default="vit_h", choices=sorted(MODEL_BUILDERS),
                       help="SAM architecture of the checkpoint (default vit_h; vit_tiny is for tests)")
    group.add_argument("--sam-device", metavar="DEVICE",
                       help="torch device for SAM (default: cuda if available, else cpu)")
    amg = parser.add_argument_group("SAM automatic mask generator (defaults: segment-anything's, as in its amg.py)")
    for name, default in AMG_DEFAULTS.items():
        kind = int if isinstance(default, int) and not isinstance(default, bool) else float
        amg.add_argument("--" + name.replace("_", "-"), dest=f"amg_{name}", type=kind, default=None,
                         metavar="N" if kind is int else "X",
                         help=f"{AMG_HELP.get(name, name)} (default {default:g})")


def _tiling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tiling")
    group.add_argument("--scale", type=int, default=4, help="SR scale: HR is cropped to a multiple, LR = HR / scale "
                       "(default 4)")
    group.add_argument("--tile", type=int, default=320, help="HR tile size; LR tiles are tile/scale (default 320)")
    group.add_argument("--step", type=int, default=None, help="distance between tile starts (default: --tile)")
    group.add_argument("--thresh", type=int, default=160,
                       help="tiles start while start < size - thresh; edge tiles are cut short (default 160)")
    group.add_argument("--seed", type=int, default=0,
                       help="shuffle the sorted image list with this seed before splitting (mixes sources across "
                       "shards, balances parts); -1 keeps sorted order (default 0)")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("shards and parallelism")
    group.add_argument("--max-count", type=int, default=512, help="samples per shard at most (default 512)")
    group.add_argument("--max-size", type=parse_size, default=256_000_000,
                       help="bytes per shard at most, e.g. 256M or 1G (default 256M)")
    group.add_argument("--workers", type=int, default=0,
                       help="worker processes (default: cores up to 8; 1 with SAM, each worker loads its own model)")
    group.add_argument("--num-parts", type=int, default=1,
                       help="split the ordered image list into P contiguous parts (cluster job arrays)")
    group.add_argument("--part", type=int, default=None,
                       help="which part this run writes, 0..P-1 (default: $SLURM_ARRAY_TASK_ID when P > 1, else 0)")
    group = parser.add_argument_group("resume and control")
    group.add_argument("--merge", action="store_true",
                       help="only merge the part manifests in --out into sizes.json / manifest.json / report.json")
    group.add_argument("--overwrite", action="store_true",
                       help="delete this part's shards and journal in --out first, instead of resuming")
    group.add_argument("--stop-after", type=int, metavar="N",
                       help="stop after N images as if interrupted (the open shard is discarded; rerun to resume)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def _mask_source(args, parser) -> MaskSource:
    kind = args.masker or ("sam" if args.sam_checkpoint else "json" if args.masks else
                           "none" if args.benchmark else None)
    if kind is None:
        parser.error("choose a mask source: --masks DIR, --sam-checkpoint PATH, or --masker felzenszwalb|none")
    if kind == "sam" and not args.sam_checkpoint:
        parser.error("--masker sam needs --sam-checkpoint PATH")
    if kind == "json" and not args.masks:
        parser.error("--masker json needs --masks DIR")
    if args.sam_checkpoint and kind != "sam":
        parser.error(f"--sam-checkpoint given but --masker is {kind}")
    if kind == "sam" and not Path(args.sam_checkpoint).is_file():
        from samdiffsr.masks.sam import where_to_get  # the official file name and where it is published

        hint = where_to_get(args.sam_model_type)
        parser.error(f"SAM checkpoint not found: {args.sam_checkpoint}" + (f"; {hint}" if hint else ""))
    if kind == "json" and not Path(args.masks).is_dir():
        parser.error(f"mask folder not found: {args.masks}")
    masks_dir = args.masks or (str(Path(args.out) / "masks") if kind in ("sam", "felzenszwalb") else None)
    generator = tuple(sorted((k[4:], v) for k, v in vars(args).items() if k.startswith("amg_") and v is not None))
    return MaskSource(kind=kind, masks_dir=str(Path(masks_dir).resolve()) if masks_dir else None,
                      sam_checkpoint=str(Path(args.sam_checkpoint).resolve()) if args.sam_checkpoint else None,
                      sam_model_type=args.sam_model_type, sam_device=args.sam_device, generator=generator)


def settings_from_args(argv: list[str]) -> tuple[argparse.Namespace, ShardSettings | None]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out is required")
    if args.merge:
        return args, None
    if not args.images:
        parser.error("--images is required")
    part = args.part
    if part is None:
        part = array_task_id() if args.num_parts > 1 else 0
    if args.num_parts < 1 or not 0 <= part < args.num_parts:
        parser.error(f"--part must be in 0..{args.num_parts - 1} (got {part}) and --num-parts >= 1")
    try:
        spec = TileSpec(scale=args.scale, tile=args.tile, step=args.step, thresh=args.thresh)
    except ValueError as err:
        parser.error(str(err))
    if args.max_count < 1 or (args.stop_after is not None and args.stop_after < 0) or args.workers < 0:
        parser.error("--max-count must be >= 1, --stop-after and --workers >= 0")
    masks = _mask_source(args, parser)
    return args, ShardSettings(
        images=args.images, out=args.out, masks=masks, spec=spec, benchmark=args.benchmark, prefix=args.prefix,
        max_count=args.max_count, max_size=args.max_size, workers=args.workers or default_workers(masks),
        num_parts=args.num_parts, part=part, seed=args.seed, stop_after=args.stop_after,
        overwrite=args.overwrite, progress=not args.no_progress,
    )


def run_settings(settings: ShardSettings) -> int:
    try:
        summary = make_shards(settings)
    except (ShardError, StateError, FileNotFoundError, NotADirectoryError) as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    except WorkerError as err:
        print(f"make_shards: failed: {err}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("make_shards: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print_summary(summary)
    return summary.exit_code


def run(argv: list[str]) -> int:
    """``make_shards ARGS``: shard, or merge with ``--merge``. Returns the exit code."""
    try:
        args, settings = settings_from_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    return run_merge(args.out) if settings is None else run_settings(settings)


def run_merge(out: str) -> int:
    """Merge the part manifests in ``out`` (``--merge``); 3 while parts are missing."""
    try:
        merged = merge_parts(out)
    except StateError as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    if merged.missing:
        print(f"make_shards: cannot merge {out}: parts {merged.missing[:20]} are not finished")
        return 3
    manifest = merged.manifest
    print(f"{out}: merged {len(manifest['parts'])} parts: {manifest['images']['found']} images, "
          f"{manifest['num_samples']} samples, {manifest['num_shards']} shards")
    return 1 if merged.report["skipped"] else 0


def main(argv: list[str] | None = None) -> int:
    """The ``make_shards`` command line (see ``--help``); returns the exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    return run_cli("make_shards", lambda: run(args))
