"""make_shards end to end on real photos: content, determinism, parts, resume after a crash, bad inputs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from samdiffsr.data.reader import decode_sample, field_array, read_samples
from samdiffsr.data.tarread import read_shard
from samdiffsr.demo.photos import DEMO_TRAIN, DEMO_VAL, run_demo
from samdiffsr.images import load_image
from samdiffsr.imresize import imresize
from samdiffsr.masks.classical import FelzenszwalbMasker
from samdiffsr.masks.rle import masks_to_records, read_mask_json, write_mask_json
from samdiffsr.masks.spe import spe_map
from samdiffsr.sharding.cli import main
from samdiffsr.sharding.samples import ImageJob, MaskSource, SampleMaker, sample_key
from samdiffsr.sharding.tiles import TileSpec

REPO = Path(__file__).resolve().parents[1]
PHOTOS = {"astronaut.png": "astronaut", "chelsea.png": "chelsea", "rocket.png": "rocket",
          "sub/coffee.png": "coffee", "sub/deeper/immuno.png": "immunohistochemistry"}
TILING = ["--scale", "4", "--tile", "128", "--thresh", "64", "--step", "128"]


def shard_args(images, out, *extra):
    return ["--images", str(images), "--out", str(out), *TILING, "--max-count", "7", "--no-progress", *extra]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def samples_of(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return list(read_samples([str(out / s["name"]) for s in manifest["shards"]]))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for rel, name in PHOTOS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(skimage.data, name)()).save(root / rel)
    (root / "README.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def reference(photos, tmp_path_factory):
    """One uninterrupted single-process run with the Felzenszwalb masker, which also fills the mask cache."""
    base = tmp_path_factory.mktemp("reference")
    out, masks = base / "out", base / "masks"
    code = main(shard_args(photos, out, "--masker", "felzenszwalb", "--masks", str(masks), "--workers", "1"))
    assert code == 0
    return out, masks


def expected_tiles(photos: Path, masks: Path) -> dict[str, dict]:
    """Every tile computed independently: whole-image MATLAB LR and SPE map, cropped at the tile position."""
    out = {}
    for rel in PHOTOS:
        image = load_image(photos / rel)
        h, w = image.shape[0] // 4 * 4, image.shape[1] // 4 * 4
        hr = image[:h, :w]
        lr = imresize(hr, 0.25)
        spe = spe_map(read_mask_json(masks / Path(rel).with_suffix(".json"), image.shape[:2])[:, :h, :w])
        for y in range(0, h - 64, 128):
            for x in range(0, w - 64, 128):
                out[sample_key(rel, y, x)] = {
                    "hr": hr[y : y + 128, x : x + 128], "lr": lr[y // 4 : y // 4 + 32, x // 4 : x // 4 + 32],
                    "mask": spe[y : y + 128, x : x + 128], "source": rel, "pos": [y, x], "size": [h, w]}
    return out


def test_reference_run_content_is_exact(photos, reference):
    out, masks = reference
    expected = expected_tiles(photos, masks)
    samples = samples_of(out)
    keys = [s["key"] for s in samples]
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == set(expected)
    assert all("." not in k for k in keys)
    for s in samples:
        e = expected[s["key"]]
        assert np.array_equal(s["hr"], e["hr"]) and np.array_equal(s["lr"], e["lr"])
        assert s["mask"].dtype == np.float32 and np.array_equal(s["mask"], e["mask"])
        meta = s["meta"]
        assert (meta["source"], meta["pos"], meta["image_size"]) == (e["source"], e["pos"], e["size"])
        assert meta["masker"] == "felzenszwalb" and meta["scale"] == 4 and meta["num_masks"] > 0
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == len(expected) and max(sizes.values()) == 7
    assert sorted(sizes) == [f"train-{i:06d}.tar" for i in range(len(sizes))]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == len(expected) and manifest["settings"]["masks"]["kind"] == "felzenszwalb"
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] and report["skipped"] == [] and report["ignored"] == ["README.txt"]


def test_json_ingest_with_workers_gives_identical_shards(photos, reference, tmp_path):
    ref_out, masks = reference
    out = tmp_path / "out"
    assert main(shard_args(photos, out, "--masks", str(masks), "--workers", "2")) == 0
    assert shard_bytes(out) == shard_bytes(ref_out)  # same samples, same order, same bytes
    assert json.loads((out / "manifest.json").read_text())["settings"]["masks"] == {"kind": "json"}


def test_parts_are_merged_when_all_are_done(photos, reference, tmp_path, capsys):
    ref_out, masks = reference
    out = tmp_path / "out"
    for part in (2, 0):
        assert main(shard_args(photos, out, "--masks", str(masks), "--num-parts", "3", "--part", str(part))) == 0
        assert not (out / "sizes.json").exists()
    assert "waiting for parts [1]" in capsys.readouterr().out
    assert main(["--out", str(out), "--merge"]) == 3
    # a part run with other settings into the same folder is refused, saying which setting differs
    capsys.readouterr()
    assert main(shard_args(photos, out, "--masks", str(masks), "--num-parts", "3", "--part", "1",
                           "--scale", "2")) == 2
    err = capsys.readouterr().err
    assert "made with other settings (scale: 4 -> 2)" in err and str(out) in err, err
    assert not [p.name for p in (out / "parts").glob("part-001-*") if p.suffix != ".lock"]  # nothing of it written
    assert not (out / "sizes.json").exists()
    assert main(shard_args(photos, out, "--masks", str(masks), "--num-parts", "3", "--part", "1")) == 0
    sizes = json.loads((out / "sizes.json").read_text())
    assert all(name.startswith(("train-p000-", "train-p001-", "train-p002-")) for name in sizes)
    assert set(sizes) == {p.name for p in out.glob("*.tar")}
    merged = {s["key"]: s["hr"].tobytes() for s in samples_of(out)}
    single = {s["key"]: s["hr"].tobytes() for s in samples_of(ref_out)}
    assert merged == single and sum(sizes.values()) == len(single)
    assert main(["--out", str(out), "--merge"]) == 0


def test_stopped_run_resumes_to_the_same_shards(photos, reference, tmp_path):
    ref_out, masks = reference
    out = tmp_path / "out"
    assert main(shard_args(photos, out, "--masks", str(masks), "--stop-after", "2")) == 3
    partial = shard_bytes(out)
    assert 0 < len(partial) < len(shard_bytes(ref_out))
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    assert main(shard_args(photos, out, "--masks", str(masks), "--workers", "2")) == 0
    assert shard_bytes(out) == shard_bytes(ref_out)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert main(shard_args(photos, out, "--masks", str(masks))) == 0  # complete: nothing is rewritten
    assert before == {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}


def orphans(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (the killed run's workers, if still alive)."""
    found = []
    for proc_dir in Path("/proc").iterdir():
        if proc_dir.name.isdigit():
            try:
                if marker.encode() in (proc_dir / "cmdline").read_bytes():
                    found.append(int(proc_dir.name))
            except OSError:
                continue
    return found


