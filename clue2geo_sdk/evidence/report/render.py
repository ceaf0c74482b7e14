"""The case report: one self-contained, offline HTML file that someone else can read and check.

Nothing is fetched: no CDN, fonts, tiles or scripts (a Content-Security-Policy forbids them all, so
even a model string that slipped past escaping could not run or call out); the photos are embedded
as ``data:`` URIs. Per image it shows

* a thumbnail of the photo, read again from the record's ``image`` path at report time (decoded and
  EXIF-transposed by :func:`clue2geo_sdk.inputs.image.load_image`, as the pipeline saw it) and shown only
  when its sha256 is still the record's ``image_sha256``; a missing or changed file is said instead;
* the CLIP patch that matched each primary cue, outlined: patches are cut exactly as
  :func:`clue2geo_sdk.engines.encoders.patch_grid` cuts them, on the bundle's ``clip.patch_grid``;
* the cluemap (clue sets), the candidates, the prediction and the photo's own metadata position on a
  world map of Natural Earth country outlines (:mod:`clue2geo_sdk.geo.countries`), with the distances;
* the model's raw answers, folded away (unfolded when printed);
* a chain-of-custody block: UTC start/end, image sha256, bundle digest, SDK version, options, the
  record's hash links (recomputed here), and how to check the whole chain (``clue2geo audit verify``).

At the top, the results' hash chain is checked, and each examiner's signature (``audit sign``): shown
as holding (green) only when made by a key the user trusts (``trusted_keys``, ``report --trusted-key``);
one that verifies only with the public key stored in the signatures file is said to be *not checked
against a key you trust*. Failed records appear with their error; a record with fields of the wrong
type is shown as far as it can be, each part that cannot be drawn named (never failing the report).
The page prints one image per page (``@media print``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import hashlib
import html
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ..._version import __version__
from ...errors import Clue2GeoError
from ...evaluation.metrics import distance_km

W, H = 1440, 720  # the equirectangular world: 4 units per degree
THUMB_MAX = 480  # longest side of an embedded thumbnail, px
OUTLINE_TOLERANCE_DEG = 0.2
LAND, OCEAN, BORDER = "#cfe0c3", "#dbe9f6", "#6f8a62"
CUE_COLORS = ("#e6194b", "#f58231", "#911eb4")  # clue sets 1, 2, 3 (primary cues' patch outlines)
METADATA_COLOR = "#000000"
PREDICTION_COLOR = "#ff7f0e"
_COLORS = {
    "direct": "#d62728",
    "rag5": "#1f77b4",
    "rag10": "#2ca02c",
    "rag15": "#9467bd",
    "gallery_nearest": "#8c564b",
    "region_anchor": "#7f7f7f",  # a point inside the region, not a model answer
}
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# -- geometry ---------------------------------------------------------------------------------------


def _xy(lat: float, lon: float) -> tuple[float, float]:
    """Equirectangular projection into the W x H world."""
    return (lon + 180.0) / 360.0 * W, (90.0 - lat) / 180.0 * H


def patch_box(size: tuple[int, int], grid: tuple[int, int], index: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) pixel box of row-major patch ``index`` of an image of ``size``
    (w, h) cut into ``grid`` (rows, cols): the same integer arithmetic as ``encoders.patch_grid``."""
    rows, cols = grid
    if not 0 <= index < rows * cols:
        raise ValueError(f"patch {index} is outside a {rows}x{cols} grid")
    w, h = size
    r, c = divmod(index, cols)
    return c * w // cols, r * h // rows, (c + 1) * w // cols, (r + 1) * h // rows


def _finite(*values: Any) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _items(rec: Mapping[str, Any], key: str) -> list[Any]:
    """The record's list ``key`` ([] when absent or null); another type is named as an error."""
    value = rec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise TypeError(f"the record's {key!r} is a JSON {_kind(value)}, not a list")
    return value


def _mapping(rec: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """The record's object ``key`` ({} when absent or null); another type is named as an error."""
    value = rec.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"the record's {key!r} is a JSON {_kind(value)}, not an object")
    return value


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float written as its name ("NaN", "Infinity"): JSON shown on
    the page stays JSON (the standard has no NaN), whatever a record holds."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _json(value: Any, **kw: Any) -> str:
    """Strict JSON text of ``value`` (never NaN or Infinity) for the page."""
    return json.dumps(_json_safe(value), ensure_ascii=False, allow_nan=False, default=str, **kw)


@functools.cache
def world_path(tolerance_deg: float = OUTLINE_TOLERANCE_DEG) -> str:
    """SVG path data of every country ring (Natural Earth admin-0, simplified), in world units."""
    from ...geo.countries import countries

    parts = []
    for ring in countries().outline(tolerance_deg=tolerance_deg):
        pts = [_xy(lat, lon) for lon, lat in ring]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if max(xs) - min(xs) < 1.0 and max(ys) - min(ys) < 1.0:  # under a quarter degree: invisible
            continue
        parts.append("M" + "L".join(f"{x:.1f} {y:.1f}" for x, y in pts) + "Z")
    return "".join(parts)


# -- the photo --------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Thumbnail:
    """The photo as found at report time. ``status``: "ok" (shown), "missing" (no file), "mismatch"
    (the file's sha256 is not the record's: not the image that was located, so not shown),
    "unreadable" (not decodable now) or "unknown" (the record names no image or no sha256)."""

    status: str
    path: str
    note: str
    sha256_now: str | None = None
    size: tuple[int, int] | None = None  # the decoded, EXIF-transposed photo (what the patches cut)
    thumb_size: tuple[int, int] | None = None
    data_uri: str | None = attrs.field(default=None, repr=False)


