"""The bundle's coordinate gallery: GPSCLIP location embeddings of GPS points (a USearch index) and
their rows (lat, lon, country, city in the bundle's DuckDB), queried with a photo's image embedding."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .._native import duckdb_module, usearch_index
from ..errors import BundleFormatError
from .search import EXACT_LIMIT, GalleryHit, IndexStore

# expansion_search of the coordinate gallery when searched by HNSW (cross-modal queries: wide).
HNSW_EXPANSION = 1024


class CoordinateGallery(IndexStore):
    """The bundle's coordinate gallery. Read-only; safe to query from several threads (USearch
    search and numpy lookups don't mutate)."""

    kind = "coordinates"

    def __init__(
        self,
        index_path: Path,
        db_path: Path,
        *,
        dim: int,
        encoder_sha256: str,
        location_sha256: str,
        digest: str | None = None,
    ) -> None:
        """``digest`` names this gallery in records (the bundle manifest's sha256 of the index
        file); None hashes the index file's size and first MiB instead (cheap, and enough to tell
        galleries apart)."""
        if encoder_sha256 != location_sha256:
            raise BundleFormatError(
                f"gallery {index_path} was built with location encoder {encoder_sha256[:12]}…, but the bundle's "
                f"GPSCLIP location tower is {location_sha256[:12]}…; rebuild the gallery with this encoder"
            )
        self.index = usearch_index().Index.restore(str(index_path), view=True)
        if self.index is None or self.index.ndim != dim:
            raise BundleFormatError(f"{index_path}: not a USearch index of dimension {dim}")
        with duckdb_module().connect(str(db_path), read_only=True) as con:
            rows = con.execute("SELECT key, lat, lon, country, city FROM gallery ORDER BY key").fetchnumpy()
        keys = np.asarray(rows["key"], dtype=np.int64)
        if len(keys) != len(self.index) or (len(keys) and (keys[0] != 0 or keys[-1] != len(keys) - 1)):
            raise BundleFormatError(f"{db_path}: gallery rows do not match the {len(self.index)} index keys")
        self.exact = len(self.index) <= EXACT_LIMIT
        if not self.exact:
            self.index.expansion_search = HNSW_EXPANSION
        # Reading vectors back from a USearch view is slow (~5 us a key): past ~2K keys, an
        # oversampled exact search of the whole (exact) gallery is cheaper than fetching a subset.
        self.subset_limit = 2_000 if self.exact else 5_000
        self.lat = np.asarray(rows["lat"], dtype=np.float64)
        self.lon = np.asarray(rows["lon"], dtype=np.float64)
        self.country = rows["country"]
        self.city = rows["city"]
        self.digest = digest or _file_digest(Path(index_path))

    def hit(self, key: int, cosine: float) -> GalleryHit:
        return GalleryHit(
            key=key,
            lat=float(self.lat[key]),
            lon=float(self.lon[key]),
            cosine=cosine,
            country=str(self.country[key] or ""),
            city=str(self.city[key] or ""),
        )


def _file_digest(path: Path) -> str:
    """sha256 of a file's size and first MiB: tells galleries apart without reading gigabytes."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
    return h.hexdigest()
