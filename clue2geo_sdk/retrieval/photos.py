"""Photo galleries: the analyst's own geotagged photos as references (image -> image retrieval).

The paper's retrieval database is images with known coordinates; an analyst has exactly that for
their own area. :func:`clue2geo_sdk.retrieval.photo_build.build_gallery` embeds each photo with the
bundle's GPSCLIP *image* tower and stores, in one folder (the gallery format, this module's names)::

    manifest.json    format, SDK version, the image tower's sha256, dim, count, metric, dtype, digest
    gallery.duckdb   photos(key, path, sha256, lat, lon, source, taken_at, added_at): one row a photo
    vectors.f16      the embeddings, float16, row = key (memory-mapped: exact and subset search)
    index.usearch    USearch HNSW index over the same vectors (cosine, int8 scaled; key = row)
    index2.usearch   a second HNSW graph over the same rows, added in another order (above
                     PHOTO_TWIN_ABOVE rows: searched beside the first, see retrieval/search.py)
    errors.jsonl     what could not be added, one JSON line each, appended per run

The manifest is written last: a gallery is complete when it describes the rows beside it (their
digest, :func:`gallery_rows_digest`). :class:`PhotoGallery` opens a finished gallery as a
:class:`~clue2geo_sdk.retrieval.search.Store` with the search interface of the coordinate gallery;
it refuses a gallery built with another image tower, or one holding no photos.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .._native import duckdb_module, usearch_index
from ..errors import BundleFormatError
from .search import (
    EXACT_LIMIT,
    PHOTO_HNSW_EXPANSION,
    PHOTO_LONE_EXPANSION,
    PHOTO_RERANK,
    PHOTO_TWIN_ABOVE,
    PHOTO_TWIN_EXPANSION,
    PHOTO_TWIN_RETRY,
    SUBSET_BRUTE_FORCE,
    GalleryHit,
    Matches,
    brute_force,
    farthest,
    index_search,
    int8_scale,
    nearest,
    to_int8,
)

GALLERY_FORMAT_VERSION = 1
GALLERY_MANIFEST_FILE = "manifest.json"
DB = "gallery.duckdb"
VECTORS = "vectors.f16"
INDEX = "index.usearch"
INDEX2 = "index2.usearch"
ERRORS = "errors.jsonl"
SCHEMA = """
CREATE TABLE IF NOT EXISTS photos (
    key BIGINT PRIMARY KEY,
    path VARCHAR NOT NULL,
    sha256 VARCHAR NOT NULL UNIQUE,
    lat DOUBLE NOT NULL,
    lon DOUBLE NOT NULL,
    source VARCHAR NOT NULL,  -- where the coordinate came from: exif, xmp or csv
    taken_at VARCHAR,         -- EXIF DateTimeOriginal (ISO 8601, with its offset when recorded)
    added_at TIMESTAMP NOT NULL  -- UTC
)
"""


def read_manifest(out: Path) -> dict[str, Any]:
    """The manifest of the gallery folder ``out``, refused when it is not a photo gallery's or is
    of a newer format than this SDK reads."""
    path = out / GALLERY_MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        if (out / DB).is_file():
            raise BundleFormatError(_incomplete(out, f"rows but no {GALLERY_MANIFEST_FILE} yet")) from None
        raise BundleFormatError(
            f"{out}: not a photo gallery (no {GALLERY_MANIFEST_FILE}); build one with `clue2geo gallery build`"
        ) from None
    except (OSError, ValueError) as exc:
        raise BundleFormatError(f"{path}: unreadable gallery manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("kind") != "photos":
        raise BundleFormatError(f"{path}: not a photo gallery manifest")
    if int(manifest.get("format_version", 0)) > GALLERY_FORMAT_VERSION:
        raise BundleFormatError(
            f"{path}: gallery format {manifest.get('format_version')} is newer than this SDK reads "
            f"({GALLERY_FORMAT_VERSION})"
        )
    return manifest


def check_image_tower(root: Path, manifest: dict[str, Any], image_sha256: str) -> None:
    """A gallery's vectors mean something only to the GPSCLIP image tower that made them."""
    built_with = str(manifest.get("image_tower_sha256"))
    if built_with != image_sha256:
        raise BundleFormatError(
            f"photo gallery {root} was built with GPSCLIP image tower {built_with}, but the bundle's "
            f"image tower is {image_sha256}; rebuild it with `clue2geo gallery build --bundle` for this bundle"
        )


def _incomplete(path: Path, what: str) -> str:
    return (
        f"{path}: {what}: incomplete photo gallery (a build was interrupted?); "
        "run `clue2geo gallery build` again to finish it"
    )


def gallery_rows_digest(keys: Iterable[int], sha256s: Iterable[str], lat: Iterable[float], lon: Iterable[float]) -> str:
    """sha256 over a gallery's rows in key order: names the gallery's content in records, and lets
    the reader check that the manifest describes the rows next to it."""
    h = hashlib.sha256(b"clue2geo-photo-gallery-v1\n")
    for k, s, a, o in zip(keys, sha256s, lat, lon, strict=True):
        h.update(f"{int(k)},{s},{float(a)!r},{float(o)!r}\n".encode())
    return h.hexdigest()