def load_thumbnail(path: Path, expected_sha256: str | None, *, max_side: int = THUMB_MAX) -> Thumbnail:
    """Read the photo again and check it is the one the record describes before embedding it."""
    from ...errors import ImageLoadError
    from ...inputs.image import load_image

    shown = str(path)
    if not path.exists():
        return Thumbnail(status="missing", path=shown, note=f"the image file is missing at report time: {shown}")
    try:
        img = load_image(path)
    except ImageLoadError as exc:
        return Thumbnail(status="unreadable", path=shown, note=f"the image cannot be read at report time: {exc}")
    if not expected_sha256:
        return Thumbnail(
            status="unknown", path=shown, sha256_now=img.sha256, note="the record holds no image sha256 to check"
        )
    if img.sha256 != expected_sha256:
        return Thumbnail(
            status="mismatch",
            path=shown,
            sha256_now=img.sha256,
            note=f"the file at {shown} has changed since it was located (sha256 now {img.sha256}, "
            f"recorded {expected_sha256}): it is not the image this record describes, so it is not shown",
        )
    w, h = img.size
    scale = min(1.0, max_side / max(w, h))
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    buf = io.BytesIO()
    img.image.resize((tw, th)).save(buf, format="JPEG", quality=82)
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Thumbnail(
        status="ok",
        path=shown,
        sha256_now=img.sha256,
        size=(w, h),
        thumb_size=(tw, th),
        data_uri=uri,
        note="sha256 matches the record",
    )


# -- HTML helpers -----------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """Escaped text; "—" for nothing."""
    return "—" if value is None or value == "" else html.escape(str(value), quote=True)


def _num(value: Any, fmt: str = ".4f", unit: str = "") -> str:
    return f"{value:{fmt}}{unit}" if _finite(value) else "—"


def _km(value: Any) -> str:
    return _num(value, ".1f", " km")


def _code(value: Any) -> str:
    return f"<code>{_e(value)}</code>"


