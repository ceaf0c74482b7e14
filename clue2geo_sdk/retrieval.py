"""The coordinate gallery: a memory-mapped USearch index of location embeddings + DuckDB rows.

Most similar: nearest neighbours of the GPSCLIP image embedding. Least similar: nearest
neighbours of the *negated* query, i.e. the largest cosine distance (G3's negative references).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np

from .errors import BundleFormatError


@attrs.frozen(kw_only=True)
class GalleryHit:
    key: int
    lat: float
    lon: float
    cosine: float
    country: str = ""
    city: str = ""

    def to_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


class Gallery:
    """Read-only; safe to query from several threads (USearch search and numpy lookups don't mutate)."""

    def __init__(self, index_path: Path, db_path: Path, *, dim: int, encoder_sha256: str, location_sha256: str) -> None:
        import duckdb
        from usearch.index import Index

        if encoder_sha256 != location_sha256:
            raise BundleFormatError(
                f"gallery {index_path} was built with location encoder {encoder_sha256[:12]}…, but the bundle's "
                f"GPSCLIP location tower is {location_sha256[:12]}…; rebuild the gallery with this encoder"
            )
        self.index = Index.restore(str(index_path), view=True)
        if self.index is None or self.index.ndim != dim:
            raise BundleFormatError(f"{index_path}: not a USearch index of dimension {dim}")
        with duckdb.connect(str(db_path), read_only=True) as con:
            rows = con.execute("SELECT key, lat, lon, country, city FROM gallery ORDER BY key").fetchnumpy()
        keys = np.asarray(rows["key"], dtype=np.int64)
        if len(keys) != len(self.index) or (len(keys) and (keys[0] != 0 or keys[-1] != len(keys) - 1)):
            raise BundleFormatError(f"{db_path}: gallery rows do not match the {len(self.index)} index keys")
        self.lat = np.asarray(rows["lat"], dtype=np.float64)
        self.lon = np.asarray(rows["lon"], dtype=np.float64)
        self.country = rows["country"]
        self.city = rows["city"]

    def __len__(self) -> int:
        return len(self.lat)

    def _hits(self, matches, sign: float) -> list[GalleryHit]:  # noqa: ANN001
        return [
            GalleryHit(key=int(k), lat=float(self.lat[k]), lon=float(self.lon[k]), cosine=float(sign * (1.0 - d)),
                       country=str(self.country[k] or ""), city=str(self.city[k] or ""))  # fmt: skip
            for k, d in zip(matches.keys, matches.distances, strict=True)
        ]

    def most_similar(self, query: np.ndarray, k: int) -> list[GalleryHit]:
        return self._hits(self.index.search(np.asarray(query, dtype=np.float32), k), 1.0)

    def least_similar(self, query: np.ndarray, k: int) -> list[GalleryHit]:
        """Nearest to -query: cos(x, -q) = -cos(x, q), so these have the lowest cosine to q."""
        hits = self._hits(self.index.search(-np.asarray(query, dtype=np.float32), k), -1.0)
        return hits