def test_killed_run_resumes_without_duplicates_or_gaps(photos, reference, tmp_path):
    """SIGKILL a real run (2 workers, masks being made) after its first shard, then rerun."""
    ref_out, _ = reference
    out, masks = tmp_path / "out", tmp_path / "masks"
    args = shard_args(photos, out, "--masker", "felzenszwalb", "--masks", str(masks), "--workers", "2")
    proc = subprocess.Popen([sys.executable, str(REPO / "launcher" / "make_shards.py"), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "parts" / "part-000-of-001.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and b'"shard"' in journal.read_bytes():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "parts" / "part-000-of-001.json").exists()
    assert main(args) == 0
    deadline = time.time() + 30
    while orphans(str(out)) and time.time() < deadline:  # the killed run's workers notice and exit
        time.sleep(0.2)
    assert not orphans(str(out))
    assert shard_bytes(out) == shard_bytes(ref_out)
    keys = [s["key"] for s in samples_of(out)]
    assert len(keys) == len(set(keys)) == sum(json.loads((ref_out / "sizes.json").read_text()).values())


def test_bad_inputs_are_reported_and_good_files_sharded(tmp_path, capsys):
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    images.mkdir()
    photo = skimage.data.coffee()[:200, :260]
    gray = photo[..., 1]
    Image.fromarray(photo).save(images / "good.png")
    Image.fromarray(gray).save(images / "gray.png")
    Image.fromarray(np.dstack([photo, gray])).save(images / "rgba.png")
    Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE).save(images / "palette.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(images / "sixteen.png")  # Pillow writes I;16 PNG
    Image.fromarray(photo).convert("CMYK").save(images / "cmyk.jpg")
    Image.fromarray(photo[:60, :60]).save(images / "tiny.png")
    (images / "empty.png").write_bytes(b"")
    (images / "notes.png").write_text("this is text, not a picture")
    (images / "cut.png").write_bytes((images / "good.png").read_bytes()[:3000])
    for name in ("wrongsize", "corrupt", "nomask"):
        Image.fromarray(photo).save(images / f"{name}.png")
    masker = FelzenszwalbMasker()
    for name in ("good", "gray", "rgba", "palette", "sixteen", "tiny", "corrupt", "cmyk"):
        image = images / (f"{name}.jpg" if name == "cmyk" else f"{name}.png")
        write_mask_json(masks / f"{name}.json", masker(load_image(image)))
    write_mask_json(masks / "wrongsize.json", masks_to_records(np.ones((1, 100, 100), bool)))
    corrupt = json.loads((masks / "corrupt.json").read_text())
    corrupt[0]["segmentation"]["counts"] = corrupt[0]["segmentation"]["counts"][:-3]
    (masks / "corrupt.json").write_text(json.dumps(corrupt))

    code = main(["--images", str(images), "--out", str(out), "--masks", str(masks), "--scale", "4",
                 "--tile", "96", "--thresh", "64", "--no-progress", "--workers", "2"])
    assert code == 1
    report = json.loads((out / "report.json").read_text())
    reasons = {Path(e["file"]).name: e["reason"] for e in report["skipped"]}
    assert set(reasons) == {"tiny.png", "empty.png", "notes.png", "cut.png", "wrongsize.json",
                            "corrupt.json", "nomask.json"}
    assert "empty" in reasons["empty.png"]
    assert "too small" in reasons["tiny.png"] and "not an image" in reasons["notes.png"]
    assert "truncated" in reasons["cut.png"] and "differs" in reasons["wrongsize.json"]
    assert "corrupt" in reasons["corrupt.json"] and "missing" in reasons["nomask.json"]
    assert {e["image"] for e in report["converted"]} == {"gray.png", "rgba.png", "palette.png", "sixteen.png",
                                                         "cmyk.jpg"}
    sources = {s["meta"]["source"] for s in samples_of(out)}
    assert sources == {"good.png", "gray.png", "rgba.png", "palette.png", "sixteen.png", "cmyk.jpg"}
    printed = capsys.readouterr().out
    assert "7 skipped" in printed and "5 converted" in printed and "report.json" in printed
    assert ("  warning cmyk.jpg: CMYK without an ICC profile -> RGB by Pillow's formula (colours approximate)"
            in printed.splitlines())


def test_benchmark_mode_whole_images(photos, reference, tmp_path):
    _, masks = reference
    out = tmp_path / "bench"
    assert main(["--images", str(photos), "--out", str(out), "--benchmark", "--no-progress"]) == 0
    samples = samples_of(out)
    assert [s["meta"]["source"] for s in samples] == sorted(PHOTOS)
    assert sorted(p.name for p in out.glob("*.tar")) == ["test-000000.tar"]
    for s in samples:
        image = load_image(photos / s["meta"]["source"])
        hr = image[: image.shape[0] // 4 * 4, : image.shape[1] // 4 * 4]
        assert np.array_equal(s["hr"], hr) and np.array_equal(s["lr"], imresize(hr, 0.25))
        assert s["meta"]["masker"] == "none" and not s["mask"].any() and s["meta"]["whole_image"]
        assert s["key"] == sample_key(s["meta"]["source"])
    out2 = tmp_path / "bench_masks"
    assert main(["--images", str(photos), "--out", str(out2), "--benchmark", "--masks", str(masks),
                 "--no-progress", "--prefix", "set"]) == 0
    for s in samples_of(out2):
        rel = s["meta"]["source"]
        h, w = s["hr"].shape[:2]
        full = read_mask_json(masks / Path(rel).with_suffix(".json"))
        assert np.array_equal(s["mask"], spe_map(full[:, :h, :w]))


def test_tiny_sam_checkpoint_end_to_end(tmp_path):
    from tiny_sam import write_tiny_sam_checkpoint

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(skimage.data.chelsea()[:160, :224]).save(images / "cat.png")
    ckpt = write_tiny_sam_checkpoint(tmp_path / "tiny_sam.pth")
    out = tmp_path / "out"
    args = ["--images", str(images), "--out", str(out), "--sam-checkpoint", str(ckpt), "--sam-model-type",
            "vit_tiny", "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
            "--tile", "96", "--thresh", "48", "--no-progress"]
    assert main(args) == 0
    cached = out / "masks" / "cat.json"
    records = json.loads(cached.read_text())
    samples = samples_of(out)
    assert samples and all(s["meta"]["masker"] == "sam-vit_tiny" for s in samples)
    assert all(s["meta"]["num_masks"] == len(records) for s in samples)
    assert json.loads((out / "manifest.json").read_text())["settings"]["masks"]["generator"]["points_per_side"] == 4
    # a second dataset from the same cache: the JSON is read, not regenerated
    stamp = cached.stat().st_mtime_ns
    assert main([*args[:3], str(tmp_path / "out2"), *args[4:], "--masks", str(out / "masks")]) == 0
    assert cached.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("args, message", [
    ([], "choose a mask source: --masks DIR, --sam-checkpoint PATH, or --masker felzenszwalb|none"),
    (["--masker", "none", "--num-parts", "2", "--part", "2"], "--part must be in 0..1 (got 2)"),
    (["--masker", "none", "--images", "{tmp}/nope"], "image folder not found: {tmp}/nope"),
    (["--masker", "none", "--tile", "130"], "tile must be a positive multiple of the scale 4, got 130"),
    (["--sam-checkpoint", "{tmp}/x.pth"], "SAM checkpoint not found: {tmp}/x.pth"),
])
def test_command_line_errors(photos, tmp_path, capsys, args, message):
    # Exit status 2 (bad options) with the message that names the problem, and nothing written.
    out = tmp_path / "o"
    argv = ["--images", str(photos), "--out", str(out), *(a.format(tmp=tmp_path) for a in args)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message.format(tmp=tmp_path) in captured.err, captured.err
    assert "Traceback" not in captured.err and not out.exists()


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "--images" in capsys.readouterr().out


def test_demo_builds_train_and_val(tmp_path, capsys):
    assert run_demo(tmp_path / "demo", progress=False) == 0
    printed = capsys.readouterr().out
    assert "demo: 37 images" in printed  # 11 training parts, 26 held-out crops
    train = samples_of(tmp_path / "demo" / "train")
    assert len(train) == 42 and all(s["meta"]["masker"] == "felzenszwalb" for s in train)
    assert all(s["hr"].shape[0] > 160 and s["hr"].shape[1] > 160 for s in train)
    assert sorted(p.name for p in (tmp_path / "demo" / "train").glob("*.tar")) == [
        f"train-{i:06d}.tar" for i in range(5)]
    val = samples_of(tmp_path / "demo" / "val")
    assert sorted(s["meta"]["source"] for s in val) == sorted(
        f"{name}-{side}.png" for name in (*DEMO_TRAIN, *DEMO_VAL) for side in ("left", "right"))
    # No held-out crop is a training image, and the held-out photos are in no training image under any name
    # (skimage's "cat" is chelsea); tests/test_demo.py searches the training tiles for the crops' pixels.
    images = tmp_path / "demo" / "images"
    digest = {p.name: hashlib.sha256(load_image(p).tobytes()).hexdigest() for p in images.glob("*/*.png")}
    held_out = {digest[p.name] for p in (images / "val").glob("*.png")}
    assert len(held_out) == 26 and not held_out & {digest[p.name] for p in (images / "train").glob("*.png")}
    assert {s["meta"]["source"] for s in train}.isdisjoint({"chelsea.png", "coffee.png", "cat.png"})


def test_shards_are_format_2_and_format_1_holds_the_same_content(photos, reference):
    """The default encoding (zstd .npy.zst, uint8 labels under 256 masks) decodes to exactly what format 1
    (plain .npy, the encoding of earlier shards) holds for the same image."""
    out, masks = reference
    raws = [raw for tar in sorted(out.glob("*.tar")) for raw in read_shard(str(tar))]
    assert {tuple(sorted(k for k in raw if not k.startswith("__"))) for raw in raws} == \
        {("hr.npy.zst", "json", "lr.npy.zst", "seg.npy.zst", "segval.npy")}
    assert all(field_array(raw, "seg").dtype == np.uint8 for raw in raws)
    written = {raw["__key__"]: decode_sample(raw) for raw in raws}
    files = tuple(sorted(PHOTOS))
    for encoding in ("npy", "zstd"):
        job = ImageJob(images_dir=str(photos), files=files, spec=TileSpec(4, 128, 128, 64),
                       masks=MaskSource("json", str(masks)), encoding=encoding)
        samples = SampleMaker(job).process(files.index("rocket.png")).samples
        assert samples and all(f.endswith(".npy") == (encoding == "npy") for s in samples for f in s
                               if f[:2] in ("hr", "lr"))
        for sample in samples:
            got, want = decode_sample(sample), written[sample["__key__"]]
            assert all(np.array_equal(got[k], want[k]) for k in ("hr", "lr", "mask")) and got["meta"] == want["meta"]
    with pytest.raises(ValueError, match="unknown shard encoding 'png'"):
        ImageJob(images_dir=str(photos), files=files, spec=TileSpec(), masks=MaskSource(), encoding="png")

