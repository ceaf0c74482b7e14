"""Photo metadata read beside the prediction: EXIF GPS, capture time, camera, and XMP GPS.

The prediction never uses any of it: metadata can be forged or stripped, and a position that
disagrees with what the pixels say is itself evidence. :func:`read_metadata` reads the same bytes
the pipeline decoded (JPEG, TIFF, PNG, WebP, HEIC/HEIF) and returns a :class:`PhotoMetadata`: what
was found, and every value that was present but malformed, in ``problems``. It never raises.

EXIF is read by a small bounds-checked TIFF parser (IFD0 with Make, Model, Software; the Exif IFD
with DateTimeOriginal, OffsetTimeOriginal, SubSecTimeOriginal; the GPS IFD), so that a broken
offset, a zero denominator or a wrong hemisphere letter is named rather than skipped silently.
Pillow only locates the EXIF and XMP blocks of JPEG, WebP and HEIF files (no pixels are decoded);
PNG chunks and TIFF files are walked here. The XMP packet is parsed with ``defusedxml`` (no DTD,
no entities) and its ``exif:GPSLatitude`` / ``exif:GPSLongitude`` / ``exif:GPSAltitude`` read.
Text values are cleaned (control characters removed, lengths capped) where they are stored.
"""

from __future__ import annotations

import datetime as _dt
import io
import math
import re
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import attrs

from ...geo.reverse import haversine_km
from ...sanitize import clean_text

EXIF_IFD, GPS_IFD, XMP_TAG = 0x8769, 0x8825, 700
MAX_XMP_BYTES = 4 << 20  # a packet this large is not a camera's; refused, named in problems
MAX_IFD_ENTRIES = 1000
POSITIONS_AGREE_KM = 0.1  # EXIF and XMP positions further apart than this are reported

# TIFF field types: (bytes per value, struct code); codes for rationals read two values each.
_TYPES: dict[int, tuple[int, str]] = {
    1: (1, "B"),
    2: (1, "B"),
    3: (2, "H"),
    4: (4, "L"),
    5: (8, "L"),
    6: (1, "b"),
    7: (1, "B"),
    8: (2, "h"),
    9: (4, "l"),
    10: (8, "l"),
    11: (4, "f"),
    12: (8, "d"),
}
_TAG_NAMES = {
    0x010F: "Make",
    0x0110: "Model",
    0x0131: "Software",
    EXIF_IFD: "ExifIFD",
    GPS_IFD: "GPSInfo",
    XMP_TAG: "XMP",
    0x9003: "DateTimeOriginal",
    0x9011: "OffsetTimeOriginal",
    0x9291: "SubSecTimeOriginal",
}
_GPS_NAMES = {
    0: "GPSVersionID",
    1: "GPSLatitudeRef",
    2: "GPSLatitude",
    3: "GPSLongitudeRef",
    4: "GPSLongitude",
    5: "GPSAltitudeRef",
    6: "GPSAltitude",
    7: "GPSTimeStamp",
    9: "GPSStatus",
    18: "GPSMapDatum",
    29: "GPSDateStamp",
}
_NS = {
    "exif": "http://ns.adobe.com/exif/1.0/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
}
_XMP_COORD = re.compile(r"^\s*(\d{1,3})\s*,\s*(\d{1,2}(?:\.\d+)?)(?:\s*,\s*(\d{1,2}(?:\.\d+)?))?\s*([NSEWnsew])\s*$")
_OFFSET = re.compile(r"^([+-])(\d{2}):(\d{2})$")