def _rows(pairs: Sequence[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in pairs)


def _position(rec: Mapping[str, Any]) -> Mapping[str, Any] | None:
    meta = rec.get("metadata")
    pos = meta.get("position") if isinstance(meta, Mapping) else None
    return pos if isinstance(pos, Mapping) and _finite(pos.get("lat"), pos.get("lon")) else None


def _primaries(rec: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(clue set number, cue index) of each primary cue, from the record's cluemap."""
    cues = _items(rec, "cues")
    out = []
    for n, s in enumerate(_items(_mapping(rec, "cluemap"), "sets"), start=1):
        i = s.get("primary") if isinstance(s, Mapping) else None
        if isinstance(i, int) and 0 <= i < len(cues) and isinstance(cues[i], Mapping):
            out.append((n, i))
    return out


def _color(n: int) -> str:
    return CUE_COLORS[(n - 1) % len(CUE_COLORS)]


# -- per-image parts ----------------------------------------------------------------------------------


def _photo_svg(rec: Mapping[str, Any], thumb: Thumbnail, grid: tuple[int, int]) -> tuple[str, list[str]]:
    """The thumbnail with the faint patch grid and each primary cue's patch outlined; and notes."""
    assert thumb.data_uri and thumb.size and thumb.thumb_size
    (w, h), (tw, th) = thumb.size, thumb.thumb_size
    sx, sy = tw / w, th / h
    rows, cols = grid
    grid_lines = "".join(
        f'<line x1="{c * w // cols * sx:.1f}" y1="0" x2="{c * w // cols * sx:.1f}" y2="{th}"/>' for c in range(1, cols)
    ) + "".join(
        f'<line x1="0" y1="{r * h // rows * sy:.1f}" x2="{tw}" y2="{r * h // rows * sy:.1f}"/>' for r in range(1, rows)
    )
    outlines, notes = [], []
    cues = _items(rec, "cues")
    for n, i in _primaries(rec):
        patch = cues[i].get("patch", -1)
        if not isinstance(patch, int) or patch < 0:
            notes.append(f"clue set {n}: its primary cue has no matched patch")
            continue
        try:
            left, top, right, bottom = patch_box((w, h), grid, patch)
        except ValueError as exc:
            notes.append(f"clue set {n}: {exc} (the bundle's grid is not the one that made this record?)")
            continue
        inset = 1.5 + 3.0 * (n - 1)  # nested, so outlines of cues sharing a patch stay visible
        x, y = left * sx + inset, top * sy + inset
        bw, bh = max(1.0, (right - left) * sx - 2 * inset), max(1.0, (bottom - top) * sy - 2 * inset)
        outlines.append(
            f'<rect class="cue-outline" data-set="{n}" data-patch="{patch}" x="{x:.1f}" y="{y:.1f}" '
            f'width="{bw:.1f}" height="{bh:.1f}" fill="none" stroke="{_color(n)}" stroke-width="3">'
            f"<title>clue set {n}: {_e(cues[i].get('cue'))}</title></rect>"
            f'<text x="{x + 4:.1f}" y="{y + 18:.1f}" fill="{_color(n)}" stroke="#fff" stroke-width="3" '
            f'paint-order="stroke" font-size="16" font-weight="bold">{n}</text>'
        )
    svg = (
        f'<svg class="photo" viewBox="0 0 {tw} {th}" width="{tw}" height="{th}" role="img" '
        f'aria-label="photo with matched patches">'
        f'<image href="{thumb.data_uri}" x="0" y="0" width="{tw}" height="{th}"/>'
        f'<g stroke="#fff" stroke-opacity=".45" stroke-width="1" stroke-dasharray="4 4">{grid_lines}</g>'
        f"{''.join(outlines)}</svg>"
    )
    return svg, notes


def _view(points: Sequence[tuple[str, float, float, str]]) -> tuple[float, float, float, float]:
    """A 2:1 view box around the points (at least 20 degrees wide), inside the world."""
    xy = [_xy(lat, lon) for _, lat, lon, _ in points]
    if not xy:
        return 0.0, 0.0, float(W), float(H)
    xs, ys = [p[0] for p in xy], [p[1] for p in xy]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    vw = min(float(W), max(80.0, (max(xs) - min(xs)) * 1.4, (max(ys) - min(ys)) * 1.4 * 2))
    vh = vw / 2
    return min(max(cx - vw / 2, 0.0), W - vw), min(max(cy - vh / 2, 0.0), H - vh), vw, vh


def _marks(points: Sequence[tuple[str, float, float, str]], unit: float, *, lines: bool) -> str:
    """Markers for (kind, lat, lon, tooltip) points: kind "prediction" (or "prediction:N", drawn with
    its number), "metadata" or a candidate source. ``lines`` joins each candidate and the metadata
    position to the prediction. ``unit`` scales markers with the view, so they look alike at any zoom."""
    xy = [(_xy(lat, lon), kind, tip) for kind, lat, lon, tip in points]
    preds = [p for p, kind, _ in xy if kind.startswith("prediction")]
    out = []
    for (x, y), kind, _tip in xy:
        if kind.startswith("prediction"):
            continue
        color = METADATA_COLOR if kind == "metadata" else _COLORS.get(kind, "#444")
        dash = f' stroke-dasharray="{unit * 1.5:.3f} {unit:.3f}"' if kind == "metadata" else ""
        if lines:
            out.extend(
                f'<line x1="{px:.2f}" y1="{py:.2f}" x2="{x:.2f}" y2="{y:.2f}" stroke="{color}" '
                f'stroke-width="{unit * 0.35:.3f}" opacity=".7"{dash}/>'
                for px, py in preds
            )
    for (x, y), kind, tip in xy:
        if kind.startswith("prediction") or kind == "metadata":
            continue
        out.append(
            f'<circle class="candidate" cx="{x:.2f}" cy="{y:.2f}" r="{unit * 1.2:.3f}" '
            f'fill="{_COLORS.get(kind, "#444")}" stroke="#fff" stroke-width="{unit * 0.25:.3f}">'
            f"<title>{_e(tip)}</title></circle>"
        )
    for (x, y), kind, tip in xy:
        if kind == "metadata":
            s = unit * 1.6
            out.append(
                f'<rect class="metadata-position" x="{x - s:.2f}" y="{y - s:.2f}" width="{2 * s:.3f}" '
                f'height="{2 * s:.3f}" fill="#fff" stroke="{METADATA_COLOR}" stroke-width="{unit * 0.6:.3f}" '
                f'transform="rotate(45 {x:.2f} {y:.2f})"><title>{_e(tip)}</title></rect>'
            )
    for (x, y), kind, tip in xy:
        if not kind.startswith("prediction"):
            continue
        out.append(
            f'<circle class="prediction" cx="{x:.2f}" cy="{y:.2f}" r="{unit * 2:.3f}" fill="{PREDICTION_COLOR}" '
            f'stroke="#000" stroke-width="{unit * 0.4:.3f}"><title>{_e(tip)}</title></circle>'
        )
        if ":" in kind:
            out.append(
                f'<text x="{x + unit * 2.5:.2f}" y="{y - unit * 2.5:.2f}" font-size="{unit * 5:.2f}" '
                f'stroke="#fff" stroke-width="{unit * 0.8:.3f}" paint-order="stroke">'
                f"{_e(kind.split(':', 1)[1])}</text>"
            )
    return "".join(out)


def _map_svg(points: Sequence[tuple[str, float, float, str]], *, zoom: bool, css_class: str, label: str) -> str:
    """A map of the points over the country outlines; zoomed to them (2:1) when ``zoom``."""
    x0, y0, vw, vh = _view(points) if zoom else (0.0, 0.0, float(W), float(H))
    return (
        f'<svg class="{css_class}" viewBox="{x0:.1f} {y0:.1f} {vw:.1f} {vh:.1f}" role="img" aria-label="{_e(label)}">'
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="{OCEAN}"/><use href="#world"/>'
        f"{_marks(points, vw / 240, lines=zoom)}</svg>"
    )


def _record_points(rec: Mapping[str, Any]) -> list[tuple[str, float, float, str]]:
    """A located record's map points: its candidates, its metadata position and its prediction."""
    pts: list[tuple[str, float, float, str]] = []
    if rec.get("status") != "ok" or not _finite(rec.get("lat"), rec.get("lon")):
        return pts
    for c in _items(rec, "candidates"):
        if isinstance(c, Mapping) and _finite(c.get("lat"), c.get("lon")):
            tip = f"{c.get('source')} score {_num(c.get('score'), '.3f')} ({c['lat']:.4f}, {c['lon']:.4f})"
            pts.append((str(c.get("source")), float(c["lat"]), float(c["lon"]), tip))
    pos = _position(rec)
    if pos is not None:
        pts.append(("metadata", float(pos["lat"]), float(pos["lon"]), f"photo metadata ({pos.get('source')}) position"))
    pts.append(("prediction", float(rec["lat"]), float(rec["lon"]), f"prediction {rec['lat']:.4f}, {rec['lon']:.4f}"))
    return pts


def _cluemap_html(rec: Mapping[str, Any], grid: tuple[int, int]) -> str:
    cues = _items(rec, "cues")
    sets = _items(_mapping(rec, "cluemap"), "sets")
    if not sets:
        why = {"skipped": "the cluemap was switched off (use_cluemap=False)", "failed": "no usable cue list"}
        return f"<p>No clue sets: {_e(why.get(str(rec.get('cues_status')), rec.get('cues_status')))}.</p>"
    cols = grid[1]
    out = ['<ol class="cluemap">']
    for n, s in enumerate(sets, start=1):
        idx = [s.get("primary"), *(s.get("members") or [])] if isinstance(s, Mapping) else []
        items = []
        for k, i in enumerate(idx):
            if not isinstance(i, int) or not 0 <= i < len(cues):
                items.append(f"<li>cue #{_e(i)} is not in the record's cue list</li>")
                continue
            c = cues[i]
            if not isinstance(c, Mapping):
                items.append(f"<li>cue #{i} is a JSON {_kind(c)}, not an object</li>")
                continue
            patch = c.get("patch", -1)
            where = (
                f"patch {patch} (row {patch // cols + 1}, col {patch % cols + 1})"
                if isinstance(patch, int) and patch >= 0
                else "no patch"
            )
            tag = (
                f'<span class="swatch" style="border-color:{_color(n)}"></span><b>primary</b> · {where} · '
                if k == 0
                else ""
            )
            items.append(
                f'<li class="{"primary" if k == 0 else "member"}">{tag}<b class="cue">{_e(c.get("cue"))}</b>'
                f"{': ' + _e(c.get('description')) if c.get('description') else ''} "
                f"<small>S_l {_num(c.get('s_l'), '.3f')} · S_s {_num(c.get('s_s'), '.3f')} · "
                f"S_r {_num(c.get('s_r'), '.3f')}</small></li>"
            )
        out.append(f"<li>Clue set {n}<ul>{''.join(items)}</ul></li>")
    out.append("</ol>")
    return "".join(out)


def _candidates_html(rec: Mapping[str, Any]) -> str:
    pos = _position(rec)
    rows = []
    predicted = _finite(rec.get("lat"), rec.get("lon"))
    for c in _items(rec, "candidates"):
        if not isinstance(c, Mapping):
            continue
        ok = _finite(c.get("lat"), c.get("lon"))
        to_pred = distance_km(rec["lat"], rec["lon"], c["lat"], c["lon"]) if ok and predicted else None
        to_meta = distance_km(pos["lat"], pos["lon"], c["lat"], c["lon"]) if ok and pos else None
        color = _COLORS.get(str(c.get("source")), "#444")
        rows.append(
            f'<tr><td><span style="color:{color}">●</span> {_e(c.get("source"))}</td>'
            f"<td>{_num(c.get('lat'))}, {_num(c.get('lon'))}</td><td>{_num(c.get('score'), '.3f')}</td>"
            f'<td class="text">{_e(c.get("country"))} / {_e(c.get("city"))} / {_e(c.get("landmark"))}</td>'
            f"<td>{_km(to_pred)}</td><td>{_km(to_meta)}</td></tr>"
        )
    if not rows:
        return "<p>No valid candidates.</p>"
    return (
        '<table class="candidates"><thead><tr><th>source</th><th>lat, lon</th><th>score</th>'
        '<th class="text">model\'s country / city / landmark</th><th>to prediction</th><th>to metadata</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        f"<p><small>{int(rec.get('invalid_candidates') or 0)} invalid candidate(s) dropped.</small></p>"
    )


def _answers_html(rec: Mapping[str, Any]) -> str:
    """The ranked distinct answers (candidates merged within 25 km) with their confidence."""
    rows = [
        f"<tr><td>{_e(a.get('rank'))}</td><td>{_num(a.get('lat'))}, {_num(a.get('lon'))}</td>"
        f"<td>{_num(a.get('confidence'), '.3f')}</td><td>{_num(a.get('score'), '.3f')}</td>"
        f'<td class="text">{_e(", ".join(map(str, a.get("sources") or [])))}</td><td>{_km(a.get("extent_km"))}</td></tr>'
        for a in _items(rec, "answers")
        if isinstance(a, Mapping)
    ]
    if not rows:
        return "<p>No ranked answers in this record.</p>"
    refs = rec.get("references")
    photos = isinstance(refs, Mapping) and refs.get("gallery") == "photos"
    over = "candidates'" if photos else "candidates' and the nearest gallery points'"
    note = (
        "There was nothing to weigh the winner against (a lone fallback point): the prediction has no confidence. "
        if rec.get("confidence") is None
        else ""
    )
    if any(str(c.get("source")) == "region_anchor" for c in _items(rec, "candidates") if isinstance(c, Mapping)):
        note += "region_anchor is a point inside the region chosen because nothing else was in it, not a model answer. "
    return (
        '<table class="answers"><thead><tr><th>#</th><th>lat, lon</th><th>confidence</th><th>best score</th>'
        '<th class="text">merged candidates</th><th>extent</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table><p><small>{html.escape(note)}Confidence: the share of a softmax over "
        f"the {_e(over)} GPSCLIP cosines that falls on the answer; read it against a reliability table "
        "(<code>clue2geo eval --calibration</code>), not as a probability.</small></p>"
    )


def _metadata_html(rec: Mapping[str, Any]) -> str:
    meta = rec.get("metadata")
    if meta is None:
        return "<p>No metadata was read for this record.</p>"
    if not isinstance(meta, Mapping):
        raise TypeError(f"the record's 'metadata' is a JSON {_kind(meta)}, not an object")
    pos = _position(rec)
    where = (
        f"{pos['lat']:.6f}, {pos['lon']:.6f} ({_e(pos.get('source'))}"
        f"{', altitude ' + _num(pos.get('altitude_m'), '.1f', ' m') if pos.get('altitude_m') is not None else ''})"
        if pos
        else "none"
    )
    camera = " ".join(str(v) for v in (meta.get("make"), meta.get("model")) if v) or None
    problems = "".join(f"<li>{_e(p)}</li>" for p in _items(meta, "problems"))
    return (
        '<table class="kv">'
        + _rows(
            [
                ("Position in the photo's metadata", where),
                ("Distance metadata position → prediction", _km(rec.get("metadata_distance_km"))),
                ("Captured (DateTimeOriginal)", _e(meta.get("datetime_original"))),
                ("GPS time (UTC)", _e(meta.get("gps_time_utc"))),
                ("Camera", _e(camera)),
                ("Software", _e(meta.get("software"))),
                ("Format · EXIF · XMP", f"{_e(meta.get('format'))} · {_e(meta.get('exif'))} · {_e(meta.get('xmp'))}"),
            ]
        )
        + "</table>"
        + (f'<p class="warn">Malformed metadata:</p><ul>{problems}</ul>' if problems else "")
        + "<p><small>The prediction never uses the metadata: it can be forged or stripped, and a large "
        "distance between the two is evidence either way.</small></p>"
    )


def _raw_html(rec: Mapping[str, Any]) -> str:
    """Every generation of every prompt: its text as the model wrote it, and how it was made."""
    raw = rec.get("raw_outputs")
    if not raw:
        return ""
    parts = []
    for prompt, gens in raw.items() if isinstance(raw, Mapping) else ():
        for k, g in enumerate(gens if isinstance(gens, list) else [gens]):
            if isinstance(g, Mapping) and "text" in g:
                info = ", ".join(f"{key} {_e(v)}" for key, v in g.items() if key != "text")
                parts.append(f"<h4>{_e(prompt)} #{k + 1} <small>({info})</small></h4><pre>{_e(g['text'])}</pre>")
            else:
                parts.append(f"<h4>{_e(prompt)} #{k + 1}</h4><pre>{_e(_json(g))}</pre>")
    if not parts:
        parts.append(f"<pre>{_e(_json(raw))}</pre>")
    return f'<details class="raw"><summary>The model\'s raw answers</summary>{"".join(parts)}</details>'


def _custody_html(
    rec: Mapping[str, Any], thumb: Thumbnail | None, bundle_digest: str | None, results_label: str
) -> str:
    from ...runs.chain import record_hash

    rh = rec.get("record_hash")
    if isinstance(rh, str):
        check = (
            '<span class="good">matches</span>'
            if record_hash(rec) == rh
            else '<span class="bad">DOES NOT MATCH: this record was edited after it was written</span>'
        )
    else:
        check = '<span class="warn">not recorded (a record written before chaining)</span>'
    if thumb is None:
        now = "not checked (the locator failed on this input)"
    elif thumb.status == "ok":
        now = '<span class="good">the file still has this sha256</span>'
    else:
        now = f'<span class="bad">{_e(thumb.note)}</span>'
    rd = rec.get("bundle_digest")
    if bundle_digest is None:
        bcheck = "no bundle given to the report"
    elif not rd:
        bcheck = '<span class="warn">the record does not say which bundle made it</span>'
    elif rd == bundle_digest:
        bcheck = '<span class="good">the bundle given to the report is this one</span>'
    else:
        bcheck = f'<span class="warn">the bundle given to the report is another one ({_code(bundle_digest)})</span>'
    options = rec.get("options")
    opts = (
        f"<details><summary>{_code(rec.get('options_digest'))}</summary><pre>"
        f"{html.escape(_json(options, sort_keys=True))}</pre></details>"
        if isinstance(options, Mapping)
        else _code(rec.get("options_digest"))
    )
    pairs = [
        ("Started (UTC)", _e(rec.get("started_utc"))),
        ("Finished (UTC)", f"{_e(rec.get('finished_utc'))} ({_num(rec.get('seconds'), '.2f', ' s')})"),
        ("Image (as recorded)", _code(rec.get("image") or rec.get("path"))),
        ("Image sha256", f"{_code(rec.get('image_sha256'))}<br>at report time: {now}"),
        ("Bundle", f"{_e(rec.get('bundle'))} · manifest digest {_code(rd)}<br>{bcheck}"),
        ("SDK version", _e(rec.get("sdk_version"))),
        ("Options", opts),
        ("prev_hash", _code(rec.get("prev_hash"))),
        ("record_hash", f"{_code(rh)}<br>recomputed from this record: {check}"),
    ]
    return (
        '<div class="custody"><h3>Chain of custody</h3><table class="kv">'
        + _rows(pairs)
        + "</table><p>To check that no record was edited, removed or reordered since it was written, run "
        f"<code>clue2geo audit verify {_e(results_label)}</code> on the results file: it recomputes every "
        "record_hash and prev_hash link and names the first bad line.</p></div>"
    )


# -- the page ---------------------------------------------------------------------------------------

_STYLE = """
*{box-sizing:border-box}
body{font-family:sans-serif;margin:1em auto;max-width:1240px;padding:0 1em;color:#111;font-size:14px;overflow-wrap:anywhere}
h1{font-size:1.6em} h2{font-size:1.3em;border-bottom:2px solid #444;padding-bottom:.2em} h3{font-size:1.05em;break-after:avoid}
table.candidates :is(th,td):not(.text){white-space:nowrap}
table{border-collapse:collapse;margin:.5em 0;width:100%;table-layout:auto}
td,th{border:1px solid #ccc;padding:3px 5px;vertical-align:top;text-align:left;font-size:13px;overflow-wrap:anywhere}
table.kv th{width:16em;background:#f4f4f4;font-weight:normal}
code,pre{font-family:monospace;font-size:12px;overflow-wrap:anywhere;word-break:break-all}
pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em;border:1px solid #ddd}
svg.world{width:100%;height:auto;display:block;border:1px solid #999}
svg.local{width:100%;height:auto;display:block;border:1px solid #999}
svg.photo{max-width:100%;height:auto;display:block;border:1px solid #999}
.top{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:1em;align-items:start}
figure{margin:0} figcaption{font-size:12px;color:#333}
.image{margin-top:2em} .failed h2{color:#a00}
.bad{color:#b00;font-weight:bold} .good{color:#060} .warn{color:#a60;font-weight:bold}
.notice{border:2px solid #b00;background:#fee;padding:.6em;font-weight:bold;overflow-wrap:anywhere}
h4{font-size:13px;margin:.6em 0 .2em}
.swatch{display:inline-block;width:1em;height:.8em;border:3px solid;vertical-align:middle;margin-right:.3em}
.custody{border:1px solid #888;padding:.4em .8em;background:#fafafa;margin-top:1em}
.legend span{margin-right:1em}
.banner{background:#fff3cd;border:2px solid #d39e00;padding:.6em;font-weight:bold}
@page{size:A4;margin:12mm}
@media print{
  body{max-width:none;margin:0;padding:0;font-size:10pt}
  .image{break-before:page;margin-top:0}
  svg,table.kv,.custody,figure{break-inside:avoid}
  tr{break-inside:avoid}
  details>summary{list-style:none}
  details::details-content{content-visibility:visible;display:block}
  a{color:inherit;text-decoration:none}
  .banner,.notice{-webkit-print-color-adjust:exact;print-color-adjust:exact}
  svg{-webkit-print-color-adjust:exact;print-color-adjust:exact}
}
"""


def _open_bundle(bundle: Any) -> Any:
    """A Bundle from a Bundle, its folder, or (older callers) a file inside it, or None."""
    if bundle is None or hasattr(bundle, "params"):
        return bundle
    from ...bundle.manifest import Bundle

    path = Path(bundle)
    for folder in (path, *path.parents):
        if (folder / "manifest.json").is_file():
            return Bundle.open(folder, verify=False)
    raise FileNotFoundError(f"{bundle}: not a bundle (no manifest.json in it or above it)")


def _resolve(image: str, image_root: Path | None) -> Path:
    p = Path(image)
    return image_root / p if image_root is not None and not p.is_absolute() else p


def _audit_line(results_path: Path | None, trusted: Mapping[str, Any]) -> str:
    """The hash chain of the results (a journal, or a 'locate --ray' run folder) checked now, and
    their signatures (checked with the ``trusted`` keys)."""
    if results_path is None:
        return ""
    path = Path(results_path)
    try:
        if path.is_dir():
            from ...cluster import is_run_dir
            from ...cluster.shards import verify_run

            if not is_run_dir(path):
                return ""
            res = verify_run(path)
        elif path.is_file():
            from ...runs.chain import verify_journal

            res = verify_journal(path)
        else:
            return ""
    except OSError as exc:
        return f'<p class="bad">The results could not be read to check their hash chain: {_e(exc)}</p>'
    cls = "good" if res.ok else "bad"
    line = f'<p>Hash chain of the results at report time: <span class="{cls}">{_e(res.message())}</span></p>'
    return line + _signature_lines(path, trusted)


def _region_text(region: Any) -> str:
    """The record's region as the prompt stated it (a polygon's outline is in the record, not here)."""
    from ...geo.region import Region

    if not isinstance(region, dict):  # a record's region is a dict; a string could name a file
        return _json(region)
    try:
        return Region.parse(region).describe()
    except (Clue2GeoError, TypeError, ValueError, RecursionError):
        return _json(region)


def load_trusted_keys(trusted_keys: Iterable[Any] | None) -> dict[str, Any]:
    """The user's trusted public keys by key id, given as ``--trusted-key`` takes them (a key file's path
    or the key's text): a key file that is a FIFO or device is refused before it is opened (it would
    block for ever), and a key that cannot be read raises a :class:`~clue2geo_sdk.errors.Clue2GeoError`."""
    from ...bundle.signing import trusted_by_id
    from ...files import regular_file

    keys = list(trusted_keys or [])
    for k in keys:
        if isinstance(k, str | Path):
            try:
                path = Path(k).expanduser()
                named = path.exists() or path.is_symlink()
            except (OSError, ValueError):  # key text too long, or with a NUL, for a path: not a file
                named = False
            if named:
                regular_file(path, "--trusted-key")
    return trusted_by_id(keys)


def _signature_line(trust: str, cls: str, text: str, note: str = "") -> str:
    return f'<p class="signature" data-trust="{trust}">Signature: <span class="{cls}">{_e(text)}</span>{note}</p>'


def _signature_lines(target: Path, trusted: Mapping[str, Any]) -> str:
    """The examiners' signatures of the results. Green only for a signature that verifies with a key
    the user named as trusted (``trusted``, by key id); one that verifies only with the public key
    stored beside it in the signatures file is said to be unchecked (amber): whoever can write that
    file can re-sign rewritten results with a key of their own, under any examiner's name."""
    from ..attestation import fault_of, read_journal_signatures, signature_path

    try:
        sigs = read_journal_signatures(target)
    except (Clue2GeoError, OSError) as exc:
        return _signature_line("bad", "bad", str(exc))
    out: list[str] = []
    for sig in sigs:
        pub = trusted.get(sig.key_id)
        try:
            fault = fault_of(target, sig, pub)
        except (Clue2GeoError, OSError) as exc:
            fault = f"key {sig.key_id}: cannot be checked ({exc})"
        if fault is not None:
            out.append(_signature_line("bad", "bad", fault))
        elif pub is not None:
            text = f"Signed by {sig.describe()}: checked against your trusted key {sig.key_id}"
            out.append(_signature_line("trusted", "good", text, "; these results are what that key signed"))
        else:
            text = f"not checked against a key you trust: {sig.describe()}"
            note = (
                " (it verifies only against the public key stored in the signatures file itself, which shows "
                "these results are what that key signed, not whose key it is: anyone who can write the file can "
                "sign with a key of their own under any name. Check it with the examiner's public key: "
                "<code>clue2geo report --trusted-key</code> or <code>clue2geo audit verify --trusted-key</code>)"
            )
            out.append(_signature_line("untrusted", "warn", text, note))
    if trusted and not any(s.key_id in trusted for s in sigs):  # (one by a trusted key that fails said why)
        given = ", ".join(trusted)
        why = (
            f"no signature by a key you trust ({given}): the results are signed only by key(s) "
            f"{', '.join(s.key_id for s in sigs)}"
            if sigs
            else f"not signed (no {signature_path(target).name}), and trusted key(s) {given} were given"
        )
        out.append(_signature_line("bad", "bad", why))
    return "".join(out)


def _overview_points(records: Sequence[Any]) -> list[tuple[str, float, float, str]]:
    """Every prediction (numbered; images predicted at the same place share one marker, "1, 3") and
    every metadata position, for the overview map. A record whose points cannot be read is left off
    (its own section says why)."""
    at: dict[tuple[float, float], list[str]] = {}
    metadata = []
    for n, r in enumerate(records, start=1):
        try:
            points = _record_points(r) if isinstance(r, Mapping) else []
        except Exception:  # noqa: BLE001 - a malformed record: its section names the fault
            continue
        for kind, lat, lon, tip in points:
            if kind == "prediction":
                at.setdefault((round(lat, 4), round(lon, 4)), []).append(str(n))
            elif kind == "metadata":
                metadata.append((kind, lat, lon, f"#{n}: {tip}"))
    preds = [
        (f"prediction:{', '.join(ns)}", lat, lon, f"#{', #'.join(ns)}: prediction {lat:.4f}, {lon:.4f}")
        for (lat, lon), ns in at.items()
    ]
    return metadata + preds


def _why(exc: BaseException) -> str:
    """An exception as one short line for the page."""
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text[:300]}{'…' if len(text) > 300 else ''}"


def _guarded(part: str, render: Callable[[], str]) -> str:
    """One part of a record's section; a part that cannot be drawn from this record's fields (a
    results file is untrusted input: hand-edited, or written by another tool) is named instead, and
    the rest of the record and of the report is still shown."""
    try:
        return render()
    except Exception as exc:  # noqa: BLE001 - any fault in one part must not lose the report
        return f'<p class="bad part-failed" data-part="{_e(part)}">{_e(part)} could not be shown: {_e(_why(exc))}</p>'


def _unshown(n: int, rec: Any, exc: BaseException) -> tuple[str, str]:
    """The index row and section of a record that cannot be shown at all."""
    path = rec.get("path") or rec.get("image") if isinstance(rec, Mapping) else None
    try:
        name = _e(path)
    except Exception:  # noqa: BLE001 - a path whose str() fails
        name = "—"
    why = f"record {n} could not be shown: {_why(exc)}"
    row = (
        f'<tr><td>{n}</td><td><a href="#image-{n}">{name}</a></td><td class="bad">not shown</td>'
        f'<td colspan="3">{_e(why)}</td></tr>'
    )
    section = (
        f'<section class="image unshown" id="image-{n}" data-status="unshown"><h2>#{n} {name}: not shown</h2>'
        f'<p class="notice">{_e(why)}</p><p>The record is in the results file as written; '
        "<code>clue2geo audit verify</code> checks whether it was edited.</p></section>"
    )
    return row, section


def _entry(
    n: int, r: Any, grid: tuple[int, int], bundle_digest: str | None, results_label: str, image_root: Path | None
) -> tuple[str, str, str]:
    """A record's kind ("ok" or "failed"), index row and section."""
    if not isinstance(r, Mapping):
        raise TypeError(f"a {type(r).__name__}, not a record (a JSON object)")
    path = r.get("path") or r.get("image")
    if r.get("status") == "ok":
        place = ", ".join(str(v) for v in (r.get("city"), r.get("admin1"), r.get("country")) if v) or None
        row = (
            f'<tr><td>{n}</td><td><a href="#image-{n}">{_e(path)}</a></td><td>ok</td>'
            f"<td>{_num(r.get('lat'))}, {_num(r.get('lon'))}<br>{_e(place)}</td>"
            f"<td>{_num(r.get('confidence'), '.3f')}</td><td>{_km(r.get('metadata_distance_km'))}</td></tr>"
        )
        return "ok", row, _ok_section(n, r, grid, bundle_digest, results_label, image_root)
    row = (
        f'<tr><td>{n}</td><td><a href="#image-{n}">{_e(path)}</a></td><td class="bad">failed</td>'
        f'<td colspan="3">{_e(r.get("error"))}: {_e(r.get("message"))}</td></tr>'
    )
    return "failed", row, _failed_section(n, r, bundle_digest, results_label)


def _problems_html(problems: Sequence[str] | None) -> str:
    """The problems met reading the results, as a notice (nothing when there were none)."""
    lines = [str(p) for p in problems or ()]
    if not lines:
        return ""
    items = "".join(f"<li>{_e(p)}</li>" for p in lines)
    return (
        f'<div class="notice" id="results-problems"><p>{len(lines)} problem(s) reading the results: what they '
        f"name is not in this report.</p><ul>{items}</ul></div>"
    )


def _grid(b: Any) -> tuple[tuple[int, int], str]:
    """The bundle's CLIP patch grid (rows, cols), and a note when its value is unusable (3x3 then)."""
    if b is None:
        return (3, 3), ""
    raw = b.params("clip").get("patch_grid", [3, 3])
    if (
        isinstance(raw, list | tuple)
        and len(raw) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 64 for v in raw)
    ):
        return (raw[0], raw[1]), ""
    return (3, 3), f" (its clip.patch_grid {_json(raw)[:80]} is not two small positive integers)"


