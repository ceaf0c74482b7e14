"""Results as KML / KMZ, for Google Earth, QGIS and other GIS tools an examiner already has.

``clue2geo export run.jsonl --to case.kml`` (or ``--to case.kmz``) writes, per located image (latest
record per image), a folder holding: the prediction (a placemark named after the image file, its
description giving lat/lon, confidence and source), the other answers (rank 2 and on) in their own
style, a circle of the winning answer's ``extent_km`` (when it is above 0) and, when the photo's own
metadata claims a position, that position and a line from it to the prediction. Failed records are
not placemarks: the document's description counts and names them. A ``.kmz`` is a zip of ``doc.kml``
and ``files/<n>.jpg`` thumbnails, shown in the prediction's description; a photo is read again and
embedded only when its sha256 is still the record's (:func:`~.report.figures.load_thumbnail`).
Written with the standard library's ElementTree; all or nothing (:func:`clue2geo_sdk.files.atomic_write`).
"""

from __future__ import annotations

import base64
import html
import io
import math
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from ..files import atomic_write
from ..geo.distance import EARTH_RADIUS_KM
from ..runs.records import Record, is_finite_number
from ..sanitize import clean_text
from .report.figures import load_thumbnail

KML_NS = "http://www.opengis.net/kml/2.2"
CIRCLE_POINTS = 72  # vertices of the uncertainty circle (every 5 degrees of bearing)
KMZ_THUMB_MAX = 320  # longest side of a KMZ thumbnail, px
DEMO_NOTE = "DEMO bundle: these results are meaningless (random models), for trying the tool only."

#: style id -> (colour as KML aabbggrr, icon scale or line width, polygon fill colour or None)
STYLES: dict[str, tuple[str, float, str | None]] = {
    "prediction": ("ff0e7fff", 1.3, None),  # orange, as the HTML report's prediction
    "alternative": ("ffb4771f", 0.8, None),  # blue, smaller
    "metadata": ("ff000000", 1.0, None),  # black: what the photo's own metadata claims
    "uncertainty": ("ff0e7fff", 2.0, "400e7fff"),  # orange outline, translucent fill
    "metadata-link": ("ff000000", 2.0, None),
}

ET.register_namespace("", KML_NS)


def xml_text(value: Any, max_len: int = 500) -> str:
    """``value`` as text XML 1.0 can hold: control characters, lone surrogates and U+FFFE/U+FFFF
    removed (a journal's strings are untrusted: a hand-edited file may hold any of them)."""
    text = clean_text(value, max_len) or ""
    return "".join(ch for ch in text if not ("\ud800" <= ch <= "\udfff" or ch in "\ufffe\uffff"))


def _sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
    el = ET.SubElement(parent, f"{{{KML_NS}}}{tag}")
    if text is not None:
        el.text = text
    return el


def _coord(lat: float, lon: float) -> str:
    return f"{lon:.7f},{lat:.7f},0"


