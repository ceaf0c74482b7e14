"""The report's pictures, drawn offline as inline SVG: the photo with its matched patches, and maps.

The photo is read again at report time and embedded only when its sha256 is still the record's
(:func:`load_thumbnail`); patches are outlined with the same integer arithmetic as
:func:`clue2geo_sdk.engines.encoders.patch_grid` (:func:`patch_box`). Maps are an equirectangular
world of Natural Earth country outlines (:func:`world_path`, defined once per page and reused)
with the candidates, the metadata position and the prediction marked on it.
"""

from __future__ import annotations

import base64
import functools
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from ...errors import ImageLoadError
from ...geo.countries import countries
from ...inputs.image import load_image
from ...runs.records import Record
from .style import esc, finite, list_field, num, object_field

W, H = 1440, 720  # the equirectangular world: 4 units per degree
THUMB_MAX = 480  # longest side of an embedded thumbnail, px
OUTLINE_TOLERANCE_DEG = 0.2
LAND, OCEAN, BORDER = "#cfe0c3", "#dbe9f6", "#6f8a62"
CUE_COLORS = ("#e6194b", "#f58231", "#911eb4")  # clue sets 1, 2, 3 (primary cues' patch outlines)
METADATA_COLOR = "#000000"
PREDICTION_COLOR = "#ff7f0e"
SOURCE_COLORS = {
    "direct": "#d62728",
    "rag5": "#1f77b4",
    "rag10": "#2ca02c",
    "rag15": "#9467bd",
    "gallery_nearest": "#8c564b",
    "region_anchor": "#7f7f7f",  # a point inside the region, not a model answer
}

#: A map point: (kind, lat, lon, tooltip); kind is "prediction" (or "prediction:N"), "metadata" or a source.
Point = tuple[str, float, float, str]


# -- geometry ---------------------------------------------------------------------------------------


def xy(lat: float, lon: float) -> tuple[float, float]:
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


@functools.cache
def world_path(tolerance_deg: float = OUTLINE_TOLERANCE_DEG) -> str:
    """SVG path data of every country ring (Natural Earth admin-0, simplified), in world units."""
    parts = []
    for ring in countries().outline(tolerance_deg=tolerance_deg):
        pts = [xy(lat, lon) for lon, lat in ring]
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
    size: tuple[int, int] | None = None  # the decoded, upright image the pipeline worked on (what the patches cut)
    original_size: tuple[int, int] | None = None  # the photo's full size, upright (before any reduction on loading)
    thumb_size: tuple[int, int] | None = None
    data_uri: str | None = attrs.field(default=None, repr=False)


def load_thumbnail(path: Path, expected_sha256: str | None, *, max_side: int = THUMB_MAX) -> Thumbnail:
    """Read the photo again and check it is the one the record describes before embedding it."""
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
        original_size=img.original_size or (w, h),
        thumb_size=(tw, th),
        data_uri=uri,
        note="sha256 matches the record",
    )


def clue_sets(rec: Record) -> list[Any]:
    """The record's clue sets (its cluemap's ``sets``); a field of the wrong type is a TypeError naming it."""
    return list_field(object_field(rec.cluemap, "cluemap").get("sets"), "sets")


def primaries(rec: Record) -> list[tuple[int, int]]:
    """(clue set number, cue index) of each primary cue, from the record's cluemap."""
    cues = list_field(rec.cues, "cues")
    out = []
    for n, s in enumerate(clue_sets(rec), start=1):
        i = s.get("primary") if isinstance(s, Mapping) else None
        if isinstance(i, int) and 0 <= i < len(cues) and isinstance(cues[i], Mapping):
            out.append((n, i))
    return out


def cue_color(n: int) -> str:
    """The outline colour of clue set ``n`` (1-based)."""
    return CUE_COLORS[(n - 1) % len(CUE_COLORS)]


def _grid_lines(size: tuple[int, int], thumb_size: tuple[int, int], grid: tuple[int, int]) -> str:
    """The patch grid's inner lines, in thumbnail pixels."""
    (w, h), (tw, th), (rows, cols) = size, thumb_size, grid
    sx, sy = tw / w, th / h
    return "".join(
        f'<line x1="{c * w // cols * sx:.1f}" y1="0" x2="{c * w // cols * sx:.1f}" y2="{th}"/>' for c in range(1, cols)
    ) + "".join(
        f'<line x1="0" y1="{r * h // rows * sy:.1f}" x2="{tw}" y2="{r * h // rows * sy:.1f}"/>' for r in range(1, rows)
    )