def render_report(
    records: Iterable[Mapping[str, Any]],
    bundle: Any = None,
    *,
    title: str = "clue2geo case report",
    image_root: Path | None = None,
    results_path: Path | None = None,
    trusted_keys: Sequence[str] | None = None,
    problems: Sequence[str] | None = None,
) -> str:
    """The case report of ``records`` (latest record per image) as one HTML string.

    ``bundle`` (a :class:`~clue2geo_sdk.bundle.manifest.Bundle` or its folder) gives the CLIP patch grid the
    outlines are drawn on (3x3 without one). Relative image paths are read from ``image_root`` (else
    the current folder). ``results_path``, the journal the records came from, is hashed, checked with
    :func:`clue2geo_sdk.runs.chain.verify_journal` and named in the custody blocks; its signatures are shown
    as holding (green) only when made by one of ``trusted_keys`` (public key files or key text, as
    ``--trusted-key`` takes them). A record with fields of the wrong type is shown as far as it can be,
    and a part (or a record) that cannot be drawn is named, never failing the whole report.
    ``problems``: what was wrong reading the results (records left out, unreadable or torn lines), one
    line each, listed at the top so that a reader of the report knows what it does not show.
    """
    records = list(records)
    trusted = load_trusted_keys(trusted_keys)
    b = _open_bundle(bundle)
    grid, grid_fault = _grid(b)
    bundle_digest = b.digest if b is not None else None
    demo = any(isinstance(r, Mapping) and r.get("demo") for r in records)
    results_label = str(results_path) if results_path is not None else "RESULTS"

    overview = _overview_points(records)
    index_rows, sections = [], []
    counts = {"ok": 0, "failed": 0, "unshown": 0}
    for n, r in enumerate(records, start=1):
        try:
            kind, row, section = _entry(n, r, grid, bundle_digest, results_label, image_root)
        except Exception as exc:  # noqa: BLE001 - one malformed record must not lose the report
            kind, (row, section) = "unshown", _unshown(n, r, exc)
        counts[kind] += 1
        index_rows.append(row)
        sections.append(section)

    banner = (
        '<p id="demo-warning" class="banner" role="alert">'
        "Made with a demo bundle (random-weight models): these locations are meaningless. "
        "They show the plumbing only; do not use them as evidence.</p>"
        if demo
        else ""
    )
    source = ""
    if results_path is not None and Path(results_path).is_file():
        digest = hashlib.sha256(Path(results_path).read_bytes()).hexdigest()
        source = f"<br>Results file: {_code(results_path)} (sha256 {_code(digest)})"
    elif results_path is not None:
        source = f"<br>Results: {_code(results_path)}"
    grid_note = (
        f"{grid[0]}x{grid[1]} from bundle {_e(b.name)} ({_code(bundle_digest)}){_e(grid_fault)}"
        if b is not None
        else "3x3 assumed (no bundle given)"
    )
    legend = "".join(f'<span><span style="color:{c}">●</span> {s}</span>' for s, c in _COLORS.items())
    data = html.escape(json.dumps({**counts, "demo": demo}, allow_nan=False))
    unshown = f", {counts['unshown']} could not be shown" if counts["unshown"] else ""
    generated = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{_e(title)}</title><style>{_STYLE}</style></head>