@attrs.frozen(kw_only=True)
class Position:
    """A position a photo claims for itself, and which metadata block said so."""

    lat: float
    lon: float
    altitude_m: float | None
    source: str  # "exif" or "xmp"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class PhotoMetadata:
    """What a photo's metadata says; ``problems`` names every value that was present but malformed.

    ``position`` is the EXIF position when there is a usable one, else the XMP one. Times are ISO
    8601: ``datetime_original`` carries its offset when ``OffsetTimeOriginal`` gives one (else it
    is the camera's local time, zone unknown); ``gps_time_utc`` is the receiver's UTC time."""

    format: str | None = None
    exif: bool = False
    xmp: bool = False
    exif_position: Position | None = None
    xmp_position: Position | None = None
    gps_time_utc: str | None = None
    gps_map_datum: str | None = None
    datetime_original: str | None = None
    offset_time_original: str | None = None
    make: str | None = None
    model: str | None = None
    software: str | None = None
    problems: tuple[str, ...] = ()

    @property
    def position(self) -> Position | None:
        return self.exif_position or self.xmp_position

    def distance_km(self, lat: float, lon: float) -> float | None:
        """Great-circle km from the photo's own position to (lat, lon); None when it has none."""
        pos = self.position
        if pos is None:
            return None
        return round(float(haversine_km(pos.lat, pos.lon, lat, lon)), 3)

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=False)
        for key in ("exif_position", "xmp_position"):
            d[key] = d[key].to_dict() if d[key] is not None else None
        d["position"] = self.position.to_dict() if self.position is not None else None
        d["problems"] = list(self.problems)
        return d


# -- TIFF / EXIF ----------------------------------------------------------------------------------


@attrs.frozen
class _Entry:
    type: int
    count: int
    raw: bytes


class _Tiff:
    """A bounds-checked reader of the IFDs in an EXIF (TIFF-structured) block."""

    def __init__(self, data: bytes, problems: list[str], where: str) -> None:
        self.data, self.problems, self.where = data, problems, where
        self.endian = "<" if data[:2] == b"II" else ">"
        self.ok = False
        self.visited: set[int] = set()
        if len(data) < 8 or data[:2] not in (b"II", b"MM"):
            problems.append(f"{where}: not a TIFF structure (byte order mark {data[:2]!r})")
            return
        magic = struct.unpack(self.endian + "H", data[2:4])[0]
        if magic == 43:
            problems.append(f"{where}: BigTIFF layout; its metadata is not read")
            return
        if magic != 42:
            problems.append(f"{where}: TIFF magic number {magic}, not 42")
            return
        self.ok = True
        self.ifd0_offset = struct.unpack(self.endian + "L", data[4:8])[0]

    def ifd(self, offset: int, name: str) -> dict[int, _Entry]:
        """The entries of the IFD at ``offset``; a broken IFD is reported and read as far as it is sound."""
        data, e = self.data, self.endian
        if offset in self.visited:
            self.problems.append(f"{self.where}: {name} at offset {offset} was already read (a loop); skipped")
            return {}
        self.visited.add(offset)
        if offset < 8 or offset + 2 > len(data):
            self.problems.append(
                f"{self.where}: {name} points to offset {offset}, outside the {len(data)}-byte block; not read"
            )
            return {}
        n = struct.unpack(e + "H", data[offset : offset + 2])[0]
        if n > MAX_IFD_ENTRIES:
            self.problems.append(f"{self.where}: {name} claims {n} entries; not read")
            return {}
        entries: dict[int, _Entry] = {}
        names = _GPS_NAMES if name == "GPS IFD" else _TAG_NAMES
        for i in range(n):
            at = offset + 2 + 12 * i
            if at + 12 > len(data):
                self.problems.append(f"{self.where}: {name} is truncated after {i} of {n} entries")
                break
            tag, typ, count = struct.unpack(e + "HHL", data[at : at + 8])
            if typ not in _TYPES:
                if tag in names:
                    self.problems.append(f"{self.where}: {name} {names[tag]} has unknown field type {typ}; ignored")
                continue
            size = _TYPES[typ][0] * count
            if size <= 4:
                raw = data[at + 8 : at + 8 + size]
            else:
                ptr = struct.unpack(e + "L", data[at + 8 : at + 12])[0]
                if ptr + size > len(data):
                    if tag in names:
                        self.problems.append(
                            f"{self.where}: {name} {names[tag]}: {size} bytes at offset {ptr} run past the "
                            f"{len(data)}-byte block; ignored"
                        )
                    continue
                raw = data[ptr : ptr + size]
            if tag in entries:
                if tag in names:
                    self.problems.append(f"{self.where}: {name} holds {names[tag]} twice; the first is used")
                continue
            entries[tag] = _Entry(typ, count, raw)
        return entries

    def ints(self, entry: _Entry) -> list[int] | None:
        if entry.type not in (1, 3, 4, 6, 8, 9):
            return None
        return list(struct.unpack(f"{self.endian}{entry.count}{_TYPES[entry.type][1]}", entry.raw))

    def rationals(self, entry: _Entry) -> list[tuple[int, int]] | None:
        if entry.type not in (5, 10):
            return None
        v = struct.unpack(f"{self.endian}{2 * entry.count}{_TYPES[entry.type][1]}", entry.raw)
        return list(zip(v[0::2], v[1::2], strict=True))