def _outline(n: int, cue: Mapping[str, Any], box: tuple[int, int, int, int], scale: tuple[float, float]) -> str:
    """Clue set ``n``'s outline around its primary cue's patch ``box`` (image pixels), with its number."""
    (left, top, right, bottom), (sx, sy) = box, scale
    inset = 1.5 + 3.0 * (n - 1)  # nested, so outlines of cues sharing a patch stay visible
    x, y = left * sx + inset, top * sy + inset
    bw, bh = max(1.0, (right - left) * sx - 2 * inset), max(1.0, (bottom - top) * sy - 2 * inset)
    return (
        f'<rect class="cue-outline" data-set="{n}" data-patch="{cue.get("patch", -1)}" x="{x:.1f}" y="{y:.1f}" '
        f'width="{bw:.1f}" height="{bh:.1f}" fill="none" stroke="{cue_color(n)}" stroke-width="3">'
        f"<title>clue set {n}: {esc(cue.get('cue'))}</title></rect>"
        f'<text x="{x + 4:.1f}" y="{y + 18:.1f}" fill="{cue_color(n)}" stroke="#fff" stroke-width="3" '
        f'paint-order="stroke" font-size="16" font-weight="bold">{n}</text>'
    )


def photo_svg(rec: Record, thumb: Thumbnail, grid: tuple[int, int]) -> tuple[str, list[str]]:
    """The thumbnail with the faint patch grid and each primary cue's patch outlined; and notes."""
    assert thumb.data_uri and thumb.size and thumb.thumb_size
    (w, h), (tw, th) = thumb.size, thumb.thumb_size
    outlines, notes = [], []
    cues = list_field(rec.cues, "cues")
    for n, i in primaries(rec):
        patch = cues[i].get("patch", -1)
        if not isinstance(patch, int) or patch < 0:
            notes.append(f"clue set {n}: its primary cue has no matched patch")
            continue
        try:
            box = patch_box((w, h), grid, patch)
        except ValueError as exc:
            notes.append(f"clue set {n}: {exc} (the bundle's grid is not the one that made this record?)")
            continue
        outlines.append(_outline(n, cues[i], box, (tw / w, th / h)))
    svg = (
        f'<svg class="photo" viewBox="0 0 {tw} {th}" width="{tw}" height="{th}" role="img" '
        f'aria-label="photo with matched patches">'
        f'<image href="{thumb.data_uri}" x="0" y="0" width="{tw}" height="{th}"/>'
        f'<g stroke="#fff" stroke-opacity=".45" stroke-width="1" stroke-dasharray="4 4">'
        f"{_grid_lines((w, h), (tw, th), grid)}</g>"
        f"{''.join(outlines)}</svg>"
    )
    return svg, notes


# -- maps -------------------------------------------------------------------------------------------


def _view(points: Sequence[Point]) -> tuple[float, float, float, float]:
    """A 2:1 view box around the points (at least 20 degrees wide), inside the world."""
    pts = [xy(lat, lon) for _, lat, lon, _ in points]
    if not pts:
        return 0.0, 0.0, float(W), float(H)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    vw = min(float(W), max(80.0, (max(xs) - min(xs)) * 1.4, (max(ys) - min(ys)) * 1.4 * 2))
    vh = vw / 2
    return min(max(cx - vw / 2, 0.0), W - vw), min(max(cy - vh / 2, 0.0), H - vh), vw, vh


