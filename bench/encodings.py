"""Shard encodings compared on the demo tiles: bytes per sample and CPU ms per decoded sample, in one process.

Each candidate encodes every tile's fields, decodes them back (checked bit-exact), and is timed by CPU time
(``time.process_time``: this process, all threads) over all tiles; rounds are interleaved and the best of each
candidate is kept. Field candidates: HR/LR as ``.npy`` (format 1), zlib / zstd-compressed ``.npy`` (zstd at
several levels), PNG and lossless WebP (Pillow); the label map as uint16 / uint8 ``.npy``, run-length encoded,
zstd-compressed or PNG. Whole-sample rows use the reader itself (`samdiffsr.data.reader`) for formats 1 and 2
and add the tar headers; the node arithmetic turns them into GB/s from storage and cores to decode.

    python bench/encodings.py                                    # the demo tiles (shards/demo/train, made if absent)
    python bench/encodings.py --shards shards/df2k4x/train --max-tiles 500 --crops 1 4
"""

from __future__ import annotations

import argparse
import datetime
import io
import platform
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zstandard
from PIL import Image
from results_file import cpu_name, write_section  # bench/results_file.py

from samdiffsr.data.reader import decode_sample, encode_arrays, field_array, npy_bytes
from samdiffsr.data.shardlist import expand_shards
from samdiffsr.data.tarread import read_shard

Codec = tuple[Callable[[np.ndarray], bytes], Callable[[bytes], np.ndarray]]
_ZD = zstandard.ZstdDecompressor()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


def zstd_codec(level: int, dtype=None) -> Codec:
    coder = zstandard.ZstdCompressor(level=level, write_checksum=True)
    cast = (lambda a: a.astype(dtype)) if dtype else (lambda a: a)
    return lambda a: coder.compress(npy_bytes(cast(a))), lambda d: npy_load(_ZD.decompress(d))


