"""``results.html``: the sweep's results as one static page (no server; every image by a relative path).

The page holds the results table (the best value of each column in bold), the plots, and for each image of
each set a side-by-side of the same crop: LR (nearest), every row (bicubic first, then the checkpoints by
step) and HR, each with the whole image's PSNR-Y under it. Thumbnails are lazy-loaded and sized in the
markup, so a sweep of many checkpoints x 100 images stays quick to open; clicking one opens the crop at full
size. The crops are written during the sweep (:mod:`samdiffsr.evaluation.crops`); an image scored without
them shows a note instead of a broken picture.
"""

from __future__ import annotations

import html
import math
import urllib.parse
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from samdiffsr.evaluation.crops import HR_NAME, LR_NAME, crop_folder, read_crop, row_name
from samdiffsr.evaluation.report import METRIC_INFO, fmt, paper_reported, row_order
from samdiffsr.io import atomic_write_text

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
td.paper { color: #666; font-style: italic; }
.plots img { max-width: 480px; margin: 0 8px 8px 0; border: 1px solid #ddd; }
.strip { display: flex; flex-wrap: wrap; gap: 6px; margin-bottom: 1.2em; }
figure { margin: 0; width: 132px; text-align: center; font-size: 12px; }
figure img { display: block; border: 2px solid #ddd; background: #eee; }
figure a:hover img { border-color: #36c; }
figcaption { overflow-wrap: anywhere; } .best { font-weight: bold; color: #063; }
.missing { width: 128px; height: 128px; border: 2px dashed #ccc; color: #888; display: flex;
           align-items: center; justify-content: center; }
h3 { font-size: 14px; margin: 0.6em 0 0.3em; }
"""


def _href(out: Path, path: Path) -> str:
    """A relative URL from the page to ``path`` (names already URL-quoted on disk are quoted once more)."""
    return html.escape(urllib.parse.quote(path.relative_to(out).as_posix()), quote=True)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))


def _best(summaries: Sequence[dict[str, Any]], set_name: str, metric: str) -> float | None:
    vals = [s["metrics"].get(metric) for s in summaries if s["set"] == set_name]
    vals = [v for v in vals if _is_number(v) and math.isfinite(v)]
    if not vals:
        return None
    return max(vals) if METRIC_INFO.get(metric, ("", 4, True))[2] else min(vals)


def results_table(summaries: Sequence[dict[str, Any]], sets: Sequence[str], metrics: Sequence[str]) -> str:
    """Rows: checkpoints (and the paper's numbers for sets named like theirs); columns: set x metric."""
    cell = {(s["checkpoint"], s["set"]): s for s in summaries}
    head1 = "".join(f'<th colspan="{len(metrics)}">{html.escape(n)}</th>' for n in sets)
    head2 = "".join(f"<th>{html.escape(m)}</th>" for _ in sets for m in metrics)
    lines = ["<table>", f'<tr><th rowspan="2">checkpoint</th><th rowspan="2">step</th>{head1}</tr>',
             f"<tr>{head2}</tr>"]
    best = {(n, m): _best(summaries, n, m) for n in sets for m in metrics}
    for label in row_order(summaries):
        step = next((s.get("step") for s in summaries if s["checkpoint"] == label), None)
        tds = []
        for n in sets:
            for m in metrics:
                v = (cell.get((label, n)) or {}).get("metrics", {}).get(m)
                mark = ' class="best"' if _is_number(v) and best[(n, m)] == v else ""
                tds.append(f"<td{mark}>{fmt(m, v)}</td>")
        lines.append(f"<tr><td>{html.escape(label)}</td><td>{'' if step is None else step}</td>{''.join(tds)}</tr>")
    paper = {n: paper_reported(n) for n in sets}
    if any(m in paper[n] for n in sets for m in metrics):
        tds = "".join(f'<td class="paper">{fmt(m, paper[n].get(m))}</td>' for n in sets for m in metrics)
        lines.append(f'<tr><td class="paper">paper, reported (400k)</td><td class="paper">400000</td>{tds}</tr>')
    return "\n".join([*lines, "</table>"])


def _figure(out: Path, folder: Path, stem: str, caption: str, best_psnr: float | None) -> str:
    meta = read_crop(folder, stem)
    if meta is None:
        return (f'<figure><div class="missing">no crop</div><figcaption>{html.escape(caption)}</figcaption>'
                "</figure>")
    w, h = meta["thumb"]
    psnr = meta.get("psnr_y")
    text = html.escape(caption)
    if _is_number(psnr):
        mark = ' class="best"' if best_psnr is not None and psnr == best_psnr else ""
        text += f"<br><span{mark}>PSNR-Y {psnr:.2f} dB</span>"
    elif stem == HR_NAME:
        text += "<br>reference"
    alt = html.escape(f"{caption}: {folder.name}", quote=True)
    return (f'<figure><a href="{_href(out, meta["full"])}"><img src="{_href(out, meta["thumb_file"])}" '
            f'loading="lazy" width="{w}" height="{h}" alt="{alt}"></a><figcaption>{text}</figcaption></figure>')


def comparison_strip(out: Path, set_name: str, key: str, labels: Sequence[str], scale: int | None) -> str:
    """One image of a set: LR (nearest), each row's SR and HR, the same crop of each."""
    folder = crop_folder(out, set_name, key)
    rows = [(row_name(label), label) for label in labels]
    psnrs = [(read_crop(folder, stem) or {}).get("psnr_y") for stem, _ in rows]
    finite = [p for p in psnrs if _is_number(p) and math.isfinite(p)]
    best = max(finite) if finite else None
    lr_caption = f"LR x{scale} (nearest)" if scale else "LR (nearest)"
    figures = [] if read_crop(folder, LR_NAME) is None else [_figure(out, folder, LR_NAME, lr_caption, None)]
    figures += [_figure(out, folder, stem, label, best) for stem, label in rows]
    figures.append(_figure(out, folder, HR_NAME, "HR", None))
    return f'<h3>{html.escape(key)}</h3>\n<div class="strip">\n' + "\n".join(figures) + "\n</div>"


def _keys_by_set(per_image: Sequence[dict[str, Any]], sets: Sequence[str]) -> dict[str, list[str]]:
    keys: dict[str, dict[str, None]] = {n: {} for n in sets}
    for r in per_image:
        if r["set"] in keys:
            keys[r["set"]].setdefault(r["key"], None)
    return {n: list(k) for n, k in keys.items()}


def render_page(out: Path, summaries: Sequence[dict[str, Any]], per_image: Sequence[dict[str, Any]],
                sets: Sequence[str], metrics: Sequence[str], settings: dict[str, Any],
                plots: Sequence[Path]) -> str:
    """The page's HTML text (links relative to ``out``)."""
    out = Path(out)
    labels = row_order(summaries)
    keys = _keys_by_set(per_image, sets)
    has_crops = (out / "crops").is_dir()
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>Benchmark results: {html.escape(out.resolve().name)}</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>Benchmark results</h1>",
             f"<p>{html.escape(str(out.resolve()))}, written {datetime.now():%Y-%m-%d %H:%M}. Settings: "
             + html.escape(", ".join(f"{k}={v}" for k, v in settings.items())) + "</p>",
             "<nav>" + " | ".join(f'<a href="#set-{i}">{html.escape(n)}</a>' for i, n in enumerate(sets)) + "</nav>",
             "<h2>Results</h2>", results_table(summaries, sets, metrics), "<ul>"]
    for m in metrics:
        desc, _, higher = METRIC_INFO.get(m, (m, 4, True))
        parts.append(f"<li><code>{html.escape(m)}</code>: {html.escape(desc)}; "
                     f"{'higher' if higher else 'lower'} is better</li>")
    parts.append("</ul>")
    if plots:
        parts.append('<h2>Plots</h2><div class="plots">')
        for plot in plots:  # written into ``out`` by report.write_plots
            url = _href(out, out / Path(plot).name)
            parts.append(f'<a href="{url}"><img src="{url}" alt="{html.escape(Path(plot).stem)}" loading="lazy"></a>')
        parts.append("</div>")
    parts.append("<h2>Images</h2>")
    if not has_crops:
        parts.append("<p>No crops: rerun the sweep with <code>--html-crops</code> (or <code>--save-images</code>) "
                     "into a new <code>--out</code> to see the images here.</p>")
    else:
        parts.append("<p>The same crop of each image (chosen on HR: the square with the most detail); PSNR-Y "
                     "of the whole image under each; click a crop to see it at full size.</p>")
        for i, n in enumerate(sets):
            parts.append(f'<h2 id="set-{i}">{html.escape(n)} ({len(keys[n])} images)</h2>')
            parts += [comparison_strip(out, n, k, labels, settings.get("scale")) for k in keys[n]]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(out: Path, summaries: Sequence[dict[str, Any]], per_image: Sequence[dict[str, Any]],
               sets: Sequence[str], metrics: Sequence[str], settings: dict[str, Any],
               plots: Sequence[Path]) -> Path:
    """Write ``<out>/results.html``; returns its path."""
    path = Path(out) / "results.html"
    atomic_write_text(path, render_page(Path(out), summaries, per_image, sets, metrics, settings, plots))
    return path
