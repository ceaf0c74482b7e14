"""The search both gallery kinds share: int8 helpers, exact brute force, and the search over a Store.

Two kinds implement :class:`Store`: the bundle's *coordinate* gallery
(:class:`clue2geo_sdk.retrieval.coordinates.CoordinateGallery`, GPSCLIP location embeddings of GPS
points, queried with the photo's image embedding) and the analyst's *photo* gallery
(:class:`clue2geo_sdk.retrieval.photos.PhotoGallery`, GPSCLIP image embeddings of geotagged reference
photos: image -> image retrieval). Both offer :class:`GallerySearch` to the pipeline.

Most similar: nearest neighbours of the query. Least similar: nearest neighbours of the *negated*
query, i.e. the largest cosine distance (G3's negative references).

Exact or HNSW (measured with ``bench/retrieval.py``, docs/gallery.md): exact search costs ~8 ms
per query at 100K float16 rows and grows linearly (~80 ms at 1M), so galleries up to
``EXACT_LIMIT`` rows are searched exactly (recall 1; and the coordinate gallery's cross-modal
queries, cosines ~0.2 all close, are where HNSW struggles most: at expansion 64 it found 5 of the
exact top 15 on the demo gallery). Larger ones use HNSW.

``allowed`` (a sorted array of keys, e.g. a region's) restricts a search to those rows, for any
subset: small subsets are searched by brute force over their own vectors; large ones by an
oversampled search whose results are filtered, widened until k allowed rows are found (in the end
an exact search over everything, so a result never lacks an allowed row for want of looking).
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs
import numpy as np

from .._native import usearch_index

EXACT_LIMIT = 100_000
# Photo galleries above EXACT_LIMIT (bench/retrieval.py, bench/gallery_scale.py, docs/gallery.md):
# an int8 HNSW index of scaled vectors (``to_int8``), connectivity 32, expansion_add 128, its top
# 64 re-scored from the float16 vectors. Up to 1M rows one graph, searched at expansion 192:
# recall@15 0.996-0.999 at 1M clustered 512-d vectors, p50 1.0-1.3 ms on two cores. Larger graphs
# lose recall mostly to whole queries that the descent through the upper layers strands in the
# wrong neighbourhood (5M: 3 % find none of their 15 at expansion 128; one graph needs expansion
# 768, ~5 ms, for 0.99). A second graph over the same rows, added in another order so that other
# rows reach the upper layers, strands other queries: above PHOTO_TWIN_ABOVE rows both are searched
# at once in two threads and the union of their candidates re-scored, and when the two share
# almost nothing (one or both stranded: ~5 % of queries) both are searched again wider. 5M places
# world: recall@15 0.9927 at p50 1.84 ms (0.967 at 1.35 ms for one graph at the same expansion).
PHOTO_INDEX_DTYPE = "i8"
PHOTO_INDEX_CONNECTIVITY = 32
PHOTO_INDEX_EXPANSION_ADD = 128
PHOTO_HNSW_EXPANSION = 192
PHOTO_TWIN_ABOVE = 1_000_000
PHOTO_TWIN_EXPANSION = 128
# Two graphs whose candidates barely overlap are searched again for this many (expansion as wide).
PHOTO_TWIN_RETRY = 512
# A gallery above PHOTO_TWIN_ABOVE built before second graphs existed (until its next build).
PHOTO_LONE_EXPANSION = 512
PHOTO_RERANK = 64
# Allowed subsets up to this many rows are searched by brute force over their own vectors.
SUBSET_BRUTE_FORCE = 50_000
# int8 indexes get vectors pre-scaled by this many standard deviations of a unit vector's component
# (1/sqrt(dim)) per 127 steps. USearch's own float -> int8 cast multiplies by 127, which leaves a
# 512-d unit vector's components only ~+-6 steps: exact int8 search then finds 75 % of the true top
# 15; scaled, 96 % (and 99.8 % once its top 64 are re-scored). Cosine ignores the scale; the rare
# component beyond 5 sigma is clipped.
INT8_SIGMAS = 5.0


def int8_scale(dim: int) -> float:
    """The factor that maps a unit vector of ``dim`` components onto int8 (see ``INT8_SIGMAS``)."""
    return 127.0 * float(np.sqrt(dim)) / INT8_SIGMAS


def to_int8(vectors: np.ndarray, scale: float) -> np.ndarray:
    """``vectors`` (unit-normalized) as int8 for an int8 USearch index, clipped to +-127."""
    return np.clip(np.rint(np.asarray(vectors, dtype=np.float32) * scale), -127, 127).astype(np.int8)


@attrs.frozen(kw_only=True)
class GalleryHit:
    """One reference: a gallery row, its coordinate and cosine to the query. ``path`` is the
    reference photo's path for a photo gallery, empty for the coordinate gallery."""

    key: int
    lat: float
    lon: float
    cosine: float
    country: str = ""
    city: str = ""
    path: str = ""

    def to_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