def _text(entry: _Entry | None, max_len: int = 200) -> str | None:
    """An ASCII (or, leniently, byte) field as cleaned text, cut at the first NUL."""
    if entry is None or entry.type not in (1, 2, 7):
        return None
    return clean_text(entry.raw.split(b"\x00", 1)[0].decode("utf-8", "replace"), max_len)


def _rational_values(tiff: _Tiff, entry: _Entry, name: str, problems: list[str], n: int) -> list[float] | None:
    values = tiff.rationals(entry)
    if values is None:
        problems.append(f"GPS {name}: field type {entry.type}, not RATIONAL")
        return None
    if len(values) != n:
        problems.append(f"GPS {name}: {len(values)} value(s), expected {n}")
        return None
    if any(den == 0 for _, den in values):
        shown = ", ".join(f"{num}/{den}" for num, den in values)
        problems.append(f"GPS {name}: zero denominator ({shown})")
        return None
    floats = [num / den for num, den in values]
    if any(f < 0 for f in floats):
        problems.append(f"GPS {name}: negative value ({', '.join(map(str, floats))})")
        return None
    return floats


def _exif_coordinate(tiff: _Tiff, gps: Mapping[int, _Entry], axis: str, problems: list[str]) -> float | None:
    value_tag, ref_tag, refs, limit = (2, 1, "NS", 90.0) if axis == "latitude" else (4, 3, "EW", 180.0)
    name, ref_name = _GPS_NAMES[value_tag], _GPS_NAMES[ref_tag]
    if value_tag not in gps:
        if ref_tag in gps:
            problems.append(f"GPS {ref_name} is present without {name}")
        return None
    dms = _rational_values(tiff, gps[value_tag], name, problems, 3)
    if dms is None:
        return None
    deg, minutes, seconds = dms
    if minutes >= 60 or seconds >= 60:
        problems.append(f"GPS {name}: minutes or seconds of 60 or more ({deg}, {minutes}, {seconds})")
        return None
    value = deg + minutes / 60 + seconds / 3600
    ref = _text(gps.get(ref_tag))
    if ref is None:
        problems.append(f"GPS {ref_name} is missing: the hemisphere of {name} is unknown; not used")
        return None
    ref = ref.upper()
    if ref not in refs:
        problems.append(f"GPS {ref_name} is {ref!r}, not {' or '.join(refs)}; not used")
        return None
    if value > limit:
        problems.append(f"GPS {name}: {value:.6f} degrees is beyond {limit:g}; not used")
        return None
    return -value if ref in "SW" else value


