"""results.html: a real sweep's page rendered in headless Chromium (no broken image, not blank), and its crops.

Chromium: Debian's ``chromium`` package. Without it the browser tests skip, unless SAMDIFFSR_REQUIRE_CHROMIUM=1
(CI), where a missing browser fails. SAMDIFFSR_SCREENSHOT_DIR=folder keeps a copy of the screenshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_benchmark import make_run, make_sets, photo_hr

from samdiffsr.evaluation import metrics
from samdiffsr.evaluation.benchmark_cli import main
from samdiffsr.evaluation.crops import THUMB, crop_box, crop_folder, read_crop, save_crops
from samdiffsr.evaluation.html_report import comparison_strip
from samdiffsr.imresize import imresize

# Waits for every <img> (lazy ones switched to eager), then writes what loaded into the DOM for --dump-dom.
CHECK_SCRIPT = """<script>
addEventListener('load', async () => {
  const imgs = Array.from(document.images);
  for (const img of imgs) img.loading = 'eager';
  await Promise.all(imgs.map(img => img.complete ? null : new Promise(done => {
    img.addEventListener('load', done); img.addEventListener('error', done); })));
  const broken = imgs.filter(img => !(img.naturalWidth > 0)).map(img => img.getAttribute('src'));
  const out = document.createElement('pre');
  out.id = 'imgcheck';
  out.textContent = JSON.stringify({total: imgs.length, broken: broken});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("SAMDIFFSR_REQUIRE_CHROMIUM") == "1":
        pytest.fail("SAMDIFFSR_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install -y chromium)")
    pytest.skip("no chromium on PATH (apt-get install -y chromium; SAMDIFFSR_REQUIRE_CHROMIUM=1 makes this fail)")


def run_chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chromium-profile'}",
           "--virtual-time-budget=30000", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def image_check(page: Path, tmp: Path) -> dict:
    """Load a copy of ``page`` (same folder: same relative links) with CHECK_SCRIPT; {'total', 'broken'}."""
    probe = page.with_name(page.stem + ".check.html")
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    try:
        dom = run_chromium(tmp, "--dump-dom", probe.as_uri()).stdout
    finally:
        probe.unlink()
    found = re.search(r'<pre id="imgcheck">(.*?)</pre>', dom, re.S)
    assert found, f"the check script wrote nothing: {dom[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def is_blank(png: Path) -> bool:
    """A screenshot with (almost) nothing on it: under 2% of pixels off the background, or under 50 colours."""
    img = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    background = np.median(img, axis=0)
    off = np.abs(img.astype(int) - background).sum(axis=1) > 30
    return off.mean() < 0.02 or len(np.unique(img, axis=0)) < 50


@pytest.fixture(scope="module")
def sweep_page(tmp_path_factory):
    """A real sweep (bicubic + one checkpoint of a tiny model, 3 photos) with its crops and results.html."""
    root = tmp_path_factory.mktemp("html")
    run = make_run(root, steps=(100,))
    folder, _ = make_sets(root)
    out = root / "out"
    assert main(["--run", str(run), "--sets", f"Photos={folder}", "--out", str(out), "--metrics", "psnr_y",
                 "--seed", "1", "--quiet", "--html-crops", "--crop-size", "32"]) == 0
    return out


def test_page_holds_table_plots_and_a_crop_strip_per_image(sweep_page):
    page = (sweep_page / "results.html").read_text()
    data = json.loads((sweep_page / "results.json").read_text())
    assert "<table>" in page and "<td>step00000100</td><td>100</td>" in page
    assert 'src="plot_psnr_y.png"' in page
    keys = [r["key"] for r in data["per_image"] if r["checkpoint"] == "bicubic"]
    assert keys == ["astronaut", "chelsea", "coffee"]
    for key in keys:
        per = next(r for r in data["per_image"] if r["checkpoint"] == "step00000100" and r["key"] == key)
        # the caption under a crop is the whole image's PSNR-Y, the number the table averages
        assert f"PSNR-Y {per['metrics']['psnr_y']:.2f} dB" in page
        for stem in ("lr", "row-bicubic", "row-step00000100", "hr"):
            assert f'src="crops/Photos/{key}/{stem}.thumb.png" loading="lazy" width="{THUMB}"' in page
            assert f'<a href="crops/Photos/{key}/{stem}.png">' in page  # click: the crop at full size
    assert page.count("<figure>") == 3 * 4 and "no crop" not in page


def test_page_in_headless_chromium_is_not_blank_and_no_image_is_broken(sweep_page, tmp_path):
    page = sweep_page / "results.html"
    check = image_check(page, tmp_path)
    assert check == {"total": 3 * 4 + 1, "broken": []}  # 3 images x (LR, bicubic, step 100, HR) + 1 plot

    shot = tmp_path / "results_html.png"
    run_chromium(tmp_path, "--window-size=1280,1600", f"--screenshot={shot}", page.as_uri())
    assert Image.open(shot).size == (1280, 1600) and not is_blank(shot)
    if os.environ.get("SAMDIFFSR_SCREENSHOT_DIR"):
        shutil.copy(shot, Path(os.environ["SAMDIFFSR_SCREENSHOT_DIR"]) / shot.name)

    # the two checks can fail: a missing thumbnail is reported broken, an empty page is blank
    gone = sweep_page / "crops" / "Photos" / "chelsea" / "row-bicubic.thumb.png"
    kept = gone.read_bytes()
    gone.unlink()
    try:
        assert image_check(page, tmp_path)["broken"] == ["crops/Photos/chelsea/row-bicubic.thumb.png"]
    finally:
        gone.write_bytes(kept)
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>")
    run_chromium(tmp_path, "--window-size=1280,1600", f"--screenshot={tmp_path / 'empty.png'}", empty.as_uri())
    assert is_blank(tmp_path / "empty.png")


def test_crops_are_the_same_square_of_every_row_and_thumbnails_are_fixed_size(tmp_path):
    hr = photo_hr("astronaut", (120, 96))
    lr = imresize(hr, 1 / 4)
    sr = imresize(lr, 4)
    top, left, side = crop_box(hr, 64, 4)
    assert side == 64 and top % 4 == 0 and left % 4 == 0 and top + side <= 120 and left + side <= 96
    # the box holds more detail than the flattest box of the same size
    y = metrics.rgb_to_y(hr)
    detail = np.abs(np.diff(y, axis=1))[top : top + side, left : left + side - 1].sum()
    flat = min(np.abs(np.diff(y, axis=1))[t : t + side, c : c + side - 1].sum()
               for t in range(0, 120 - side + 1, 8) for c in range(0, 96 - side + 1, 8))
    assert detail > flat
    save_crops(tmp_path, "My set", "a/b", "step 5", sr, hr, lr, 4, 64)
    save_crops(tmp_path, "My set", "a/b", "bicubic", sr, hr, lr, 4, 64)
    folder = crop_folder(tmp_path, "My set", "a/b")
    assert folder == tmp_path / "crops" / "My%20set" / urllib.parse.quote("a/b", safe="")
    row = read_crop(folder, "row-step%205")
    assert row["box"] == [top, left, side]
    np.testing.assert_array_equal(np.asarray(Image.open(row["full"])), sr[top : top + side, left : left + side])
    assert Image.open(row["thumb_file"]).size == (THUMB, THUMB)  # 64 -> 128 by pixel repetition
    assert row["psnr_y"] == pytest.approx(metrics.psnr_y(sr, hr, 4))
    lr_crop = np.asarray(Image.open(read_crop(folder, "lr")["full"]))
    np.testing.assert_array_equal(lr_crop[::4, ::4], lr[top // 4 : (top + side) // 4, left // 4 : (left + side) // 4])
    assert "psnr_y" not in read_crop(folder, "hr")  # the reference has no score
    np.testing.assert_array_equal(np.asarray(Image.open(read_crop(folder, "hr")["full"])),
                                  hr[top : top + side, left : left + side])
    assert read_crop(folder, "row-bicubic")["box"] == row["box"]  # the second row: the same square

    # on the page: names quoted on disk are quoted once more in links; a crop not (fully) written is a note
    (folder / "row-bicubic.png").unlink()
    assert read_crop(folder, "row-bicubic") is None
    strip = comparison_strip(tmp_path, "My set", "a/b", ["bicubic", "step 5"], 4)
    assert strip.count("<figure>") == 4 and strip.count("no crop") == 1
    assert 'src="crops/My%2520set/a%252Fb/row-step%25205.thumb.png"' in strip