<body data-summary="{data}">
<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>
<path id="world" d="{world_path()}" fill="{LAND}" stroke="{BORDER}" stroke-width="0.6" fill-rule="evenodd"
 vector-effect="non-scaling-stroke" stroke-linejoin="round"/></defs></svg>
<header><h1>{_e(title)}</h1>
{banner}
<p>{counts["ok"]} located, {counts["failed"]} failed{unshown}. Generated {generated} by clue2geo SDK {_e(__version__)}.{source}
<br>CLIP patch grid: {grid_note}.</p>
{_problems_html(problems)}
{_audit_line(results_path, trusted)}
{_map_svg(overview, zoom=False, css_class="world", label="all predictions")}
<p class="legend"><span><span style="color:{PREDICTION_COLOR}">●</span> prediction (numbered)</span>
<span>◇ position in the photo's metadata</span>{legend}</p>
<p><small>Country outlines: Natural Earth 1:10m admin-0 (public domain), drawn offline.</small></p>
</header>
<h2>Images</h2>
<table class="index"><thead><tr><th>#</th><th>image</th><th>status</th><th>prediction</th><th>confidence</th>
<th>metadata distance</th></tr></thead><tbody>{"".join(index_rows)}</tbody></table>
{"".join(sections)}
</body></html>
"""


def _thumb_of(rec: Mapping[str, Any], image_root: Path | None) -> Thumbnail:
    """The record's photo as found now; a path that cannot even be looked up is said, not raised."""
    image = rec.get("image") or rec.get("path")
    if not image:
        return Thumbnail(status="unknown", path="", note="the record names no image file")
    sha = rec.get("image_sha256")
    try:
        return load_thumbnail(_resolve(str(image), image_root), sha if isinstance(sha, str) else None)
    except (OSError, ValueError) as exc:  # a NUL in the path, a name too long, a permission refused
        return Thumbnail(status="unreadable", path=str(image), note=f"the image cannot be read at report time: {exc}")