def circle(lat: float, lon: float, radius_km: float, points: int = CIRCLE_POINTS) -> list[tuple[float, float]]:
    """A closed ring of (lat, lon) ``radius_km`` from the centre along great circles (a spherical Earth)."""
    d = radius_km / EARTH_RADIUS_KM
    p1, l1 = math.radians(lat), math.radians(lon)
    ring = []
    for i in range(points):
        b = 2 * math.pi * i / points
        p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b))
        l2 = l1 + math.atan2(math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
        ring.append((math.degrees(p2), (math.degrees(l2) + 540.0) % 360.0 - 180.0))
    return [*ring, ring[0]]


def _styles(doc: ET.Element) -> None:
    for sid, (color, size, fill) in STYLES.items():
        style = _sub(doc, "Style")
        style.set("id", sid)
        if sid in ("prediction", "alternative", "metadata"):
            icon = _sub(style, "IconStyle")
            _sub(icon, "color", color)
            _sub(icon, "scale", f"{size}")
            continue
        line = _sub(style, "LineStyle")
        _sub(line, "color", color)
        _sub(line, "width", f"{size}")
        if fill is not None:
            _sub(_sub(style, "PolyStyle"), "color", fill)


def _placemark(parent: ET.Element, name: str, style: str, description: str | None = None) -> ET.Element:
    pm = _sub(parent, "Placemark")
    _sub(pm, "name", xml_text(name))
    if description is not None:
        _sub(pm, "description", description)
    _sub(pm, "styleUrl", f"#{style}")
    return pm


def _point(pm: ET.Element, lat: float, lon: float) -> None:
    _sub(_sub(pm, "Point"), "coordinates", _coord(lat, lon))


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if is_finite_number(value) else "unknown"


def image_name(rec: Record) -> str:
    """The name a record's placemark carries: its image file's name (else its path as given)."""
    image = rec.image or rec.path or ""
    return xml_text(Path(str(image)).name or image) or "(unnamed image)"


def prediction_html(rec: Record, thumbnail: str | None = None) -> str:
    """The prediction placemark's description (HTML, each value escaped); ``thumbnail``: the KMZ path of its photo."""
    rows = [
        ("image", xml_text(rec.image or rec.path)),
        ("latitude", _number(rec.lat, ".6f")),
        ("longitude", _number(rec.lon, ".6f")),
        ("confidence", _number(rec.confidence, ".4f")),
        ("source", xml_text(rec.source) or "unknown"),
        ("place", ", ".join(p for p in (xml_text(rec.city), xml_text(rec.country)) if p) or "unknown"),
        ("image sha256", xml_text(rec.image_sha256) or "unrecorded"),
    ]
    body = "".join(f"<tr><th>{k}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    img = f'<img src="{html.escape(thumbnail)}"/><br/>' if thumbnail else ""
    demo = f"<p><b>{DEMO_NOTE}</b></p>" if rec.demo else ""
    return f"{demo}{img}<table>{body}</table>"


def winning_extent_km(rec: Record) -> float | None:
    """The winning answer's (rank 1) ``extent_km`` when it is a finite number above 0, else None."""
    for a in rec.answers if isinstance(rec.answers, list) else ():
        if isinstance(a, Mapping) and a.get("rank") == 1:
            ext = a.get("extent_km")
            return float(ext) if is_finite_number(ext) and ext > 0 else None
    return None


def _alternative(folder: ET.Element, name: str, a: Mapping[str, Any]) -> None:
    desc = (
        f"answer rank {int(a['rank'])}: {a['lat']:.6f}, {a['lon']:.6f}; "
        f"confidence {_number(a.get('confidence'), '.4f')}; "
        f"sources {xml_text(', '.join(map(str, a.get('sources') or [])) or 'unknown')}"
    )
    _point(_placemark(folder, f"{name} (alternative {int(a['rank'])})", "alternative", desc), a["lat"], a["lon"])


def _uncertainty(folder: ET.Element, name: str, rec: Record, extent: float) -> None:
    pm = _placemark(folder, f"{name} (extent {extent:.1f} km)", "uncertainty")
    ring = _sub(_sub(_sub(pm, "Polygon"), "outerBoundaryIs"), "LinearRing")
    _sub(ring, "coordinates", " ".join(_coord(la, lo) for la, lo in circle(rec.lat, rec.lon, extent)))


def _metadata(folder: ET.Element, name: str, rec: Record, pos: Mapping[str, Any]) -> None:
    lat, lon = float(pos["lat"]), float(pos["lon"])
    dist = _number(rec.metadata_distance_km, ".1f")
    desc = f"the photo's own metadata position: {lat:.6f}, {lon:.6f} ({dist} km from the prediction)"
    _point(_placemark(folder, f"{name} (metadata position)", "metadata", desc), lat, lon)
    link = _placemark(folder, f"{name} (metadata to prediction)", "metadata-link")
    line = _sub(link, "LineString")
    _sub(line, "tessellate", "1")
    _sub(line, "coordinates", f"{_coord(lat, lon)} {_coord(rec.lat, rec.lon)}")


def record_folder(doc: ET.Element, rec: Record, thumbnail: str | None = None) -> None:
    """One located record as a folder: its prediction, alternatives, uncertainty circle and metadata position."""
    name = image_name(rec)
    folder = _sub(doc, "Folder")
    _sub(folder, "name", name)
    _point(_placemark(folder, name, "prediction", prediction_html(rec, thumbnail)), rec.lat, rec.lon)
    for a in rec.alternatives():
        _alternative(folder, name, a)
    if (extent := winning_extent_km(rec)) is not None:
        _uncertainty(folder, name, rec, extent)
    if (pos := rec.metadata_position) is not None:
        _metadata(folder, name, rec, pos)


def located(records: Iterable[Record]) -> list[Record]:
    """The records that are placemarks: "ok" with a finite latitude and longitude."""
    return [r for r in records if r.ok and is_finite_number(r.lat) and is_finite_number(r.lon)]


def document_description(records: Sequence[Record], shown: int) -> str:
    """What the document holds, and the records that are not placemarks (failed), by name."""
    failed = [r for r in records if not r.ok]
    text = f"{shown} located image(s) of {len(records)} record(s) (latest per image); {len(failed)} failed, not shown"
    if failed:
        names = "; ".join(f"{image_name(r)}: {xml_text(r.error) or 'error'}" for r in failed[:50])
        text += f": {names}" + (f"; and {len(failed) - 50} more" if len(failed) > 50 else "")
    if any(r.demo for r in records):
        text = f"{DEMO_NOTE} {text}"
    return text


def kml_bytes(records: Sequence[Record], thumbnails: Mapping[int, str] | None = None) -> bytes:
    """The KML document of ``records``; ``thumbnails`` maps an index into :func:`located` to its KMZ path."""
    root = ET.Element(f"{{{KML_NS}}}kml")
    doc = _sub(root, "Document")
    _sub(doc, "name", "clue2geo results")
    shown = located(records)
    _sub(doc, "description", document_description(records, len(shown)))
    _styles(doc)
    for n, rec in enumerate(shown):
        record_folder(doc, rec, (thumbnails or {}).get(n))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_kml(dest: Path, records: Sequence[Record]) -> None:
    """Write ``records`` as a KML file (all or nothing)."""
    atomic_write(dest, kml_bytes(records), text=False)


def thumbnail_jpeg(rec: Record, image_root: Path | None = None) -> bytes | None:
    """A small JPEG of the record's photo, when its file is there and its sha256 is still the record's."""
    image, sha = rec.image or rec.path, rec.image_sha256
    if not isinstance(image, str) or not image or not isinstance(sha, str):
        return None
    path = Path(image)
    if image_root is not None and not path.is_absolute():
        path = image_root / path
    try:
        thumb = load_thumbnail(path, sha, max_side=KMZ_THUMB_MAX)
    except (OSError, ValueError):  # a NUL in the path, a name too long, a permission refused
        return None
    if thumb.status != "ok" or thumb.data_uri is None:
        return None
    return base64.b64decode(thumb.data_uri.split(",", 1)[1])


def kmz_bytes(records: Sequence[Record], image_root: Path | None = None) -> bytes:
    """A KMZ (zip): ``doc.kml`` first, as KMZ readers expect, then ``files/<n>.jpg`` thumbnails."""
    thumbs = {n: jpeg for n, r in enumerate(located(records)) if (jpeg := thumbnail_jpeg(r, image_root))}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("doc.kml", kml_bytes(records, {n: f"files/{n}.jpg" for n in thumbs}))
        for n, jpeg in thumbs.items():
            z.writestr(f"files/{n}.jpg", jpeg)
    return buf.getvalue()


def write_kmz(dest: Path, records: Sequence[Record], image_root: Path | None = None) -> None:
    """Write ``records`` as a KMZ file with thumbnails (all or nothing)."""
    atomic_write(dest, kmz_bytes(records, image_root), text=False)