def pillow_codec(fmt: str, gray: bool = False, **options) -> Codec:
    def encode(a: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(a.astype(np.uint8) if gray else a).save(out, format=fmt, **options)
        return out.getvalue()

    def decode(d: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(d)) as img:
            return np.asarray(img)

    return encode, decode


def rle_encode(a: np.ndarray) -> bytes:
    """Raster-order runs: the shape, one value per run (uint8) and each run's length (uint32), as .npy."""
    flat = a.ravel()
    starts = np.r_[0, np.flatnonzero(np.diff(flat)) + 1]
    lengths = np.diff(np.r_[starts, flat.size]).astype(np.uint32)
    return npy_bytes(np.array(a.shape, np.uint32)) + npy_bytes(flat[starts].astype(np.uint8)) + npy_bytes(lengths)


def rle_decode(d: bytes) -> np.ndarray:
    stream = io.BytesIO(d)
    shape, values, lengths = np.load(stream), np.load(stream), np.load(stream)
    return np.repeat(values, lengths).reshape(tuple(shape))


IMAGE_CODECS: dict[str, Codec] = {
    "npy (format 1)": (npy_bytes, npy_load),
    "npy + zlib 1": (lambda a: zlib.compress(npy_bytes(a), 1), lambda d: npy_load(zlib.decompress(d))),
    "npy + zstd 1": zstd_codec(1),
    "npy + zstd 3 (format 2)": zstd_codec(3),
    "npy + zstd 9": zstd_codec(9),
    "npy + zstd 19": zstd_codec(19),
    "PNG (Pillow, level 6)": pillow_codec("PNG"),
    "PNG (Pillow, level 1)": pillow_codec("PNG", compress_level=1),
    "WebP lossless (method 4)": pillow_codec("WEBP", lossless=True),
    "WebP lossless (method 0)": pillow_codec("WEBP", lossless=True, method=0, quality=0),
}
LABEL_CODECS: dict[str, Codec] = {
    "uint16 npy (format 1)": (lambda a: npy_bytes(a.astype(np.uint16)), npy_load),
    "uint8 npy": (lambda a: npy_bytes(a.astype(np.uint8)), npy_load),
    "uint8 RLE": (rle_encode, rle_decode),
    "uint16 + zstd 3": zstd_codec(3, np.uint16),
    "uint8 + zstd 3 (format 2)": zstd_codec(3, np.uint8),
    "uint8 PNG": pillow_codec("PNG", gray=True),
}


def load_tiles(shards: str | None, max_tiles: int) -> tuple[list[dict], str]:
    """Raw samples of the shards (default: the demo's training shards, built in a temporary folder if absent)."""
    if shards is None:
        demo = Path("shards/demo/train")
        if not demo.is_dir():
            from samdiffsr.demo.photos import run_demo

            root = Path(tempfile.mkdtemp(prefix="encodings-"))
            run_demo(root, progress=False)
            demo = root / "train"
        shards = str(demo)
    raws = [raw for url in expand_shards(shards) for raw in read_shard(url)][:max_tiles]
    return raws, shards


def field_arrays(raw: dict) -> dict[str, np.ndarray]:
    """hr, lr, labels and values of a raw sample (any format), as writable copies."""
    return {"hr": np.array(field_array(raw, "hr")), "lr": np.array(field_array(raw, "lr")),
            "seg": np.array(field_array(raw, "seg")), "segval": np.array(field_array(raw, "segval"))}


def cpu_ms(fn: Callable[[], object], n: int) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1e3 / n


def field_rows(tiles: list[dict], rounds: int) -> list[tuple]:
    """(field, codec, KB per sample, ratio vs format 1, decode ms, encode ms) for every field candidate."""
    jobs = [(f, name, codec) for f in ("hr", "lr") for name, codec in IMAGE_CODECS.items()]
    jobs += [("seg", name, codec) for name, codec in LABEL_CODECS.items()]
    encoded, enc_ms, dec_ms = {}, {}, {}
    for f, name, (encode, decode) in jobs:
        start = time.process_time()
        encoded[f, name] = [encode(t[f]) for t in tiles]
        enc_ms[f, name] = (time.process_time() - start) * 1e3 / len(tiles)
        back = [decode(d) for d in encoded[f, name]]
        if not all(np.array_equal(b, t[f]) for b, t in zip(back, tiles, strict=True)):
            sys.exit(f"encodings: {name} is not bit-exact on {f}")
    for _ in range(rounds):
        for f, name, (_, decode) in jobs:
            ms = cpu_ms(lambda: [decode(d) for d in encoded[f, name]], len(tiles))  # noqa: B023
            dec_ms[f, name] = min(dec_ms.get((f, name), ms), ms)
    rows, base = [], {}
    for f, name, _ in jobs:
        kb = float(np.mean([len(d) for d in encoded[f, name]])) / 1e3
        base.setdefault(f, kb)
        rows.append((f, name, kb, base[f] / kb, dec_ms[f, name], enc_ms[f, name]))
    return rows


def _image_scheme(codec: Codec) -> Codec:
    """HR/LR by ``codec``, labels uint8 + zstd (format 2's), as a whole sample: encode -> fields, decode -> mask."""
    encode, decode = codec

    def enc(t: dict) -> dict:
        return {"hr": encode(t["hr"]), "lr": encode(t["lr"]), "seg.npy.zst": LABEL_CODECS[
            "uint8 + zstd 3 (format 2)"][0](t["seg"]), "segval.npy": npy_bytes(t["segval"]), "json": t["json"]}

    def dec(raw: dict) -> dict:
        labels = npy_load(_ZD.decompress(raw["seg.npy.zst"]))
        return {"hr": decode(raw["hr"]), "lr": decode(raw["lr"]),
                "mask": np.take(npy_load(raw["segval.npy"]), labels)}

    return enc, dec


SCHEMES: dict[str, Codec] = {
    "format 1: npy, uint16 labels (today)": (
        lambda t: {**encode_arrays(t["hr"], t["lr"], t["seg"], t["segval"], "npy"), "json": t["json"]},
        decode_sample),
    "format 2: zstd 3 npy, uint8 labels (default)": (
        lambda t: {**encode_arrays(t["hr"], t["lr"], t["seg"], t["segval"], "zstd"), "json": t["json"]},
        decode_sample),
    "PNG HR/LR, zstd labels": _image_scheme(IMAGE_CODECS["PNG (Pillow, level 6)"]),
    "WebP lossless HR/LR, zstd labels": _image_scheme(IMAGE_CODECS["WebP lossless (method 4)"]),
}


def tar_bytes(fields: dict) -> int:
    """A sample's bytes in a tar: a 512-byte header per field plus its data padded to 512."""
    return sum(512 + -(-len(v) // 512) * 512 for k, v in fields.items() if not k.startswith("_"))


def scheme_rows(tiles: list[dict], rounds: int) -> list[tuple]:
    """(scheme, MB per sample in the tar, decode ms per sample incl. the float32 mask) for each scheme."""
    encoded = {name: [enc(t) for t in tiles] for name, (enc, _) in SCHEMES.items()}
    for name, (_, dec) in SCHEMES.items():
        for raw, t in zip(encoded[name], tiles, strict=True):
            got = dec(raw)
            assert np.array_equal(got["hr"], t["hr"]) and np.array_equal(got["mask"], t["segval"][t["seg"]]), name
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, (_, dec) in SCHEMES.items():
            ms = cpu_ms(lambda: [dec(r) for r in encoded[name]], len(tiles))  # noqa: B023
            best[name] = min(best.get(name, ms), ms)
    return [(name, float(np.mean([tar_bytes(r) for r in encoded[name]])) / 1e6, best[name]) for name in SCHEMES]


def node_rows(schemes: list[tuple], gpus: int, per_gpu: float, crops: list[int], k: float) -> list[tuple]:
    """(scheme, crops per tile, tiles/s, GB/s from storage, cores to decode) for one node of ``gpus`` GPUs,
    bytes and decode time scaled by ``k`` (full 320 tiles / the measured mean tile, by pixel count)."""
    rows = []
    for c in crops:
        tiles_s = gpus * per_gpu / c
        rows += [(name, c, tiles_s, tiles_s * mb * k / 1e3, tiles_s * ms * k / 1e3) for name, mb, ms in schemes]
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, align, *rows])


def report(args, tiles: list[dict], shards: str, fields: list[tuple], schemes: list[tuple]) -> str:
    base = schemes[0]
    pixels = float(np.mean([t["hr"].shape[0] * t["hr"].shape[1] for t in tiles]))
    segments = max(int(t["segval"].size) for t in tiles)
    command = " ".join(["python bench/encodings.py", *sys.argv[1:]])
    text = [f"`{command}` — {datetime.date.today()}, {cpu_name()}, Python {platform.python_version()}, "
            f"numpy {np.__version__}, "
            f"Pillow {Image.__version__}, zstandard {zstandard.__version__}; {len(tiles)} tiles of `{shards}` "
            f"(mean {pixels / 1e3:.1f} k HR pixels, i.e. {pixels / 320 ** 2:.2f} of a 320 tile; at most {segments} "
            f"mask labels, so uint8 labels apply); CPU time, best of {args.rounds} interleaved rounds; every "
            "candidate decodes bit-exact.", "",
            "Per field (KB per sample, `x smaller` against the format-1 row of that field):", "",
            markdown(["field", "encoding", "KB/sample", "x smaller", "decode ms", "encode ms"],
                     [[f, n, f"{kb:.1f}", f"{r:.1f}", f"{d:.3f}", f"{e:.2f}"] for f, n, kb, r, d, e in fields]),
            "", "Whole samples (tar headers and the JSON included; decode = `decode_sample`, float32 mask "
            "included, or its equivalent):", "",
            markdown(["scheme", "MB/sample", "x smaller", "decode ms/sample", "vs format 1"],
                     [[n, f"{mb:.3f}", f"{base[1] / mb:.2f}", f"{ms:.3f}", f"{ms / base[2]:.2f}x"]
                      for n, mb, ms in schemes]),
            "", f"One node of {args.gpus} GPUs at {args.per_gpu:g} samples/s each (crops/s), for full 320 tiles "
            f"(the rows above scaled by pixels, x{320 ** 2 / pixels:.2f}), decoding only (crop, augment and collate "
            "come on top: bench/stream.py):", "",
            markdown(["scheme", "crops/tile", "tiles/s", "MB/tile", "GB/s from storage", "cores to decode"],
                     [[n, str(c), f"{t:.0f}", f"{gb * 1e3 / t:.3f}", f"{gb:.2f}", f"{cores:.1f}"]
                      for n, c, t, gb, cores in node_rows(schemes, args.gpus, args.per_gpu, args.crops,
                                                          320 ** 2 / pixels)])]
    return "\n".join(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shards to take tiles from (default: the demo's, made if absent)")
    p.add_argument("--max-tiles", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; best kept")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--per-gpu", type=float, default=2250.0,
                   help="training samples/s per GPU (bench/RESULTS.md, 'stream': an H100 bf16 estimate)")
    p.add_argument("--crops", type=int, nargs="+", default=[1, 4], help="crops per tile for the node rows")
    p.add_argument("--results", default=str(Path(__file__).with_name("RESULTS.md")))
    p.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = p.parse_args()
    raws, shards = load_tiles(args.shards, args.max_tiles)
    tiles = [{**field_arrays(r), "json": r["json"]} for r in raws if field_array(r, "seg") is not None]
    if not tiles:
        sys.exit(f"encodings: no tile with a mask in {shards}")
    fields = field_rows(tiles, args.rounds)
    schemes = scheme_rows(tiles, args.rounds)
    text = report(args, tiles, shards, fields, schemes)
    print(text)
    if not args.no_write:
        write_section(Path(args.results), "encodings", text)


if __name__ == "__main__":
    main()
