"""The validation report as one offline HTML page, in the case report's style.

Made from ``validation.json`` (:mod:`clue2geo_sdk.evaluation.validation`) alone, so a page can be
rendered again from an attached report. Nothing is fetched (the case report's Content-Security-Policy
and inline style); every value goes through the report's escaping helpers, since a validation.json
may come from someone else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..bundle.validation import summary_line
from .report.style import CSP, STYLE, code, esc, num, table_rows

_EXTRA_STYLE = (
    ".lead{border:2px solid #444;background:#eef3ff;padding:.6em} td.n{text-align:right}"
    " table.stats thead th,td.n{white-space:nowrap;overflow-wrap:normal}"
)


def _pct(value: Any) -> str:
    return num(100 * value, ".1f", " %") if isinstance(value, int | float) and not isinstance(value, bool) else "—"


def _iv(iv: Mapping[str, Any], fmt: Any = _pct) -> str:
    """A value with its interval, "41.0 % [38.0 % – 44.0 %]"."""
    return f"{fmt(iv.get('value'))} <small>[{fmt(iv.get('low'))} – {fmt(iv.get('high'))}]</small>"


def _km(value: Any) -> str:
    return num(value, ",.1f", " km")


def _summary_table(rows: Sequence[tuple[str, Mapping[str, Any]]], label: str) -> str:
    """One row per group (or the whole set): n, located, accuracy per threshold, median and p90."""
    kms = list(rows[0][1]["accuracy"]) if rows else []
    head = "".join(f"<th>{esc(k)} km</th>" for k in kms)
    body = []
    for name, s in rows:
        acc = "".join(f"<td>{_iv(s['accuracy'][k])}</td>" for k in kms)
        err = s["error_km"]
        body.append(
            f"<tr><th>{esc(name)}</th><td class=n>{esc(s['n'])}</td><td class=n>{esc(s['n_located'])}</td>{acc}"
            f"<td>{_iv(err['median'], _km)}</td><td>{_iv(err['p90'], _km)}</td></tr>"
        )
    return (
        f'<table class="stats"><thead><tr><th>{esc(label)}</th><th>n</th><th>located</th>{head}<th>median error</th>'
        f"<th>90th pct. error</th></tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _groups(g: Mapping[str, Any], label: str) -> str:
    """A group table (continent or country) and the groups too small to report."""
    rows = [(f"{x['name']} ({x['key']})" if x["key"] != x["name"] else x["name"], x) for x in g["groups"]]
    table = (
        _summary_table(rows, label) if rows else f"<p>No {esc(label.lower())} has {esc(g['min_n'])} images or more.</p>"
    )
    few = ", ".join(f"{esc(x['name'])} (n = {esc(x['n'])})" for x in g["too_few_to_report"])
    note = f"<p>Too few to report (fewer than {esc(g['min_n'])} images): {few}.</p>" if few else ""
    return table + note


def _calibration(cal: Mapping[str, Any]) -> str:
    """The confidence bands: how often the first answer was within each distance, and top-k coverage."""
    bands = cal["bands"]
    kms = list(bands[0]["accuracy"]) if bands else []
    ks = list(bands[0]["topk_within_25km"]) if bands else []
    head = "".join(f"<th>within {esc(k)} km</th>" for k in kms) + "".join(
        f"<th>top-{esc(k)} within 25 km</th>" for k in ks
    )
    body = []
    for b in bands:
        close = "]" if b["hi"] >= 1 else ")"
        cells = "".join(f"<td>{_pct(b['accuracy'][k])}</td>" for k in kms)
        cells += "".join(f"<td>{_pct(b['topk_within_25km'][k])}</td>" for k in ks)
        body.append(
            f"<tr><th>[{num(b['lo'], '.2f')}, {num(b['hi'], '.2f')}{close}</th><td class=n>{esc(b['count'])}</td>"
            f"<td>{num(b['mean_confidence'], '.3f')}</td>{cells}</tr>"
        )
    cover = cal["topk_coverage"]
    cov_rows = [
        (f"top-{esc(k)}", ", ".join(f"{esc(t)} km: {_pct(v)}" for t, v in by_t.items())) for k, by_t in cover.items()
    ]
    return f"""<p>Confidence: {esc(cal["confidence"])}.</p>
