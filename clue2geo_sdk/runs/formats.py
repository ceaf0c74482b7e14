"""Results as tables: a CSV row or a GeoJSON feature per record, and the csv / geojson files.

The journal (JSONL) is the truth; a csv or geojson output is written from it, all or nothing
(:func:`clue2geo_sdk.files.atomic_write`), from the latest record per image. Every CSV text cell is
made spreadsheet-safe, and no NaN or Infinity reaches either file (they are not JSON).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Literal

from ..files import atomic_write
from ..sanitize import csv_cell
from .records import Record, is_finite_number, record_keys
from .resume import latest_records

Format = Literal["jsonl", "csv", "geojson"]
CSV_FIELDS = (
    "path",
    "status",
    "lat",
    "lon",
    "country",
    "country_code",
    "admin1",
    "city",
    "landmark",
    "model_country",
    "model_city",
    "confidence",
    "similarity",
    "spread_km",
    "source",
    "fallback",
    "invalid_candidates",
    "region",
    "outside_region",
    "cues_status",
    "image_sha256",
    "bundle",
    "bundle_digest",
    "options_digest",
    "sdk_version",
    "demo",
    "seconds",
    "error",
    "message",
    "metadata_lat",
    "metadata_lon",
    "metadata_source",
    "metadata_distance_km",
    "metadata_datetime_original",
    "metadata_problems",
    "started_utc",
    "finished_utc",
    "record_hash",
)


#: Columns made from the record's ``metadata`` (the photo's own position and time), not record keys.
METADATA_COLUMNS = (
    "metadata_lat",
    "metadata_lon",
    "metadata_source",
    "metadata_datetime_original",
    "metadata_problems",
)
record_keys(*(c for c in CSV_FIELDS if c not in METADATA_COLUMNS))  # every other column is a record key


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _metadata_value(rec: Record, column: str) -> Any:
    """A ``metadata_*`` column's cell, from the record's ``metadata`` (whatever it holds)."""
    meta = _mapping(rec.metadata)
    if column == "metadata_problems":
        problems = meta.get("problems")
        return ("; ".join(map(str, problems)) or None) if isinstance(problems, list) else None
    if column == "metadata_datetime_original":
        return meta.get("datetime_original")
    return _mapping(meta.get("position")).get(column[len("metadata_") :])


def _csv_value(rec: Record, column: str) -> Any:
    if column == "region":
        return json.dumps(rec.region, separators=(",", ":")) if rec.region else None
    if column in METADATA_COLUMNS:
        return _metadata_value(rec, column)
    value = getattr(rec, column)  # a record key (checked above)
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (Mapping, list)) else value


def csv_row(rec: Record | Mapping[str, Any]) -> dict[str, Any]:
    """A record as one spreadsheet-safe CSV row (text cells that start a formula are neutralised);
    ``metadata_*`` cells come from the record's ``metadata`` (the photo's own position and time).
    Never raises on a field of the wrong type (a nested value becomes its JSON text)."""
    row = Record.of(rec).finite()
    return {k: csv_cell(_csv_value(row, k)) for k in CSV_FIELDS}


def record_to_feature(rec: Record | Mapping[str, Any]) -> dict[str, Any] | None:
    """An ok record as a GeoJSON Point feature; None for an error record or one without a valid position."""
    r = Record.of(rec)
    if not (r.ok and is_finite_number(r.lat) and is_finite_number(r.lon)):
        return None
    r = r.finite()
    props = {k: v for k, v in r.to_dict().items() if k not in ("lat", "lon")}
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [r.lon, r.lat]},
        "properties": props,
    }


def write_geojson(path: Path, records: Iterable[Record | Mapping[str, Any]]) -> None:
    """The ok records with a position as a GeoJSON FeatureCollection (no NaN or Infinity: not JSON)."""
    features = [f for f in map(record_to_feature, records) if f is not None]
    doc = {"type": "FeatureCollection", "features": features}
    atomic_write(path, json.dumps(doc, ensure_ascii=False, allow_nan=False))


def write_csv(path: Path, records: Iterable[Record | Mapping[str, Any]]) -> None:
    """CSV_FIELDS of each record, every cell through :func:`csv_cell` (numbers stay numbers)."""

    def write(fh: IO[Any]) -> None:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(csv_row(r) for r in records)

    atomic_write(path, write)


def write_output(out: Path, fmt: Format, records: Iterable[Record | Mapping[str, Any]]) -> None:
    """Write a csv or geojson output from the latest record per path (jsonl is its own journal)."""
    rows = list(latest_records(records).values())
    if fmt == "csv":
        write_csv(out, rows)
    elif fmt == "geojson":
        write_geojson(out, rows)