def _marks(points: Sequence[Point], unit: float, *, lines: bool) -> str:
    """Markers for (kind, lat, lon, tooltip) points: kind "prediction" (or "prediction:N", drawn with
    its number), "metadata" or a candidate source. ``lines`` joins each candidate and the metadata
    position to the prediction. ``unit`` scales markers with the view, so they look alike at any zoom."""
    placed = [(xy(lat, lon), kind, tip) for kind, lat, lon, tip in points]
    preds = [p for p, kind, _ in placed if kind.startswith("prediction")]
    out = []
    for (x, y), kind, _tip in placed:
        if kind.startswith("prediction"):
            continue
        color = METADATA_COLOR if kind == "metadata" else SOURCE_COLORS.get(kind, "#444")
        dash = f' stroke-dasharray="{unit * 1.5:.3f} {unit:.3f}"' if kind == "metadata" else ""
        if lines:
            out.extend(
                f'<line x1="{px:.2f}" y1="{py:.2f}" x2="{x:.2f}" y2="{y:.2f}" stroke="{color}" '
                f'stroke-width="{unit * 0.35:.3f}" opacity=".7"{dash}/>'
                for px, py in preds
            )
    for (x, y), kind, tip in placed:
        if kind.startswith("prediction") or kind == "metadata":
            continue
        out.append(
            f'<circle class="candidate" cx="{x:.2f}" cy="{y:.2f}" r="{unit * 1.2:.3f}" '
            f'fill="{SOURCE_COLORS.get(kind, "#444")}" stroke="#fff" stroke-width="{unit * 0.25:.3f}">'
            f"<title>{esc(tip)}</title></circle>"
        )
    for (x, y), kind, tip in placed:
        if kind == "metadata":
            s = unit * 1.6
            out.append(
                f'<rect class="metadata-position" x="{x - s:.2f}" y="{y - s:.2f}" width="{2 * s:.3f}" '
                f'height="{2 * s:.3f}" fill="#fff" stroke="{METADATA_COLOR}" stroke-width="{unit * 0.6:.3f}" '
                f'transform="rotate(45 {x:.2f} {y:.2f})"><title>{esc(tip)}</title></rect>'
            )
    out.extend(_prediction_marks(placed, unit))
    return "".join(out)


def _prediction_marks(placed: Sequence[tuple[tuple[float, float], str, str]], unit: float) -> list[str]:
    """The predictions, drawn last (on top), each with its record numbers when it has them."""
    out = []
    for (x, y), kind, tip in placed:
        if not kind.startswith("prediction"):
            continue
        out.append(
            f'<circle class="prediction" cx="{x:.2f}" cy="{y:.2f}" r="{unit * 2:.3f}" fill="{PREDICTION_COLOR}" '
            f'stroke="#000" stroke-width="{unit * 0.4:.3f}"><title>{esc(tip)}</title></circle>'
        )
        if ":" in kind:
            out.append(
                f'<text x="{x + unit * 2.5:.2f}" y="{y - unit * 2.5:.2f}" font-size="{unit * 5:.2f}" '
                f'stroke="#fff" stroke-width="{unit * 0.8:.3f}" paint-order="stroke">'
                f"{esc(kind.split(':', 1)[1])}</text>"
            )
    return out


def map_svg(points: Sequence[Point], *, zoom: bool, css_class: str, label: str) -> str:
    """A map of the points over the country outlines; zoomed to them (2:1) when ``zoom``."""
    x0, y0, vw, vh = _view(points) if zoom else (0.0, 0.0, float(W), float(H))
    return (
        f'<svg class="{css_class}" viewBox="{x0:.1f} {y0:.1f} {vw:.1f} {vh:.1f}" role="img" aria-label="{esc(label)}">'
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="{OCEAN}"/><use href="#world"/>'
        f"{_marks(points, vw / 240, lines=zoom)}</svg>"
    )


def record_points(rec: Record) -> list[Point]:
    """A located record's map points: its candidates, its metadata position and its prediction."""
    pts: list[Point] = []
    if not rec.ok or not finite(rec.lat, rec.lon):
        return pts
    for c in list_field(rec.candidates, "candidates"):
        if isinstance(c, Mapping) and finite(c.get("lat"), c.get("lon")):
            tip = f"{c.get('source')} score {num(c.get('score'), '.3f')} ({c['lat']:.4f}, {c['lon']:.4f})"
            pts.append((str(c.get("source")), float(c["lat"]), float(c["lon"]), tip))
    pos = rec.metadata_position
    if pos is not None:
        pts.append(("metadata", float(pos["lat"]), float(pos["lon"]), f"photo metadata ({pos.get('source')}) position"))
    pts.append(("prediction", float(rec.lat), float(rec.lon), f"prediction {rec.lat:.4f}, {rec.lon:.4f}"))
    return pts


def overview_points(records: Sequence[Any]) -> list[Point]:
    """Every prediction (numbered; images predicted at the same place share one marker, "1, 3") and
    every metadata position, for the overview map. A record whose points cannot be read, or an entry
    that is no :class:`Record`, is left off (its own section says why)."""
    at: dict[tuple[float, float], list[str]] = {}
    metadata = []
    for n, r in enumerate(records, start=1):
        try:
            points = record_points(r) if isinstance(r, Record) else []
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
