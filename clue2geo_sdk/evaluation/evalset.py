"""An eval set for ``clue2geo validate``: photos with their true positions, and its content digest.

Two forms: a folder of geotagged photos (the truth is each photo's own EXIF / XMP position, read
with :func:`~clue2geo_sdk.inputs.metadata.photo.read_metadata`; the pipeline itself never reads it), or
a CSV with ``path,lat,lon`` (paths relative to the CSV) or ``IMG_ID,LAT,LON`` (the ``eval`` form,
relative to an images folder). A photo with no position or that cannot be read is *excluded*: listed
with the reason, never a crash. A CSV row naming a missing or broken file stays in the set (its truth
is known) and fails in the pipeline, where it counts as a miss.

The digest lets another examiner check they measured the same set: sha256 over one line per photo,
``path\\tsha256\\tlat\\tlon\\n``, sorted by path (relative, ``/``-separated), coordinates as Python's
shortest round-trip ``repr`` of the float; a file that cannot be read has sha256 ``unreadable``.
"""

from __future__ import annotations

import csv
import hashlib
import posixpath
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from PIL import Image

from ..errors import InvalidArgumentError
from ..files import InputFileError, regular_file, sha256_file
from ..inputs.discover import discover, read_input_bytes
from ..inputs.image import detect_format
from ..inputs.metadata.photo import read_metadata
from ..results import Failure
from .metrics import Sample

DIGEST_METHOD = (
    "sha256 over one line per photo 'path<TAB>sha256<TAB>lat<TAB>lon<LF>', sorted by path (relative to "
    "the set, '/'-separated), lat/lon as the shortest round-trip decimal of the float; sha256 'unreadable' "
    "for a file that cannot be read"
)
#: Formats whose pixel size is read from the header alone (kinds of photo in the limitations).
_SIZED_FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")


@attrs.frozen(kw_only=True)
class EvalItem:
    """One photo of the set: its path (as read and relative to the set), sha256 and true position."""

    path: Path
    rel: str
    sha256: str
    lat: float
    lon: float
    format: str | None = None
    size: tuple[int, int] | None = None  # (width, height) from the header; None when unknown


@attrs.frozen(kw_only=True)
class EvalSet:
    """The photos measured, and what was left out (``excluded``: photos, ``skipped_rows``: CSV lines)."""

    name: str
    kind: str  # "folder" or "csv"
    source: Path
    items: tuple[EvalItem, ...]
    excluded: tuple[tuple[str, str], ...] = ()  # (relative path, reason)
    skipped_rows: tuple[str, ...] = ()

    @property
    def samples(self) -> list[Sample]:
        """The items as the evaluation run scores them (``img_id`` is the relative path)."""
        return [Sample(img_id=i.rel, lat=i.lat, lon=i.lon) for i in self.items]

    @property
    def digest(self) -> str:
        return evalset_digest(self.items)

    def kinds(self) -> dict[str, Any]:
        """Which formats and pixel sizes the photos are (what the limitations say is not covered)."""
        sizes = [i.size for i in self.items if i.size is not None]
        return {
            "formats": dict(sorted(Counter(i.format or "unknown" for i in self.items).items())),
            "n_sized": len(sizes),
            "distinct_sizes": len(set(sizes)),
            "min_pixels": min((w * h for w, h in sizes), default=None),
            "max_pixels": max((w * h for w, h in sizes), default=None),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": len(self.items),
            "kind": self.kind,
            "source": str(self.source),
            "digest": self.digest,
            "digest_method": DIGEST_METHOD,
            "truth": "each photo's own EXIF/XMP position" if self.kind == "folder" else "the CSV's lat/lon",
            "n_excluded": len(self.excluded),
            "excluded": [{"path": p, "reason": r} for p, r in self.excluded],
            "skipped_rows": list(self.skipped_rows),
            "kinds": self.kinds(),
        }


def evalset_digest(items: Sequence[EvalItem]) -> str:
    """The set's content digest (:data:`DIGEST_METHOD`)."""
    h = hashlib.sha256()
    for i in sorted(items, key=lambda x: x.rel):
        h.update(f"{i.rel}\t{i.sha256}\t{float(i.lat)!r}\t{float(i.lon)!r}\n".encode())
    return h.hexdigest()