def _exif_altitude(tiff: _Tiff, gps: Mapping[int, _Entry], problems: list[str]) -> float | None:
    if 6 not in gps:
        return None
    values = _rational_values(tiff, gps[6], "GPSAltitude", problems, 1)
    if values is None:
        return None
    ref = tiff.ints(gps[5]) if 5 in gps else [0]
    if not ref or ref[0] not in (0, 1):
        problems.append(f"GPS GPSAltitudeRef is {ref!r}, not 0 (above) or 1 (below sea level); altitude not used")
        return None
    return -values[0] if ref[0] == 1 else values[0]


def _gps_time(tiff: _Tiff, gps: Mapping[int, _Entry], problems: list[str]) -> str | None:
    if 7 not in gps and 29 not in gps:
        return None
    if 7 not in gps or 29 not in gps:
        problems.append("GPS: one of GPSDateStamp and GPSTimeStamp is missing; no GPS time")
        return None
    hms = _rational_values(tiff, gps[7], "GPSTimeStamp", problems, 3)
    date = _text(gps[29])
    if hms is None or date is None:
        if date is None:
            problems.append(f"GPS GPSDateStamp has field type {gps[29].type}, not ASCII")
        return None
    try:
        day = _dt.datetime.strptime(date, "%Y:%m:%d").date()
        h, m, s = hms
        if h >= 24 or m >= 60 or s >= 61:
            raise ValueError(f"time {h:g}:{m:g}:{s:g}")
        t = _dt.datetime.combine(day, _dt.time(), tzinfo=_dt.UTC) + _dt.timedelta(hours=h, minutes=m, seconds=s)
    except ValueError as exc:
        problems.append(f"GPS GPSDateStamp/GPSTimeStamp {date!r}: not a valid UTC time ({exc})")
        return None
    return t.isoformat(timespec="milliseconds" if t.microsecond else "seconds").replace("+00:00", "Z")


def _datetime_original(exif: Mapping[int, _Entry], problems: list[str]) -> tuple[str | None, str | None]:
    raw, offset, subsec = _text(exif.get(0x9003)), _text(exif.get(0x9011)), _text(exif.get(0x9291))
    if offset is not None and not _OFFSET.match(offset):
        problems.append(f"EXIF OffsetTimeOriginal {offset!r} is not ±HH:MM; the capture time's zone is unknown")
        offset = None
    if raw is None:
        return None, offset
    if raw.strip(" :0") == "":
        problems.append(f"EXIF DateTimeOriginal is blank ({raw!r})")
        return None, offset
    try:
        t = _dt.datetime.strptime(raw, "%Y:%m:%d %H:%M:%S")
    except ValueError:
        problems.append(f"EXIF DateTimeOriginal {raw!r} is not 'YYYY:MM:DD HH:MM:SS'")
        return None, offset
    if subsec and subsec.isdigit():
        t = t.replace(microsecond=int(subsec[:6].ljust(6, "0")))
    iso = t.isoformat(timespec="milliseconds" if t.microsecond else "seconds")
    if offset is not None:
        sign, hh, mm = _OFFSET.match(offset).groups()  # type: ignore[union-attr]
        if int(hh) > 14 or int(mm) >= 60:
            problems.append(f"EXIF OffsetTimeOriginal {offset!r} is not a real UTC offset")
            offset = None
        else:
            iso += f"{sign}{hh}:{mm}"
    return iso, offset


