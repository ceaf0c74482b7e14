"""Where a file keeps its metadata: the EXIF block and XMP packet of a JPEG, PNG, WebP, TIFF or HEIF.

PNG chunks are walked here (eXIf and iTXt, also after IDAT); a TIFF file is its own EXIF block;
for JPEG, WebP and HEIF, Pillow locates the blocks from the headers (no pixel is decoded).
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

from ..image import heif_available
from .xmp import MAX_XMP_BYTES

_XMP_KEYWORD = b"XML:com.adobe.xmp\x00"


def _png_xmp(body: bytes, problems: list[str]) -> bytes:
    """The XMP packet of an iTXt chunk's ``body`` (after its keyword), inflated when compressed."""
    rest = body[len(_XMP_KEYWORD) :]
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
    return text


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
        elif ctype == b"iTXt" and body.startswith(_XMP_KEYWORD) and xmp is None:
            xmp = _png_xmp(body, problems)
        elif ctype == b"IEND":
            break
        at += 12 + length
    return exif, xmp


def metadata_blocks(data: bytes, fmt: str, problems: list[str]) -> tuple[bytes | None, bytes | None]:
    """(EXIF block, XMP packet) of the file; a TIFF file is its own EXIF block."""
    if fmt == "TIFF":
        return data, None
    if fmt == "PNG":
        return _png_blocks(data, problems)
    if fmt == "HEIF" and not heif_available():
        problems.append("HEIF/HEIC file, but pillow-heif is not installed: its metadata is not read")
        return None, None
    with Image.open(io.BytesIO(data), formats=[fmt]) as img:  # headers only: no pixel is decoded
        exif, xmp = img.info.get("exif"), img.info.get("xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8")
    return exif, xmp