def _figure(rec: Mapping[str, Any], thumb: Thumbnail, grid: tuple[int, int]) -> str:
    if thumb.status != "ok":
        return f'<div class="notice thumb-{thumb.status}" data-thumb="{thumb.status}">{_e(thumb.note)}</div>'
    photo, notes = _photo_svg(rec, thumb, grid)
    notes_html = "".join(f'<p class="warn">{_e(x)}</p>' for x in notes)
    return (
        f'<figure class="thumb">{photo}<figcaption>The photo as read at report time (sha256 matches). '
        f"Dashed: the {grid[0]}x{grid[1]} CLIP patch grid; outlined: the patch that matched each clue "
        f"set's primary cue best (S_l).</figcaption>{notes_html}</figure>"
    )


def _summary(rec: Mapping[str, Any]) -> str:
    place = ", ".join(str(v) for v in (rec.get("city"), rec.get("admin1"), rec.get("country")) if v) or None
    where = f"<b>{_num(rec.get('lat'))}, {_num(rec.get('lon'))}</b> · {_e(place)}"
    if not _finite(rec.get("lat"), rec.get("lon")):
        where += (
            f' <span class="bad">the record\'s lat/lon ({_e(_json(rec.get("lat")))}, {_e(_json(rec.get("lon")))}) '
            "are not finite numbers</span>"
        )
    region = []
    if rec.get("region"):
        dropped = rec.get("outside_region") or 0
        dropped_text = str(dropped) if isinstance(dropped, int) else _e(_json(dropped))
        region = [("Region", f"{_e(_region_text(rec['region']))} · {dropped_text} outside dropped")]
    return _rows(
        [
            ("Prediction", where),
            (
                "Model's answer",
                f"{_e(rec.get('model_country'))} / {_e(rec.get('model_city'))} / {_e(rec.get('landmark'))}",
            ),
            ("Confidence", _num(rec.get("confidence"), ".3f")),
            ("Won by", f"{_e(rec.get('source'))}{' · fallback' if rec.get('fallback') else ''}"),
            ("Candidate spread", _km(rec.get("spread_km"))),
            ("Metadata position → prediction", _km(rec.get("metadata_distance_km"))),
            ("Cues", _e(rec.get("cues_status"))),
            *region,
        ]
    )