def _read_exif(block: bytes, problems: list[str], where: str = "EXIF") -> dict[str, Any]:
    """Fields of :class:`PhotoMetadata` from one EXIF/TIFF block (plus ``_xmp`` from a TIFF file's tag 700)."""
    tiff = _Tiff(block, problems, where)
    if not tiff.ok:
        return {}
    ifd0 = tiff.ifd(tiff.ifd0_offset, "IFD0")
    out: dict[str, Any] = {
        "make": _text(ifd0.get(0x010F), 100),
        "model": _text(ifd0.get(0x0110), 100),
        "software": _text(ifd0.get(0x0131), 100),
    }
    if XMP_TAG in ifd0 and ifd0[XMP_TAG].type in (1, 7):
        out["_xmp"] = ifd0[XMP_TAG].raw
    for tag, name in ((EXIF_IFD, "Exif IFD"), (GPS_IFD, "GPS IFD")):
        if tag not in ifd0:
            continue
        ptr = tiff.ints(ifd0[tag])
        if not ptr or len(ptr) != 1:
            problems.append(f"{where}: the {name} pointer has field type {ifd0[tag].type}, not an offset; not read")
            continue
        entries = tiff.ifd(ptr[0], name)
        if tag == EXIF_IFD:
            out["datetime_original"], out["offset_time_original"] = _datetime_original(entries, problems)
            continue
        gps_problems: list[str] = []
        lat = _exif_coordinate(tiff, entries, "latitude", gps_problems)
        lon = _exif_coordinate(tiff, entries, "longitude", gps_problems)
        if (lat is None) != (lon is None):
            gps_problems.append("GPS: only one of latitude and longitude is usable; no EXIF position")
        elif lat is not None and lon is not None:
            alt = _exif_altitude(tiff, entries, gps_problems)
            out["exif_position"] = Position(lat=lat, lon=lon, altitude_m=alt, source="exif")
            status = _text(entries.get(9))
            if status and status.upper() == "V":
                gps_problems.append("GPS GPSStatus is V (measurement void): the receiver may have had no fix")
            if lat == 0 and lon == 0:
                gps_problems.append("GPS position is exactly 0, 0: often written by a receiver without a fix")
        out["gps_time_utc"] = _gps_time(tiff, entries, gps_problems)
        out["gps_map_datum"] = _text(entries.get(18), 40)
        problems.extend(gps_problems)
    return out


# -- XMP ------------------------------------------------------------------------------------------


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
    from defusedxml import ElementTree  # parses with entity expansion and external references refused

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


def _read_xmp(packet: bytes, problems: list[str]) -> Position | None:
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
    alt = None
    if "GPSAltitude" in fields:
        alt = _xmp_number(fields["GPSAltitude"])
        if alt is not None and not math.isfinite(alt):
            problems.append(
                f"XMP exif:GPSAltitude {clean_text(fields['GPSAltitude'], 40)!r} is not a finite number; "
                "altitude not used"
            )
            alt = None
        elif alt is None or alt < 0:
            problems.append(f"XMP exif:GPSAltitude {clean_text(fields['GPSAltitude'], 40)!r} is not a rational")
            alt = None
        elif fields.get("GPSAltitudeRef", "0").strip() == "1":
            alt = -alt
    return Position(lat=lat, lon=lon, altitude_m=alt, source="xmp")


# -- containers -----------------------------------------------------------------------------------


def _png_blocks(data: bytes, problems: list[str]) -> tuple[bytes | None, bytes | None]:
    """(EXIF, XMP) of a PNG from its eXIf and iTXt chunks, wherever they are (also after IDAT)."""
    exif = xmp = None
    at = 8
    while at + 8 <= len(data):
        length, ctype = struct.unpack(">L4s", data[at : at + 8])
        body = data[at + 8 : at + 8 + length]
        if len(body) < length:
            problems.append(f"PNG chunk {ctype!r} at byte {at} is truncated; later chunks not read")
            break
        if ctype == b"eXIf" and exif is None:
            exif = body
        elif ctype == b"iTXt" and body.startswith(b"XML:com.adobe.xmp\x00") and xmp is None:
            rest = body[len(b"XML:com.adobe.xmp\x00") :]
            compressed = rest[:1] == b"\x01"
            # skip compression flag, method, language tag and translated keyword (NUL-terminated)
            parts = rest[2:].split(b"\x00", 2)
            text = parts[2] if len(parts) == 3 else b""
            if compressed:
                d = zlib.decompressobj()
                try:
                    text = d.decompress(text, MAX_XMP_BYTES + 1)
                except zlib.error as exc:
                    problems.append(f"PNG XMP chunk does not decompress ({exc})")
                    text = b""
            xmp = text
        elif ctype == b"IEND":
            break
        at += 12 + length
    return exif, xmp


