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

from typing import Any

import attrs

from ...geo.distance import haversine_km
from ...sanitize import clean_text
from ..image import ALLOWED_FORMATS, detect_format
from .containers import metadata_blocks
from .exif import read_exif
from .position import Position, finite_position
from .xmp import read_xmp

POSITIONS_AGREE_KM = 0.1  # EXIF and XMP positions further apart than this are reported


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


def _read(data: bytes, fmt: str, problems: list[str]) -> PhotoMetadata:
    """The metadata of a file of a format that carries EXIF / XMP; raises on a reader fault."""
    exif_block, xmp_packet = metadata_blocks(data, fmt, problems)
    fields: dict[str, Any] = {}
    if exif_block:
        block = bytes(exif_block)
        while block.startswith(b"Exif\x00\x00"):
            block = block[6:]
        fields = read_exif(block, problems, "TIFF" if fmt == "TIFF" else "EXIF")
        xmp_packet = fields.pop("_xmp", None) or xmp_packet
    xmp_position = read_xmp(bytes(xmp_packet), problems) if xmp_packet else None
    exif_position = finite_position(fields.get("exif_position"), problems)
    xmp_position = finite_position(xmp_position, problems)
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


def read_metadata(source: Any) -> PhotoMetadata:
    """The metadata of a :class:`~clue2geo_sdk.inputs.image.LoadedImage` (from the bytes it was decoded from)
    or of raw file bytes. Never raises: what cannot be read is named in ``problems``."""
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
        return _read(data, fmt, problems)
    except Exception as exc:  # a reader bug or a container Pillow refuses must not cost the prediction
        problems.append(f"metadata not fully read: {type(exc).__name__}: {clean_text(exc, 160)}")
        return PhotoMetadata(format=fmt, problems=tuple(problems))