class GallerySearch(Protocol):
    """What the pipeline needs from a gallery (either kind)."""

    kind: str
    digest: str
    lat: np.ndarray
    lon: np.ndarray

    def __len__(self) -> int: ...

    def most_similar(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[GalleryHit]: ...

    def least_similar(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[GalleryHit]: ...


@attrs.frozen
class Matches:
    """Keys (int64) and cosine distances, best first."""

    keys: np.ndarray
    distances: np.ndarray


def no_matches() -> Matches:
    return Matches(keys=np.zeros(0, dtype=np.int64), distances=np.zeros(0, dtype=np.float32))


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> Matches:
    """Exact top-k by cosine over ``vectors`` (row numbers as keys), with USearch's SIMD kernels
    (float16 rows are not converted to float32 first, which would cost more than the search)."""
    k = min(k, len(vectors))
    if k <= 0:
        return no_matches()
    q = np.asarray(query, dtype=vectors.dtype)
    m = usearch_index().search(np.ascontiguousarray(vectors), q, k, "cos", exact=True, threads=1)
    return Matches(keys=np.asarray(m.keys, dtype=np.int64), distances=np.asarray(m.distances, dtype=np.float32))


def index_search(index: Any, query: np.ndarray, count: int, exact: bool) -> Matches:
    """A USearch index's top ``count`` for ``query`` (already in the index's own form)."""
    m = index.search(query, count, exact=exact)
    return Matches(keys=np.asarray(m.keys, dtype=np.int64), distances=np.asarray(m.distances, dtype=np.float32))


class Store(Protocol):
    """What :func:`search_store` needs from a gallery: its size and settings, and five hooks."""

    exact: bool  # the whole gallery is searched exactly (no HNSW)
    subset_limit: int  # allowed subsets up to this size are brute-forced over :meth:`vectors_of`
    rerank: int  # how many index results :meth:`rescore` re-scores (0: the index's own distances)

    def __len__(self) -> int: ...

    def vectors_of(self, keys: np.ndarray) -> np.ndarray:
        """The stored vectors of ``keys`` (sorted), one row each."""
        ...

    def candidates(self, q: np.ndarray, count: int, exact: bool) -> Matches:
        """The index's top ``count`` for the float query ``q`` (any order)."""
        ...

    def unrestricted(self, q: np.ndarray, k: int) -> Matches:
        """Top k of the whole gallery, best first."""
        ...

    def rescore(self, q: np.ndarray, keys: np.ndarray, distances: np.ndarray, k: int) -> Matches:
        """The best k of candidate ``keys``, best first."""
        ...

    def hit(self, key: int, cosine: float) -> GalleryHit:
        """Row ``key`` as a reference at ``cosine`` to the query."""
        ...


def search_store(store: Store, query: np.ndarray, k: int, allowed: np.ndarray | None) -> Matches:
    """The top k of ``store`` for ``query``; ``allowed`` (sorted keys) restricts it to those rows."""
    q = np.asarray(query, dtype=np.float32)
    n = len(store)
    if allowed is None:
        return store.unrestricted(q, k)
    allowed = np.asarray(allowed, dtype=np.int64)
    if len(allowed) == 0 or k <= 0:
        return no_matches()
    if allowed[0] < 0 or allowed[-1] >= n:
        raise ValueError(f"allowed keys must lie in [0, {n}); got {allowed[0]}..{allowed[-1]}")
    if len(allowed) <= store.subset_limit:
        m = brute_force(store.vectors_of(allowed), q, k)
        return Matches(keys=allowed[m.keys], distances=m.distances)
    # Oversample by the inverse of the allowed fraction, filter, and widen until enough are
    # found (k, or the top ``rerank`` for re-scoring, as an unrestricted search would).
    # HNSW's search widens its own expansion to the count asked for; the last try is exact.
    target = max(k, store.rerank)
    want = min(n, int(np.ceil(2 * target * n / len(allowed))) + target)
    while True:
        m = store.candidates(q, want, store.exact or want >= n)
        pos = np.minimum(np.searchsorted(allowed, m.keys), len(allowed) - 1)
        ok = allowed[pos] == m.keys
        if ok.sum() >= min(target, len(allowed)) or want >= n:
            return store.rescore(q, m.keys[ok], m.distances[ok], k)
        want = min(n, want * 4)


def nearest(store: Store, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[GalleryHit]:
    """The k rows most similar to ``query``; ``allowed`` (sorted keys) restricts the search."""
    m = search_store(store, query, k, allowed)
    return [store.hit(int(key), float(1.0 - d)) for key, d in zip(m.keys, m.distances, strict=True)]


def farthest(store: Store, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[GalleryHit]:
    """Nearest to -query: cos(x, -q) = -cos(x, q), so these have the lowest cosine to ``query``."""
    m = search_store(store, -np.asarray(query, dtype=np.float32), k, allowed)
    return [store.hit(int(key), float(-(1.0 - d))) for key, d in zip(m.keys, m.distances, strict=True)]


class IndexStore:
    """A :class:`Store` whose vectors live in one USearch index (``index``, a view or in memory): the
    coordinate gallery, and in-memory galleries in tests. A subclass sets ``index``, ``exact``,
    ``lat``, ``lon`` and implements :meth:`hit`."""

    index: Any
    exact: bool
    lat: np.ndarray
    lon: np.ndarray
    subset_limit: int = SUBSET_BRUTE_FORCE
    rerank: int = 0  # the index's own distances are kept

    def __len__(self) -> int:
        return len(self.lat)

    def vectors_of(self, keys: np.ndarray) -> np.ndarray:
        got = self.index.get(np.asarray(keys, dtype=np.uint64))
        return np.asarray(got, dtype=np.float32).reshape(len(keys), -1)

    def hit(self, key: int, cosine: float) -> GalleryHit:
        raise NotImplementedError

    def candidates(self, q: np.ndarray, count: int, exact: bool) -> Matches:
        return index_search(self.index, q, count, exact)

    def unrestricted(self, q: np.ndarray, k: int) -> Matches:
        return self.candidates(q, min(k, len(self)), self.exact)

    def rescore(self, q: np.ndarray, keys: np.ndarray, distances: np.ndarray, k: int) -> Matches:
        return Matches(keys=keys[:k], distances=distances[:k])

    def most_similar(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[GalleryHit]:
        """The k nearest rows; ``allowed`` (sorted keys) restricts the search to those rows."""
        return nearest(self, query, k, allowed)

    def least_similar(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[GalleryHit]:
        """The k rows of lowest cosine to ``query`` (see :func:`farthest`)."""
        return farthest(self, query, k, allowed)
