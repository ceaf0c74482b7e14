"""The XMP packet's GPS position (``exif:GPSLatitude`` / ``GPSLongitude`` / ``GPSAltitude``).

The packet is parsed with ``defusedxml`` (no DTD, no entities, no external references: a packet is
untrusted input) and refused above :data:`MAX_XMP_BYTES`; what is malformed is named in ``problems``.
"""

from __future__ import annotations

import math
import re

from defusedxml import ElementTree

from ...sanitize import clean_text
from .position import Position

MAX_XMP_BYTES = 4 << 20  # a packet this large is not a camera's; refused, named in problems
_NS = {
    "exif": "http://ns.adobe.com/exif/1.0/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
}
_XMP_COORD = re.compile(r"^\s*(\d{1,3})\s*,\s*(\d{1,2}(?:\.\d+)?)(?:\s*,\s*(\d{1,2}(?:\.\d+)?))?\s*([NSEWnsew])\s*$")


def _xmp_coordinate(text: str, axis: str, problems: list[str]) -> float | None:
    m = _XMP_COORD.match(text)
    name = "exif:GPSLatitude" if axis == "latitude" else "exif:GPSLongitude"
    refs, limit = ("NS", 90.0) if axis == "latitude" else ("EW", 180.0)
    if not m:
        problems.append(f"XMP {name} {clean_text(text, 60)!r} is not 'DDD,MM,SSk' or 'DDD,MM.mmk'; not used")
        return None
    deg, minutes, seconds, ref = int(m[1]), float(m[2]), float(m[3] or 0), m[4].upper()
    if ref not in refs:
        problems.append(f"XMP {name} {text.strip()!r} ends in {ref}, not {' or '.join(refs)}; not used")
        return None
    if minutes >= 60 or seconds >= 60 or (m[3] is not None and "." in m[2]):
        problems.append(f"XMP {name} {text.strip()!r}: minutes or seconds out of range; not used")
        return None
    value = deg + minutes / 60 + seconds / 3600
    if value > limit:
        problems.append(f"XMP {name} {text.strip()!r} is beyond {limit:g} degrees; not used")
        return None
    return -value if ref in "SW" else value


def _xmp_number(text: str) -> float | None:
    """A decimal or rational; None when it is not a number (NaN and infinities are returned as such,
    for the caller to name and drop)."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _xmp_fields(packet: bytes) -> dict[str, str]:
    """The ``exif:`` properties of every rdf:Description, as attributes or simple child elements."""
    start = packet.find(b"<x:xmpmeta")
    if start < 0:
        start = packet.find(b"<rdf:RDF")
    end_tag = b"</x:xmpmeta>" if packet[start : start + 10] == b"<x:xmpmeta" else b"</rdf:RDF>"
    end = packet.rfind(end_tag)
    if start < 0 or end < 0:
        raise ValueError("no x:xmpmeta or rdf:RDF element")
    root = ElementTree.fromstring(packet[start : end + len(end_tag)], forbid_dtd=True)
    prefix = "{" + _NS["exif"] + "}"
    found: dict[str, str] = {}
    for desc in root.iter("{" + _NS["rdf"] + "}Description"):
        for key, value in desc.attrib.items():
            if key.startswith(prefix):
                found.setdefault(key[len(prefix) :], value)
        for child in desc:
            if child.tag.startswith(prefix) and child.text and child.text.strip():
                found.setdefault(child.tag[len(prefix) :], child.text.strip())
    return found


def _xmp_altitude(fields: dict[str, str], problems: list[str]) -> float | None:
    """exif:GPSAltitude (below sea level when exif:GPSAltitudeRef is 1); None when absent or malformed."""
    if "GPSAltitude" not in fields:
        return None
    alt = _xmp_number(fields["GPSAltitude"])
    if alt is not None and not math.isfinite(alt):
        problems.append(
            f"XMP exif:GPSAltitude {clean_text(fields['GPSAltitude'], 40)!r} is not a finite number; altitude not used"
        )
        return None
    if alt is None or alt < 0:
        problems.append(f"XMP exif:GPSAltitude {clean_text(fields['GPSAltitude'], 40)!r} is not a rational")
        return None
    return -alt if fields.get("GPSAltitudeRef", "0").strip() == "1" else alt


def read_xmp(packet: bytes, problems: list[str]) -> Position | None:
    """The position an XMP packet claims; None when it claims none or it is malformed (named in ``problems``)."""
    if len(packet) > MAX_XMP_BYTES:
        problems.append(f"XMP packet of {len(packet):,} bytes is over {MAX_XMP_BYTES:,}; not read")
        return None
    try:
        fields = _xmp_fields(packet)
    except Exception as exc:  # defusedxml's refusals, ParseError, a packet with no RDF
        problems.append(f"XMP packet not read: {type(exc).__name__}: {clean_text(exc, 160)}")
        return None
    lat_text, lon_text = fields.get("GPSLatitude"), fields.get("GPSLongitude")
    if lat_text is None and lon_text is None:
        return None
    if lat_text is None or lon_text is None:
        problems.append("XMP: only one of exif:GPSLatitude and exif:GPSLongitude is present; no XMP position")
        return None
    lat = _xmp_coordinate(lat_text, "latitude", problems)
    lon = _xmp_coordinate(lon_text, "longitude", problems)
    if lat is None or lon is None:
        return None
    return Position(lat=lat, lon=lon, altitude_m=_xmp_altitude(fields, problems), source="xmp")