def _kind(data: bytes | None, path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """The photo's format (magic bytes) and pixel size (header only, allowed decoders only)."""
    fmt = detect_format(data[:16]) if data else None
    if fmt not in _SIZED_FORMATS:
        return fmt, None
    try:
        with Image.open(path, formats=[fmt]) as img:
            return fmt, (int(img.width), int(img.height))
    except Exception:  # noqa: BLE001 - a broken header only leaves the size unknown; the pipeline names it
        return fmt, None


def read_folder(folder: Path, name: str | None = None) -> EvalSet:
    """Every image file under ``folder`` (recursively) with its metadata position as the truth."""
    if not folder.is_dir():
        raise InvalidArgumentError(f"{folder}: not a folder of photos")
    items, excluded = [], []
    for entry in discover([folder], recursive=True):
        if isinstance(entry, Failure):
            excluded.append((entry.image, f"{entry.error}: {entry.message}"))
            continue
        rel = entry.relative_to(folder).as_posix()
        data = read_input_bytes(entry)
        if data is None:
            excluded.append((rel, "cannot be read (missing, not a regular file or over the size cap)"))
            continue
        meta = read_metadata(data)
        pos = meta.position
        if pos is None:
            why = "; ".join(meta.problems) or "none found"
            excluded.append((rel, f"no position in the photo's metadata ({why})"))
            continue
        fmt, size = _kind(data, entry)
        sha = hashlib.sha256(data).hexdigest()
        items.append(EvalItem(path=entry, rel=rel, sha256=sha, lat=pos.lat, lon=pos.lon, format=fmt, size=size))
    return EvalSet(
        name=name or folder.resolve().name, kind="folder", source=folder, items=tuple(items), excluded=tuple(excluded)
    )


def _columns(fieldnames: Sequence[str] | None, path: Path) -> tuple[str, str, str]:
    """The CSV's path, latitude and longitude columns (case-insensitive: path or img_id, lat, lon)."""
    cols = {c.strip().lower(): c for c in fieldnames or []}
    key = cols.get("path") or cols.get("img_id")
    if key is None or "lat" not in cols or "lon" not in cols:
        raise InvalidArgumentError(f"{path}: needs columns path,lat,lon (or IMG_ID,LAT,LON); found {fieldnames}")
    return key, cols["lat"], cols["lon"]


def _relative(base: Path, written: str) -> str:
    """The path as the digest names it: '/'-separated, relative to ``base`` where it lies under it,
    without './' or '..' detours, however the CSV wrote it (a Windows path, an absolute one)."""
    path = Path(posixpath.normpath(written.replace("\\", "/")))
    if path.is_absolute() and path.is_relative_to(base.resolve()):
        path = path.relative_to(base.resolve())
    return path.as_posix()


def _csv_item(base: Path, written: str, lat: float, lon: float) -> EvalItem:
    rel = _relative(base, written)
    path = base / rel
    try:
        regular_file(path, "eval set photo")  # a FIFO would block the hash for ever
        sha = sha256_file(path)
        with open(path, "rb") as fh:
            head = fh.read(16)
    except (OSError, InputFileError):
        return EvalItem(path=path, rel=rel, sha256="unreadable", lat=lat, lon=lon)
    fmt, size = _kind(head, path)
    return EvalItem(path=path, rel=rel, sha256=sha, lat=lat, lon=lon, format=fmt, size=size)


def read_csv(table: Path, images: Path | None = None, name: str | None = None) -> EvalSet:
    """A CSV of path,lat,lon (relative to the CSV's folder, or to ``images`` when given)."""
    base = images if images is not None else table.parent
    items, skipped = [], []
    try:
        with open(table, newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(fh)
            kp, klat, klon = _columns(reader.fieldnames, table)
            for line, row in enumerate(reader, start=2):
                rel = (row.get(kp) or "").strip()
                try:
                    lat, lon = float(row[klat]), float(row[klon])
                except (TypeError, ValueError):
                    skipped.append(f"line {line}: lat/lon not numbers")
                    continue
                if not rel or not (-90 <= lat <= 90 and -180 <= lon <= 180):
                    skipped.append(f"line {line}: empty path or coordinate out of range")
                    continue
                items.append(_csv_item(base, rel, lat, lon))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidArgumentError(f"{table}: cannot read the eval set CSV ({exc})") from exc
    return EvalSet(name=name or table.stem, kind="csv", source=table, items=tuple(items), skipped_rows=tuple(skipped))


def read_evalset(source: Path, *, images: Path | None = None, name: str | None = None) -> EvalSet:
    """A folder of geotagged photos or a CSV (see the module docstring); ``name`` defaults to the
    folder's name or the CSV's stem."""
    source = Path(source)
    if source.is_dir():
        if images is not None:
            raise InvalidArgumentError(f"{source} is a folder: --images is only for a CSV eval set")
        return read_folder(source, name)
    if source.is_file():
        return read_csv(source, images, name)
    raise InvalidArgumentError(f"{source}: no such eval set (a folder of geotagged photos or a CSV path,lat,lon)")
