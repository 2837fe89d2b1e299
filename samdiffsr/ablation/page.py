"""``ablation.html``: the ablation's section of the HTML reports, a static page next to ``ablation.md``: the
verdicts, every paired comparison, the plots, and a link to each run's benchmark page (``results.html``)."""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from samdiffsr.io import atomic_write_text

_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child{text-align:left}"
          ".better{color:#060;font-weight:bold}.worse{color:#a00;font-weight:bold}img{max-width:45%}")


def write_page(out: Path, spec: dict[str, Any], rows: list[dict[str, Any]], lines: list[str],
               bench_dirs: dict[str, list[Path]]) -> Path:
    """Write ``out/ablation.html``; ``bench_dirs`` maps each arm to its runs' benchmark folders (seed order)."""
    e = html.escape
    arms = ", ".join(f"<code>{e(name)}</code> ({e(' '.join(o) or 'the config as is')})"
                     for name, o in spec["arms"].items())
    body = [f"<h1>Ablation</h1><p>Config <code>{e(str(spec['config']))}</code>; arms {arms}; seeds "
            f"{spec['seeds']}. Differences are paired (same images, sampler noise, initial weights and batches per "
            "seed); intervals are 95% bootstrap intervals over images and seeds.</p>", "<h2>Verdict</h2><ul>"]
    body += [f"<li>{e(line)}</li>" for line in lines] + ["</ul><h2>Every step</h2><table><tr>"]
    body += [f"<th>{h}</th>" for h in ("arm", "step", "metric", "arm mean", "baseline mean", "difference",
                                       "95% CI", "verdict")] + ["</tr>"]
    for r in rows:
        verdict = r["verdict"]
        body.append(f"<tr><td>{e(r['arm'])}</td><td>{r['step']}</td><td>{e(r['metric'])}</td>"
                    f"<td>{r['arm_mean']:.4f}</td><td>{r['baseline_mean']:.4f}</td><td>{r['diff']:+.4f}</td>"
                    f"<td>[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]</td>"
                    f"<td class='{verdict.split()[0]}'>{e(verdict)}</td></tr>")
    body.append("</table><h2>Plots</h2>")
    body += [f"<a href='{p.name}'><img src='{p.name}' alt='{e(p.stem)}'></a>" for p in sorted(out.glob("plot_*.png"))]
    body.append("<h2>Each run's benchmark</h2><ul>")
    for arm, dirs in bench_dirs.items():
        links = [f"<a href='{e(os.path.relpath(d / 'results.html', out))}'>{e(d.name)}</a>" for d in dirs
                 if (d / "results.html").is_file()]
        body.append(f"<li>{e(arm)}: {', '.join(links) or 'no results.html yet'}</li>")
    page = f"<!doctype html><meta charset='utf-8'><title>Ablation</title><style>{_STYLE}</style>{''.join(body)}</ul>"
    path = out / "ablation.html"
    atomic_write_text(path, page + "\n")
    return path