def needs_second_graph(count: int) -> bool:
    """Whether a gallery of ``count`` rows keeps a second graph (``index2.usearch``): the writer
    builds one and the reader expects it (both read ``PHOTO_TWIN_ABOVE`` here, at call time)."""
    return count > PHOTO_TWIN_ABOVE


# -- reading a gallery -----------------------------------------------------------------------------


def _searchable_manifest(root: Path, image_sha256: str | None) -> dict[str, Any]:
    """``root``'s manifest, refused when it holds no photos or was made by another image tower."""
    manifest = read_manifest(root)
    count = manifest.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise BundleFormatError(f"{root / GALLERY_MANIFEST_FILE}: count {count!r} is not a number of photos")
    if count == 0:
        raise BundleFormatError(
            f"photo gallery {root} holds no photos (built from photos without GPS positions?): there is "
            "nothing to search; rebuild it with `clue2geo gallery build` from geotagged photos or a CSV of "
            "path,lat,lon"
        )
    if image_sha256 is not None:
        check_image_tower(root, manifest, image_sha256)
    return manifest


def _read_rows(root: Path, n: int) -> dict[str, np.ndarray]:
    """The gallery's rows (key, path, sha256, lat, lon) in key order, which must be keys 0..n-1."""
    duckdb = duckdb_module()
    try:
        with duckdb.connect(str(root / DB), read_only=True) as con:
            rows = con.execute("SELECT key, path, sha256, lat, lon FROM photos ORDER BY key").fetchnumpy()
    except duckdb.Error as exc:
        raise BundleFormatError(f"{root / DB}: unreadable gallery rows ({exc})") from exc
    keys = np.asarray(rows["key"], dtype=np.int64)
    if len(keys) != n or (n and (keys[0] != 0 or keys[-1] != n - 1)):
        raise BundleFormatError(_incomplete(root / DB, f"{len(keys)} rows where the manifest says {n}"))
    return rows


def _open_vectors(path: Path, n: int, dim: int) -> np.ndarray:
    """``vectors.f16``, memory-mapped, checked to hold the ``n`` rows."""
    have = path.stat().st_size // (2 * dim) if path.is_file() else 0
    if have < n:
        raise BundleFormatError(_incomplete(path, f"{have} vectors for {n} rows"))
    return np.memmap(path, dtype=np.float16, mode="r", shape=(n, dim)) if n else np.zeros((0, dim), np.float16)


def _open_graph(path: Path, dim: int, n: int) -> Any:
    """A gallery's HNSW graph, memory-mapped, checked against the rows it must hold."""
    try:
        index = usearch_index().Index.restore(str(path), view=True)
    except (ValueError, RuntimeError) as exc:
        raise BundleFormatError(_incomplete(path, f"unreadable index ({exc})")) from exc
    if index is None:
        raise BundleFormatError(_incomplete(path, "no index"))
    if index.ndim != dim:
        raise BundleFormatError(f"{path}: {index.ndim}-d vectors where the manifest says {dim}")
    if len(index) != n:
        raise BundleFormatError(_incomplete(path, f"{len(index)} vectors for {n} rows"))
    return index


@functools.cache
def _graph_threads() -> ThreadPoolExecutor:
    """Where second graphs are searched while the calling threads search the first ones (one
    worker per core, so concurrent callers are not queued behind each other)."""
    return ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="clue2geo-graph")


os.register_at_fork(after_in_child=_graph_threads.cache_clear)  # a forked child has no workers


