"""results.html at sweep scale: checkpoints x images of crops, lazy thumbnails against eager ones, in Chromium.

    python bench/html_report.py                      # 20 checkpoints x 100 images; prints the table
    python bench/html_report.py --write              # and replaces "## html_report" in bench/RESULTS.md

Builds a sweep's output folder with the sweep's own code (crops.save_crops for every row and image: photo
crops as HR, their MATLAB-bicubic LR, bicubic SR plus noise as each checkpoint's SR; html_report.write_html),
then times headless Chromium (`chromium --dump-dom`, which returns after the page's load event) on the page
as written (loading="lazy") and on a copy with loading="eager", in the same run, and counts the images each
has loaded when its load event fires and 3 s later. Headless Chromium loads lazy images eagerly unless
told otherwise (observed: 300 of 300 far below the fold); `--blink-settings=lazyLoadEnabled=true` restores
what a desktop browser does.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from results_file import cpu_name, write_section  # bench/results_file.py
from skimage import data as skdata

from samdiffsr.evaluation.crops import save_crops
from samdiffsr.evaluation.html_report import write_html
from samdiffsr.imresize import imresize

REPO = Path(__file__).resolve().parents[1]

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "immunohistochemistry")
COUNT_SCRIPT = """<script>
function loaded() { return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length; }
addEventListener('load', () => {
  const out = document.createElement('pre'); out.id = 'count';
  out.textContent = loaded() + '/' + document.images.length;
  document.body.appendChild(out);
  setTimeout(() => { const later = document.createElement('pre'); later.id = 'later';
    later.textContent = loaded() + '/' + document.images.length; document.body.appendChild(later); }, 3000); });
</script>"""
CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1280,1000",
            "--blink-settings=lazyLoadEnabled=true"]


def build(out: Path, ckpts: int, images: int, crop: int) -> None:
    rng = np.random.default_rng(0)
    photos = [getattr(skdata, name)() for name in PHOTOS]
    labels = ["bicubic", *[f"step{(i + 1) * 10000:08d}" for i in range(ckpts)]]
    summaries, per_image = [], []
    for k in range(images):
        img = photos[k % len(photos)]
        top, left = rng.integers(0, img.shape[0] - 288), rng.integers(0, img.shape[1] - 288)
        hr = np.ascontiguousarray(img[top : top + 288, left : left + 288, :3])
        lr = imresize(hr, 1 / 4)
        bicubic = imresize(lr, 4)
        for i, label in enumerate(labels):
            noise = rng.normal(0, 12.0 / (i + 1), hr.shape) if i else 0
            sr = np.clip(bicubic + noise, 0, 255).astype(np.uint8)
            save_crops(out, "Set100", f"img{k:03d}", label, sr, hr, lr, 4, crop)
            per_image.append({"checkpoint": label, "set": "Set100", "key": f"img{k:03d}", "metrics": {}})
    for i, label in enumerate(labels):
        summaries.append({"checkpoint": label, "step": i * 10000 or None, "set": "Set100", "images": images,
                          "source": "model" if i else "bicubic", "metrics": {"psnr_y": 25.0 + i / 10}})
    write_html(out, summaries, per_image, ["Set100"], ["psnr_y"], {"scale": 4}, [])


def load_once(page: Path, profile: Path) -> tuple[float, str]:
    """Seconds until the load event (``--dump-dom`` returns then), and the images loaded by then."""
    cmd = [*CHROMIUM, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()]
    start = time.perf_counter()
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    seconds = time.perf_counter() - start
    return seconds, re.search(r'<pre id="count">(.*?)</pre>', dom).group(1)


def loaded_later(page: Path, profile: Path) -> str:
    """The images loaded 3 s after the load event, nothing scrolled (virtual time lets the timer run)."""
    cmd = [*CHROMIUM, f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    return re.search(r'<pre id="later">(.*?)</pre>', dom).group(1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpts", type=int, default=20, help="checkpoint rows, plus bicubic (default: 20)")
    p.add_argument("--images", type=int, default=100, help="images of the set (default: 100)")
    p.add_argument("--crop", type=int, default=256, help="crop side, HR pixels (default: 256)")
    p.add_argument("--repeats", type=int, default=3, help="page loads of each kind; median (default: 3)")
    p.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = p.parse_args()
    if not shutil.which("chromium"):
        raise SystemExit("html_report.py: needs Debian's chromium (apt-get install -y chromium)")
    work = Path(tempfile.mkdtemp(prefix="bench_html_"))
    t0 = time.perf_counter()
    build(work, args.ckpts, args.images, args.crop)
    built = time.perf_counter() - t0
    page = work / "results.html"
    text = page.read_text().replace("</body>", COUNT_SCRIPT + "</body>")
    lazy, eager = work / "lazy.html", work / "eager.html"
    lazy.write_text(text)
    eager.write_text(text.replace('loading="lazy"', 'loading="eager"'))
    runs = {"lazy (as written)": lazy, "eager (copy)": eager}
    times = {k: [] for k in runs}
    counts = {}
    for _ in range(args.repeats):
        for kind, path in runs.items():
            seconds, counts[kind] = load_once(path, work / "profile")
            times[kind].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    thumbs = list((work / "crops").rglob("*.thumb.png"))
    thumb_mb = sum(f.stat().st_size for f in thumbs) / 1e6
    lines = [f"`python bench/html_report.py --ckpts {args.ckpts} --images {args.images} --crop {args.crop}`; "
             f"{cpu_name()}; {datetime.date.today()}; chromium headless, window 1280x1000, "
             "`--blink-settings=lazyLoadEnabled=true` (a desktop browser's lazy loading).", "",
             f"Page: {page.stat().st_size / 1e3:.0f} KB of HTML, {len(thumbs)} thumbnails ({thumb_mb:.1f} MB); "
             f"crops written in {built:.0f} s.", "",
             f"| page | time to the load event (median of {args.repeats}) | images loaded then | 3 s later |",
             "|---|---:|---:|---:|"]
    lines += [f"| {k} | {med[k]:.2f} s | {counts[k]} | {loaded_later(path, work / 'profile')} |"
              for k, path in runs.items()]
    ratio = med["eager (copy)"] / med["lazy (as written)"]
    lines += ["", f"Time to the load event, eager / lazy: {ratio:.1f}x (same page, same run). With lazy loading "
              "the thumbnails not loaded at the load event load as they scroll into view."]
    print("\n".join(lines))
    if args.write:
        write_section(REPO / "bench" / "RESULTS.md", "html_report", "\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
