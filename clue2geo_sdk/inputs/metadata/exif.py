"""EXIF fields: camera (IFD0), capture time (Exif IFD) and GPS position and time (GPS IFD).

Read with the bounds-checked :class:`~clue2geo_sdk.inputs.metadata.tiff.Tiff` reader, so that a
zero denominator, a wrong hemisphere letter or minutes of 60 are named in ``problems`` (and the
value not used) rather than skipped silently or turned into a wrong position.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Mapping
from typing import Any

from .position import Position
from .tiff import Entry, Tiff, entry_text

EXIF_IFD, GPS_IFD, XMP_TAG = 0x8769, 0x8825, 700
TAG_NAMES = {
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
GPS_NAMES = {
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
_OFFSET = re.compile(r"^([+-])(\d{2}):(\d{2})$")


def _rational_values(tiff: Tiff, entry: Entry, name: str, problems: list[str], n: int) -> list[float] | None:
    """``n`` non-negative rationals of a GPS field as floats; None (and the fault named) otherwise."""
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


def _exif_coordinate(tiff: Tiff, gps: Mapping[int, Entry], axis: str, problems: list[str]) -> float | None:
    value_tag, ref_tag, refs, limit = (2, 1, "NS", 90.0) if axis == "latitude" else (4, 3, "EW", 180.0)
    name, ref_name = GPS_NAMES[value_tag], GPS_NAMES[ref_tag]
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
    ref = entry_text(gps.get(ref_tag))
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


def _exif_altitude(tiff: Tiff, gps: Mapping[int, Entry], problems: list[str]) -> float | None:
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


def _gps_time(tiff: Tiff, gps: Mapping[int, Entry], problems: list[str]) -> str | None:
    if 7 not in gps and 29 not in gps:
        return None
    if 7 not in gps or 29 not in gps:
        problems.append("GPS: one of GPSDateStamp and GPSTimeStamp is missing; no GPS time")
        return None
    hms = _rational_values(tiff, gps[7], "GPSTimeStamp", problems, 3)
    date = entry_text(gps[29])
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


def _datetime_original(exif: Mapping[int, Entry], problems: list[str]) -> tuple[str | None, str | None]:
    raw = entry_text(exif.get(0x9003))
    offset, subsec = entry_text(exif.get(0x9011)), entry_text(exif.get(0x9291))
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


def _gps_fields(tiff: Tiff, entries: Mapping[int, Entry], problems: list[str]) -> dict[str, Any]:
    """The GPS IFD's position, receiver time and map datum; what is malformed is named in ``problems``."""
    out: dict[str, Any] = {}
    gps_problems: list[str] = []
    lat = _exif_coordinate(tiff, entries, "latitude", gps_problems)
    lon = _exif_coordinate(tiff, entries, "longitude", gps_problems)
    if (lat is None) != (lon is None):
        gps_problems.append("GPS: only one of latitude and longitude is usable; no EXIF position")
    elif lat is not None and lon is not None:
        alt = _exif_altitude(tiff, entries, gps_problems)
        out["exif_position"] = Position(lat=lat, lon=lon, altitude_m=alt, source="exif")
        status = entry_text(entries.get(9))
        if status and status.upper() == "V":
            gps_problems.append("GPS GPSStatus is V (measurement void): the receiver may have had no fix")
        if lat == 0 and lon == 0:
            gps_problems.append("GPS position is exactly 0, 0: often written by a receiver without a fix")
    out["gps_time_utc"] = _gps_time(tiff, entries, gps_problems)
    out["gps_map_datum"] = entry_text(entries.get(18), 40)
    problems.extend(gps_problems)
    return out


def read_exif(block: bytes, problems: list[str], where: str = "EXIF") -> dict[str, Any]:
    """Fields of :class:`~clue2geo_sdk.inputs.metadata.photo.PhotoMetadata` from one EXIF/TIFF block
    (plus ``_xmp``, the raw XMP packet of a TIFF file's tag 700)."""
    tiff = Tiff(block, problems, where)
    if not tiff.ok:
        return {}
    ifd0 = tiff.ifd(tiff.ifd0_offset, "IFD0", TAG_NAMES)
    out: dict[str, Any] = {
        "make": entry_text(ifd0.get(0x010F), 100),
        "model": entry_text(ifd0.get(0x0110), 100),
        "software": entry_text(ifd0.get(0x0131), 100),
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
        entries = tiff.ifd(ptr[0], name, GPS_NAMES if tag == GPS_IFD else TAG_NAMES)
        if tag == EXIF_IFD:
            out["datetime_original"], out["offset_time_original"] = _datetime_original(entries, problems)
        else:
            out.update(_gps_fields(tiff, entries, problems))
    return out