class PhotoGallery:
    """A built photo gallery, read-only and memory-mapped; safe to query from several threads.
    ``image_sha256`` (the bundle's GPSCLIP image tower) refuses a gallery embedded by another.
    A :class:`~clue2geo_sdk.retrieval.search.Store`: its hooks below feed the shared search."""

    kind = "photos"

    def __init__(self, path: str | Path, *, image_sha256: str | None = None) -> None:
        self.root = Path(path)
        self.manifest = _searchable_manifest(self.root, image_sha256)
        dim, n = int(self.manifest["dim"]), int(self.manifest["count"])
        rows = _read_rows(self.root, n)
        self.digest = gallery_rows_digest(rows["key"], rows["sha256"], rows["lat"], rows["lon"])
        if self.digest != self.manifest.get("content_sha256"):
            raise BundleFormatError(_incomplete(self.root / DB, "the rows are not the ones the manifest describes"))
        self.vectors = _open_vectors(self.root / VECTORS, n, dim)
        self._open_graphs(dim, n)
        self.scale = int8_scale(dim)
        self.rerank = PHOTO_RERANK
        self.subset_limit = n if self.exact else SUBSET_BRUTE_FORCE
        self.lat = np.asarray(rows["lat"], dtype=np.float64)
        self.lon = np.asarray(rows["lon"], dtype=np.float64)
        self.paths = rows["path"]
        self.sha256 = rows["sha256"]

    def _open_graphs(self, dim: int, n: int) -> None:
        """Exact galleries are brute-forced over the float16 vectors (SIMD, no index rounding);
        larger ones search the HNSW graph(s) and re-score the top PHOTO_RERANK. An int8 index is
        queried with the query scaled as its vectors were; the index file itself says whether it
        is int8 (a rebuild cut short leaves a new index beside the old manifest)."""
        self.index = _open_graph(self.root / INDEX, dim, n)
        self.int8 = str(self.index.dtype).lower().endswith("i8")
        self.exact = n <= EXACT_LIMIT
        self.twin: Any = None
        if not self.exact and self.manifest.get("index", {}).get("graphs", 1) == 2:
            self.twin = _open_graph(self.root / INDEX2, dim, n)
            if str(self.twin.dtype) != str(self.index.dtype):
                raise BundleFormatError(
                    f"{self.root / INDEX2}: {self.twin.dtype} where {INDEX} is {self.index.dtype}; "
                    "run `clue2geo gallery build` on it again to rebuild the graphs"
                )
        if self.twin is not None:
            self.index.expansion_search = self.twin.expansion_search = PHOTO_TWIN_EXPANSION
        elif not self.exact:  # a large gallery from before second graphs: one graph, searched wider
            self.index.expansion_search = PHOTO_LONE_EXPANSION if needs_second_graph(n) else PHOTO_HNSW_EXPANSION

    def __len__(self) -> int:
        return len(self.lat)

    def most_similar(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[GalleryHit]:
        """The k nearest rows; ``allowed`` (sorted keys) restricts the search to those rows."""
        return nearest(self, query, k, allowed)

    def least_similar(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[GalleryHit]:
        """The k rows of lowest cosine to ``query`` (see :func:`~clue2geo_sdk.retrieval.search.farthest`)."""
        return farthest(self, query, k, allowed)

    # -- the Store hooks (clue2geo_sdk.retrieval.search.Store) --

    def vectors_of(self, keys: np.ndarray) -> np.ndarray:
        return np.asarray(self.vectors[keys])

    def index_query(self, q: np.ndarray) -> np.ndarray:
        """``q`` as the index takes it (an int8 index: scaled as its vectors were)."""
        return to_int8(q / max(float(np.linalg.norm(q)), 1e-12), self.scale) if self.int8 else q

    def candidates(self, q: np.ndarray, count: int, exact: bool) -> Matches:
        """With a second graph both are searched at once (USearch releases the GIL) and their
        candidates merged: a query that one graph's upper layers strand, the other finds. Two
        graphs that share almost none of their candidates means one (or both) was stranded: both
        are searched again, wider (PHOTO_TWIN_RETRY; ~5 % of queries at 5M)."""
        if self.twin is None or exact:
            return index_search(self.index, self.index_query(q), count, exact)
        qi = self.index_query(q)
        both = self._both(qi, count, count)
        if len(np.intersect1d(both[0].keys, both[1].keys)) < count // 4 and count < PHOTO_TWIN_RETRY:
            both = self._both(qi, PHOTO_TWIN_RETRY, count)
        keys = np.concatenate([m.keys for m in both])
        distances = np.concatenate([m.distances for m in both])
        keys, at = np.unique(keys, return_index=True)  # sorted by key: rescore orders them
        return Matches(keys=keys, distances=distances[at])

    def _both(self, qi: np.ndarray, count: int, keep: int) -> list[Matches]:
        """The best ``keep`` of each graph's top ``count`` for the index-form query ``qi`` (the
        second graph searched in another thread meanwhile)."""
        second = _graph_threads().submit(self.twin.search, qi, count, threads=1)
        found = [self.index.search(qi, count, threads=1), second.result()]
        return [
            Matches(keys=np.asarray(m.keys[:keep], np.int64), distances=np.asarray(m.distances[:keep], np.float32))
            for m in found
        ]

    def unrestricted(self, q: np.ndarray, k: int) -> Matches:
        if self.exact:
            return brute_force(self.vectors, q, k)
        m = self.candidates(q, min(len(self), max(k, self.rerank)), False)
        return self.rescore(q, m.keys, m.distances, k)  # int8 distances are coarse: always re-scored

    def rescore(self, q: np.ndarray, keys: np.ndarray, distances: np.ndarray, k: int) -> Matches:
        order = np.sort(keys)  # sorted reads from the memory map
        m = brute_force(self.vectors_of(order), q, k)
        return Matches(keys=order[m.keys], distances=m.distances)

    def hit(self, key: int, cosine: float) -> GalleryHit:
        return GalleryHit(
            key=key, lat=float(self.lat[key]), lon=float(self.lon[key]), cosine=cosine, path=str(self.paths[key])
        )
