"""What a photo gallery is built from: a folder of geotagged photos, or a CSV of ``path,lat,lon``."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import attrs

from ..errors import Clue2GeoError
from ..inputs.discover import discover


class GalleryBuildError(Clue2GeoError, ValueError):
    """The gallery source or output cannot be used at all (not one bad photo: those are recorded)."""


@attrs.frozen(kw_only=True)
class SourcePhoto:
    """One photo to add; ``lat``/``lon`` given by a CSV, else read from the photo's EXIF/XMP."""

    path: Path
    lat: float | None = None
    lon: float | None = None
    line: int | None = None


@attrs.frozen(kw_only=True)
class Problem:
    """A photo or CSV row that was not added, and why. ``kind``: "unreadable" or "bad_row" (a
    failure), "no_position" (a photo without GPS in a folder source: skipped, not a failure) or
    "conflict" (a second, different position for a photo already added: the first is kept)."""

    source: str
    kind: str
    message: str
    line: int | None = None

    @property
    def failed(self) -> bool:
        return self.kind not in ("no_position", "conflict")

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _coordinate(text: str, name: str, limit: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number") from None
    if not math.isfinite(value) or abs(value) > limit:
        raise ValueError(f"{name} {text!r} is outside [-{limit:g}, {limit:g}]")
    return value


def read_csv_source(csv_path: Path) -> tuple[list[SourcePhoto], list[Problem]]:
    """Rows ``path,lat,lon`` (a header naming those columns is optional; other columns are ignored).
    Relative paths are resolved against the CSV's folder. Bad rows become :class:`Problem`s with
    their line number."""
    photos: list[SourcePhoto] = []
    problems: list[Problem] = []
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise GalleryBuildError(f"{csv_path}: cannot read the CSV ({exc})") from exc
    rows = list(csv.reader(text.splitlines()))
    cols, start = (0, 1, 2), 0
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if {"path", "lat", "lon"} <= set(header):
        cols, start = (header.index("path"), header.index("lat"), header.index("lon")), 1
    for number, row in enumerate(rows[start:], start=start + 1):
        if not any(c.strip() for c in row):
            continue
        where = f"{csv_path}:{number}"
        try:
            if len(row) <= max(cols):
                raise ValueError(f"{len(row)} fields, expected path,lat,lon")
            rel = row[cols[0]].strip()
            if not rel:
                raise ValueError("empty path")
            lat = _coordinate(row[cols[1]].strip(), "lat", 90.0)
            lon = _coordinate(row[cols[2]].strip(), "lon", 180.0)
        except ValueError as exc:
            problems.append(Problem(source=where, kind="bad_row", message=f"{where}: {exc}", line=number))
            continue
        path = Path(rel).expanduser()
        photos.append(
            SourcePhoto(path=path if path.is_absolute() else csv_path.parent / path, lat=lat, lon=lon, line=number)
        )
    return photos, problems


def read_source(src: Path, *, recursive: bool = True) -> tuple[list[SourcePhoto], list[Problem]]:
    """A folder (coordinates from each photo's EXIF/XMP) or a ``.csv`` of ``path,lat,lon``."""
    if src.is_dir():
        photos, problems = [], []
        for item in discover([src], recursive=recursive):
            if isinstance(item, Path):
                photos.append(SourcePhoto(path=item))
            else:
                problems.append(Problem(source=item.image, kind="unreadable", message=item.message))
        return photos, problems
    if src.suffix.lower() == ".csv" and src.is_file():
        return read_csv_source(src)
    raise GalleryBuildError(f"{src}: not a folder of photos nor a .csv file of path,lat,lon")