<table class="stats"><thead><tr><th>confidence band</th><th>images</th><th>mean confidence</th>{head}</tr></thead>
<tbody>{"".join(body)}</tbody></table>
<p>{esc(cal["n_binned"])} images binned; {esc(cal["n_without_confidence"])} without a confidence (failed, or
nothing weighed) left out. ECE at 25 km {num(cal["ece_at_25km"], ".3f")}, Brier {num(cal["brier_at_25km"], ".3f")};
first answer not the most confident: {esc(cal["winner_not_most_confident"])}.</p>
<h3>Top-k coverage over all images (a failure covers nothing)</h3>
<table class="kv">{table_rows(cov_rows)}</table>"""


def _reproducibility(data: Mapping[str, Any]) -> str:
    rep, ev, b = data["reproducibility"], data["evalset"], data["bundle"]
    pairs = [
        ("Eval set", f"{esc(ev['name'])} ({esc(ev['kind'])}: {code(ev['source'])}), n = {esc(ev['n'])}"),
        ("Eval set digest", f"{code(rep['evalset_digest'])}<br><small>{esc(ev['digest_method'])}</small>"),
        ("Truth", esc(ev["truth"])),
        ("Bundle", f"{esc(b['name'])} ({code(b['path'])}), demo = {esc(b['demo'])}"),
        ("Bundle digest (manifest sha256)", code(rep["bundle_digest"])),
        ("Models digest", code(rep["models_digest"])),
        ("SDK version", esc(rep["sdk_version"])),
        ("Options digest", code(rep["options_digest"])),
        ("Gallery", esc(rep["gallery"])),
        ("Engine, device, in flight", f"{esc(rep['engine'])}, {esc(rep['device'])}, {esc(rep['in_flight'])}"),
        ("Date (UTC)", esc(rep["date"])),
        ("Intervals", esc(data["method"]["intervals"])),
    ]
    return f'<table class="kv">{table_rows(pairs)}</table>'


def _left_out(data: Mapping[str, Any]) -> str:
    """Failed images and photos left out of the set, folded away."""
    failed = "".join(f"<li>{code(f['path'])}: {esc(f['error'])}</li>" for f in data["failed"])
    excl = "".join(f"<li>{code(e['path'])}: {esc(e['reason'])}</li>" for e in data["evalset"]["excluded"])
    rows = "".join(f"<li>{esc(r)}</li>" for r in data["evalset"]["skipped_rows"])
    return (
        f"<details><summary>{esc(data['n_failed'])} images failed (counted as misses)</summary>"
        f"<ul>{failed}</ul></details>"
        f"<details><summary>{esc(data['evalset']['n_excluded'])} photos left out of the set</summary><ul>{excl}</ul>"
        f"</details><details><summary>{len(data['evalset']['skipped_rows'])} CSV rows skipped</summary>"
        f"<ul>{rows}</ul></details>"
    )


def render_validation_page(data: Mapping[str, Any]) -> str:
    """The page of a validation report's dict."""
    title = f"clue2geo validation: {data['bundle']['name']} on {data['evalset']['name']}"
    demo = bool(data["bundle"]["demo"] or data["bundle"]["random_weights"])
    banner = (
        '<p id="demo-warning" class="banner" role="alert">This bundle carries random-weight models: every '
        "number on this page is meaningless. It shows the procedure only.</p>"
        if demo
        else ""
    )
    overall = _summary_table([("all images", data)], "set")
    limits = "".join(f"<li>{esc(x)}</li>" for x in data["limitations"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{esc(title)}</title><style>{STYLE}{_EXTRA_STYLE}</style></head>
<body><header><h1>{esc(title)}</h1>{banner}
<p id="headline"><strong>{esc(summary_line(dict(data)))}</strong></p>
<p class="lead">{esc(data["note"])}</p>
<p>{esc(data["n"])} images, {esc(data["n_located"])} located, {esc(data["n_failed"])} failed.</p></header>
<h2>Accuracy</h2>
<p>Fraction of all images whose first answer lies within each distance of the truth (d &lt; t km), with its
95 % bootstrap interval; median and 90th-percentile error over the located images.</p>
{overall}
<h2>By continent of the true position</h2>{_groups(data["by_continent"], "Continent")}
<h2>By country of the true position</h2>{_groups(data["by_country"], "Country")}
<h2>Calibration</h2>{_calibration(data["calibration"])}
<h2>Limitations</h2><ul id="limitations">{limits}</ul>
<h2>Reproducibility</h2>{_reproducibility(data)}
<h2>Failures and photos left out</h2>{_left_out(data)}
<p><small>Continents and countries by Natural Earth 1:10m admin-0 borders (public domain). Generated offline
by clue2geo; rendered from validation.json.</small></p>
</body></html>
"""


def write_validation_page(path: Path, data: Mapping[str, Any]) -> Path:
    """Write :func:`render_validation_page` to ``path`` (UTF-8); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_validation_page(data), encoding="utf-8")
    return path