def _blocks(data: bytes, fmt: str, problems: list[str]) -> tuple[bytes | None, bytes | None]:
    """(EXIF block, XMP packet) of the file; a TIFF file is its own EXIF block."""
    if fmt == "TIFF":
        return data, None
    if fmt == "PNG":
        return _png_blocks(data, problems)
    if fmt == "HEIF":
        from ..image import _heif_available

        if not _heif_available():
            problems.append("HEIF/HEIC file, but pillow-heif is not installed: its metadata is not read")
            return None, None
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=[fmt]) as img:  # headers only: no pixel is decoded
        exif, xmp = img.info.get("exif"), img.info.get("xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    return exif, xmp


def _finite_position(pos: Position | None, problems: list[str]) -> Position | None:
    """The position with no NaN or infinity left in it (results are JSON, which has neither): a
    non-finite altitude is dropped, a non-finite coordinate drops the position; each is named."""
    if pos is None:
        return None
    if not (math.isfinite(pos.lat) and math.isfinite(pos.lon)):
        problems.append(f"{pos.source.upper()} position {pos.lat}, {pos.lon} is not finite; not used")
        return None
    if pos.altitude_m is not None and not math.isfinite(pos.altitude_m):
        problems.append(f"{pos.source.upper()} altitude {pos.altitude_m} is not finite; altitude not used")
        return attrs.evolve(pos, altitude_m=None)
    return pos


def read_metadata(source: Any) -> PhotoMetadata:
    """The metadata of a :class:`~clue2geo_sdk.inputs.image.LoadedImage` (from the bytes it was decoded from)
    or of raw file bytes. Never raises: what cannot be read is named in ``problems``."""
    from ..image import ALLOWED_FORMATS, detect_format

    data = source if isinstance(source, bytes | bytearray | memoryview) else getattr(source, "data", None)
    if data is None:
        return PhotoMetadata(problems=("no file bytes (a decoded image or array was given): metadata not read",))
    data = bytes(data)
    problems: list[str] = []
    fmt = None
    try:
        fmt = detect_format(data[:16])
        if fmt not in ALLOWED_FORMATS or fmt in ("BMP", "GIF"):
            return PhotoMetadata(format=fmt)  # formats that carry no EXIF / XMP
        exif_block, xmp_packet = _blocks(data, fmt, problems)
        fields: dict[str, Any] = {}
        if exif_block:
            block = bytes(exif_block)
            while block.startswith(b"Exif\x00\x00"):
                block = block[6:]
            fields = _read_exif(block, problems, "TIFF" if fmt == "TIFF" else "EXIF")
            xmp_packet = fields.pop("_xmp", None) or xmp_packet
        xmp_position = _read_xmp(bytes(xmp_packet), problems) if xmp_packet else None
        exif_position = _finite_position(fields.get("exif_position"), problems)
        xmp_position = _finite_position(xmp_position, problems)
        fields["exif_position"] = exif_position
        if exif_position is not None and xmp_position is not None:
            apart = float(haversine_km(exif_position.lat, exif_position.lon, xmp_position.lat, xmp_position.lon))
            if apart > POSITIONS_AGREE_KM:
                problems.append(f"EXIF and XMP positions disagree by {apart:.3f} km")
        return PhotoMetadata(
            format=fmt,
            exif=bool(exif_block) and fmt != "TIFF" or any(v is not None for v in fields.values()),
            xmp=bool(xmp_packet),
            xmp_position=xmp_position,
            problems=tuple(problems),
            **fields,
        )
    except Exception as exc:  # a reader bug or a container Pillow refuses must not cost the prediction
        problems.append(f"metadata not fully read: {type(exc).__name__}: {clean_text(exc, 160)}")
        return PhotoMetadata(format=fmt, problems=tuple(problems))
