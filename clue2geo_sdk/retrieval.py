"""The coordinate gallery: a memory-mapped USearch index of location embeddings + DuckDB rows.

Most similar: nearest neighbours of the GPSCLIP image embedding. Least similar: nearest
neighbours of the *negated* query, i.e. the largest cosine distance (G3's negative references).

Search is exact (brute force over the memory-mapped vectors) up to ``EXACT_LIMIT`` rows: on the
100K demo gallery HNSW at the default expansion (64) found only 5 of the exact top 15 for an
image query (cosines ~0.2, all close), while exact search takes ~15 ms. Larger galleries use HNSW
with a wide expansion (1024: 15/15 on the same query, 3 ms).
"""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np

from .errors import BundleFormatError

EXACT_LIMIT = 2_000_000
HNSW_EXPANSION = 1024


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

        from ._native import usearch_index

        if encoder_sha256 != location_sha256:
            raise BundleFormatError(
                f"gallery {index_path} was built with location encoder {encoder_sha256[:12]}…, but the bundle's "
                f"GPSCLIP location tower is {location_sha256[:12]}…; rebuild the gallery with this encoder"
            )
        self.index = usearch_index().Index.restore(str(index_path), view=True)
        if self.index is None or self.index.ndim != dim:
            raise BundleFormatError(f"{index_path}: not a USearch index of dimension {dim}")
        with duckdb.connect(str(db_path), read_only=True) as con:
            rows = con.execute("SELECT key, lat, lon, country, city FROM gallery ORDER BY key").fetchnumpy()
        keys = np.asarray(rows["key"], dtype=np.int64)
        if len(keys) != len(self.index) or (len(keys) and (keys[0] != 0 or keys[-1] != len(keys) - 1)):
            raise BundleFormatError(f"{db_path}: gallery rows do not match the {len(self.index)} index keys")
        self.exact = len(self.index) <= EXACT_LIMIT
        if not self.exact:
            self.index.expansion_search = HNSW_EXPANSION
        self.lat = np.asarray(rows["lat"], dtype=np.float64)
        self.lon = np.asarray(rows["lon"], dtype=np.float64)
        self.country = rows["country"]
        self.city = rows["city"]

    def __len__(self) -> int:
        return len(self.lat)

    def _hits(self, matches, sign: float) -> list[GalleryHit]:  # noqa: ANN001
        return [
            GalleryHit(
                key=int(k),
                lat=float(self.lat[k]),
                lon=float(self.lon[k]),
                cosine=float(sign * (1.0 - d)),
                country=str(self.country[k] or ""),
                city=str(self.city[k] or ""),
            )
            for k, d in zip(matches.keys, matches.distances, strict=True)
        ]

    def _search(self, query: np.ndarray, k: int):  # noqa: ANN202
        return self.index.search(np.asarray(query, dtype=np.float32), k, exact=self.exact)

    def most_similar(self, query: np.ndarray, k: int) -> list[GalleryHit]:
        return self._hits(self._search(query, k), 1.0)

    def least_similar(self, query: np.ndarray, k: int) -> list[GalleryHit]:
        """Nearest to -query: cos(x, -q) = -cos(x, q), so these have the lowest cosine to q."""
        return self._hits(self._search(-np.asarray(query, dtype=np.float32), k), -1.0)
