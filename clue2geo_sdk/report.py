"""An offline HTML map report: one self-contained file, no tile server, no CDN, no script fetches.

The world is drawn from the bundle's own GeoNames places (one dot per inhabited 1°x1° cell, so
coastlines and settled land show), in an equirectangular SVG. Each image gets its predicted point,
its candidates (with source and score) and its cues in a table below.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

W, H = 1440, 720


def _xy(lat: float, lon: float) -> tuple[float, float]:
    return (lon + 180.0) / 360.0 * W, (90.0 - lat) / 180.0 * H


def _km(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} km"


def world_cells(db_path: Path) -> list[tuple[int, int]]:
    """Inhabited 1-degree cells from the cities table of a bundle's metadata DuckDB."""
    import duckdb

    with duckdb.connect(str(db_path), read_only=True) as con:
        return con.execute("SELECT DISTINCT CAST(floor(lat) AS INT), CAST(floor(lon) AS INT) FROM cities").fetchall()


_COLORS = {"direct": "#d62728", "rag5": "#1f77b4", "rag10": "#2ca02c", "rag15": "#9467bd", "gallery_nearest": "#8c564b"}


def render_report(records: Iterable[dict[str, Any]], db_path: Path, *, title: str = "clue2geo report") -> str:
    records = list(records)
    ok = [r for r in records if r.get("status") == "ok"]
    failed = [r for r in records if r.get("status") == "error"]
    land = "".join(
        f'<rect x="{_xy(la + 1, lo)[0]:.1f}" y="{_xy(la + 1, lo)[1]:.1f}" width="4" height="4"/>'
        for la, lo in world_cells(db_path)
    )
    marks = []
    for n, r in enumerate(ok, start=1):
        x, y = _xy(r["lat"], r["lon"])
        for c in r.get("candidates", []):
            cx, cy = _xy(c["lat"], c["lon"])
            color = _COLORS.get(c["source"], "#444")
            marks.append(
                f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{cx:.1f}" y2="{cy:.1f}" stroke="{color}" stroke-width="0.8" opacity="0.6"/>'
                f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{color}"><title>#{n} {html.escape(c["source"])} '
                f"score {c['score']:.3f} ({c['lat']:.4f}, {c['lon']:.4f})</title></circle>"
            )
        marks.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="#ff7f0e" stroke="#000"><title>#{n} '
            f"{html.escape(str(r.get('path')))}: {r['lat']:.4f}, {r['lon']:.4f}</title></circle>"
            f'<text x="{x + 7:.1f}" y="{y - 7:.1f}" font-size="12">{n}</text>'
        )
    rows = []
    for n, r in enumerate(ok, start=1):
        cands = "<br>".join(
            f"{html.escape(c['source'])}: ({c['lat']:.4f}, {c['lon']:.4f}) score {c['score']:.3f}"
            for c in r.get("candidates", [])
        )
        cues = "<br>".join(
            f"{html.escape(c['cue'])} <small>S_l {c['s_l']:.3f} S_s {c['s_s']:.3f} S_r {c['s_r']:.3f}</small>"
            for c in r.get("cues", [])
        )
        place = ", ".join(html.escape(str(v)) for v in (r.get("city"), r.get("country")) if v)
        rows.append(
            f"<tr><td>{n}</td><td>{html.escape(str(r.get('path')))}</td><td>{r['lat']:.4f}, {r['lon']:.4f}"
            f"<br>{place}</td><td>{r['confidence']:.3f}<br><small>spread {_km(r.get('spread_km'))}"
            f"{' · fallback' if r.get('fallback') else ''}</small></td><td>{cands}</td><td>{cues or '—'}</td></tr>"
        )
    fails = "".join(
        f"<tr><td>{html.escape(str(r.get('path')))}</td><td>{html.escape(str(r.get('error')))}</td>"
        f"<td>{html.escape(str(r.get('message')))}</td></tr>"
        for r in failed
    )
    demo = any(r.get("demo") for r in records)
    banner = (
        '<p id="demo-warning" role="alert" style="background:#fff3cd;border:2px solid #d39e00;padding:.6em;font-weight:bold">'
        "Made with a demo bundle (random-weight models): these locations are meaningless. "
        "They show the plumbing only; do not use them as evidence.</p>"
        if demo
        else ""
    )
    legend = " ".join(f'<span style="color:{c}">●</span> {s}' for s, c in _COLORS.items())
    data = html.escape(json.dumps({"ok": len(ok), "failed": len(failed), "demo": demo}))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}}svg{{width:100%;height:auto;background:#eef4fa}}
table{{border-collapse:collapse;margin-top:1em}}td,th{{border:1px solid #ccc;padding:4px;vertical-align:top;font-size:13px}}</style>
</head><body data-summary="{data}">
<h1>{html.escape(title)}</h1>
{banner}
<p>{len(ok)} located, {len(failed)} failed. Orange: prediction; small dots: candidates ({legend}).
Land drawn from GeoNames places (offline).</p>
<svg viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg"><g fill="#b9c7b0">{land}</g>{"".join(marks)}</svg>
<h2>Predictions</h2>
<table><tr><th>#</th><th>image</th><th>prediction</th><th>confidence</th><th>candidates</th><th>cues (S_l, S_s, S_r)</th></tr>
{"".join(rows)}</table>
<h2>Failures</h2>
<table><tr><th>image</th><th>error</th><th>reason</th></tr>{fails or '<tr><td colspan="3">none</td></tr>'}</table>
</body></html>
"""


def write_report(
    path: Path, records: Iterable[dict[str, Any]], db_path: Path, *, title: str = "clue2geo report"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(records, db_path, title=title), encoding="utf-8")
    return path