def _ok_section(
    n: int,
    rec: Mapping[str, Any],
    grid: tuple[int, int],
    bundle_digest: str | None,
    results_label: str,
    image_root: Path | None,
) -> str:
    thumb = _thumb_of(rec, image_root)
    figure = _guarded("The photo", lambda: _figure(rec, thumb, grid))
    summary = _guarded("The summary", lambda: f'<table class="kv">{_summary(rec)}</table>')
    local = _guarded(
        "The map", lambda: _map_svg(_record_points(rec), zoom=True, css_class="local", label=f"map of image {n}")
    )
    return f"""<section class="image ok" id="image-{n}" data-status="ok" data-thumb="{thumb.status}">
<h2>#{n} {_e(rec.get("path"))}</h2>
<div class="top">{figure}<div>{summary}{local}</div></div>
<h3>Cluemap</h3>{_guarded("The cluemap", lambda: _cluemap_html(rec, grid))}
<h3>Answers</h3>{_guarded("The answers", lambda: _answers_html(rec))}
<h3>Candidates</h3>{_guarded("The candidates", lambda: _candidates_html(rec))}
<h3>Photo metadata</h3>{_guarded("The photo metadata", lambda: _metadata_html(rec))}
{_guarded("The raw answers", lambda: _raw_html(rec))}
{_guarded("The chain of custody", lambda: _custody_html(rec, thumb, bundle_digest, results_label))}
</section>"""


def _failed_section(n: int, rec: Mapping[str, Any], bundle_digest: str | None, results_label: str) -> str:
    custody = _guarded("The chain of custody", lambda: _custody_html(rec, None, bundle_digest, results_label))
    return f"""<section class="image failed" id="image-{n}" data-status="error">
<h2>#{n} {_e(rec.get("path") or rec.get("image"))}: failed</h2>
<p class="notice">{_e(rec.get("error"))}: {_e(rec.get("message"))}</p>
{custody}
</section>"""


def write_report(
    path: Path,
    records: Iterable[Mapping[str, Any]],
    bundle: Any = None,
    *,
    title: str = "clue2geo case report",
    image_root: Path | None = None,
    results_path: Path | None = None,
    trusted_keys: Sequence[str] | None = None,
    problems: Sequence[str] | None = None,
) -> Path:
    """Write :func:`render_report` to ``path`` (UTF-8); returns ``path``. ``trusted_keys``: the public
    keys (files or key text, as ``report --trusted-key`` takes them) a signature must be made with to
    be shown as holding; a key that cannot be read raises before anything is written."""
    text = render_report(
        records,
        bundle,
        title=title,
        image_root=image_root,
        results_path=results_path,
        trusted_keys=trusted_keys,
        problems=problems,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
