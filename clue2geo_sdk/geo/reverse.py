"""Offline reverse geocoding against the bundle's GeoNames ``cities`` table (DuckDB).

Nearest place by great-circle distance: points become unit vectors, and the largest dot product
is the smallest angle, so one matrix-vector product over ~150k places answers a query exactly.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np

from .._native import duckdb_module
from .distance import haversine_km, unit_vectors


@attrs.frozen(kw_only=True)
class Place:
    """The nearest GeoNames place to a point, and how far it is."""

    city: str
    admin1: str
    country: str
    country_code: str
    lat: float
    lon: float
    distance_km: float

    def to_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


class ReverseGeocoder:
    """Loads the cities table once; :meth:`lookup` is then a pure numpy query (thread-safe)."""

    def __init__(self, duckdb_path: str | Path) -> None:
        with duckdb_module().connect(str(duckdb_path), read_only=True) as con:
            rows = con.execute(
                "SELECT name, admin1, country, country_code, lat, lon FROM cities ORDER BY rowid"
            ).fetchnumpy()
        self._names = rows["name"]
        self._admin1 = rows["admin1"]
        self._country = rows["country"]
        self._cc = rows["country_code"]
        self._lat = np.asarray(rows["lat"], dtype=np.float64)
        self._lon = np.asarray(rows["lon"], dtype=np.float64)
        self._xyz = unit_vectors(self._lat, self._lon)

    def __len__(self) -> int:
        return len(self._lat)

    def lookup(self, lat: float, lon: float, *, country_code: str | None = None) -> Place:
        """The nearest place; with ``country_code``, the nearest place in that country (when it has any),
        so a point near a border is not named after the town across it."""
        dots = self._xyz @ unit_vectors(np.array([lat]), np.array([lon]))[0]
        if country_code:
            same = self._cc == country_code
            if same.any():
                dots = np.where(same, dots, -np.inf)
        i = int(np.argmax(dots))
        return Place(
            city=str(self._names[i]),
            admin1=str(self._admin1[i] or ""),
            country=str(self._country[i] or ""),
            country_code=str(self._cc[i] or ""),
            lat=float(self._lat[i]),
            lon=float(self._lon[i]),
            distance_km=float(haversine_km(lat, lon, self._lat[i], self._lon[i])),
        )
