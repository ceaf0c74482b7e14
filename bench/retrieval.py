"""Retrieval benchmark: USearch HNSW (f32 / f16 / i8 / scaled i8, optional exact re-rank) vs exact search.

Prints (and with ``--out`` writes) JSON: per size and index setting, build time, index size, and for
each ``expansion_search`` value recall@15 against exact float32 search with p50/p99 single-query
latency: the recall/latency curve. Also the exact-search latency per gallery size, from which
:mod:`clue2geo_sdk.retrieval.search` picks where exact search stops and HNSW starts.

    # what photo galleries use: scaled int8, connectivity 32, expansion_add 128, top 64 re-scored
    python bench/retrieval.py --sizes 1000000 --index i8s:32:128 --ef 128 256 512 --rerank 64 \
        --index-dir /tmp/ret/idx1m --out /tmp/ret/1m.json      # an index already in --index-dir is reused
    python bench/retrieval.py --world places --sizes 1000000 --index i8s:32:128 --ef 64 128 256 --rerank 64
    python bench/retrieval.py --exact-curve 10000 30000 100000 300000    # exact search latency per size
    python bench/retrieval.py --bundle artifacts/demo                   # the bundle's real gallery

``--index DTYPE:CONNECTIVITY:EXPANSION_ADD``; DTYPE ``i8s`` is an int8 index given vectors
pre-scaled by :func:`clue2geo_sdk.retrieval.search.to_int8` (what photo galleries build), ``i8`` leaves the
float -> int8 cast to USearch (x127: too coarse for unit vectors). ``--rerank R...``: also HNSW's
top R re-scored exactly from a float16 copy of the vectors (``PHOTO_RERANK``). Vectors are
generated chunk by chunk (float32 for 5M x 512 would be 10 GB) and the ground truth is streamed
over the same chunks.

Two synthetic worlds, both "photos of places"; queries are new photos of the same places:

* ``iso`` (default): ``n/1000`` place centres (Gaussian, 512-d, so mutually near-orthogonal), each
  vector a centre plus isotropic noise (cosine ~0.8 to its centre). Inside a cluster the 1000
  members are near-equidistant (the 15th and 16th exact neighbours are ~2e-4 apart in cosine) and
  clusters have nothing in between: a deliberately hard case for a graph index.
* ``places``: :class:`PlacesWorld`, the bundle's 100K real GeoCLIP location embeddings as places
  (where MP-16's photos were taken, as GeoCLIP's trained encoder places them: a continuum, 15th and
  16th neighbours ~1.5e-3 apart) and per-photo variation drawn from their own covariance. Closer to
  real embeddings; still not image embeddings (GeoCLIP's CLIP backbone is not available offline).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from clue2geo_sdk._native import usearch_index
from clue2geo_sdk.retrieval.search import int8_scale, to_int8

K = 15
CHUNK = 100_000


class World:
    """Deterministic clustered vectors: ``chunk(i)`` is always the same rows, so the base set
    never has to sit in memory as float32."""

    def __init__(self, n: int, dim: int, seed: int = 0) -> None:
        self.n, self.dim, self.seed = n, dim, seed
        rng = np.random.default_rng(seed)
        self.centers = rng.standard_normal((max(16, n // 1000), dim)).astype(np.float32)

    def _draw(self, m: int, rng: np.random.Generator) -> np.ndarray:
        x = self.centers[rng.integers(0, len(self.centers), m)]
        x += 0.5 * rng.standard_normal((m, self.dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def chunks(self):  # noqa: ANN201
        for start in range(0, self.n, CHUNK):
            m = min(CHUNK, self.n - start)
            yield start, self._draw(m, np.random.default_rng([self.seed, 1, start]))

    def queries(self, m: int, stream: int = 2) -> np.ndarray:
        """New photos of the same places; another ``stream`` gives other ones."""
        return self._draw(m, np.random.default_rng([self.seed, stream]))


class PlacesWorld(World):
    """Photos of real places: each vector is one of the bundle's gallery embeddings (GeoCLIP's
    trained location encoder over MP-16's 100K photo coordinates: the real geography of where
    photos are taken, a continuum rather than orthogonal blobs) plus per-photo variation drawn from
    the same embeddings' own covariance (anisotropic: participation ratio ~72 of 512), scaled to
    cosine ~0.8 to the place, like :class:`World`. A chunk is always the same rows."""

    def __init__(self, n: int, places: np.ndarray, seed: int = 0) -> None:
        self.n, self.dim, self.seed = n, places.shape[1], seed
        self.centers = places / np.linalg.norm(places, axis=1, keepdims=True)
        cov = np.cov(self.centers, rowvar=False)
        w, v = np.linalg.eigh(cov)
        # noise = z @ root: covariance cov, scaled so that E|noise| ~ 0.75 (cosine ~0.8 to the place)
        self.root = (v * np.sqrt(np.clip(w, 0, None))).T.astype(np.float32) * np.float32(0.75 / np.sqrt(np.trace(cov)))

    def _draw(self, m: int, rng: np.random.Generator) -> np.ndarray:
        x = self.centers[rng.integers(0, len(self.centers), m)]
        x = x + rng.standard_normal((m, self.dim), dtype=np.float32) @ self.root
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def bundle_gallery(bundle: Path) -> np.ndarray:
    """The bundle's coordinate-gallery vectors (float32, unit norm)."""
    from clue2geo_sdk import Bundle

    b = Bundle.open(bundle, verify=False)
    view = usearch_index().Index.restore(str(b.file("gallery", "index")), view=True)
    base = np.asarray(view.get(np.arange(len(view), dtype=np.uint64)), dtype=np.float32)
    return base / np.linalg.norm(base, axis=1, keepdims=True)


def synthetic(n: int, dim: int, seed: int) -> np.ndarray:
    """All ``n`` base vectors of a :class:`World` at once (small sizes)."""
    return np.concatenate([c for _, c in World(n, dim, seed).chunks()])


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k keys and cosines of each query over ``base`` (rows numbered from ``offset``)."""
    sims = queries @ base.T
    part = np.argpartition(-sims, k, axis=1)[:, :k]
    return part + offset, np.take_along_axis(sims, part, axis=1)


def streamed_truth(world: World, queries: np.ndarray, k: int) -> np.ndarray:
    keys = np.empty((len(queries), 0), dtype=np.int64)
    sims = np.empty((len(queries), 0), dtype=np.float32)
    for start, chunk in world.chunks():
        ck, cs = exact_topk(chunk, queries, k, start)
        keys, sims = np.concatenate([keys, ck], axis=1), np.concatenate([sims, cs], axis=1)
        best = np.argsort(-sims, axis=1)[:, :k]
        keys, sims = np.take_along_axis(keys, best, axis=1), np.take_along_axis(sims, best, axis=1)
    return keys


def _log(**kw: object) -> None:
    print(json.dumps({"t": time.strftime("%H:%M:%S"), **kw}), file=sys.stderr, flush=True)


def encoder(dtype: str, dim: int):  # noqa: ANN201
    """``(usearch dtype, vectors -> what the index is given)``: ``i8s`` is an int8 index fed
    pre-scaled int8 vectors (:func:`clue2geo_sdk.retrieval.search.to_int8`, what photo galleries use);
    plain ``i8`` leaves the float -> int8 cast to USearch (x127)."""
    if dtype == "i8s":
        scale = int8_scale(dim)
        return "i8", lambda x: to_int8(x, scale)
    return dtype, lambda x: x


def build(world: World, dtype: str, connectivity: int, expansion_add: int, path: Path) -> dict:
    """Build and save the index; threads=0 uses every core."""
    ui = usearch_index()
    kind, enc = encoder(dtype, world.dim)
    index = ui.Index(ndim=world.dim, metric="cos", dtype=kind, connectivity=connectivity, expansion_add=expansion_add)
    t0 = time.perf_counter()
    for start, chunk in world.chunks():
        index.add(np.arange(start, start + len(chunk), dtype=np.uint64), enc(chunk), threads=0)
        _log(building=path.name, added=start + len(chunk), s=round(time.perf_counter() - t0, 1))
    build_s = time.perf_counter() - t0
    index.save(str(path))
    return {"build_s": round(build_s, 1), "index_mb": round(path.stat().st_size / 1e6, 1)}


def write_f16(world: World, path: Path) -> None:
    """The float16 copy of the vectors for re-ranking, renamed into place only when complete."""
    tmp = path.with_name(path.name + ".partial.npy")
    f16 = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(world.n, world.dim))
    for start, chunk in world.chunks():
        f16[start : start + len(chunk)] = chunk
    f16.flush()
    del f16
    os.replace(tmp, path)


def _timed(fn, queries: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:  # noqa: ANN001
    found, lat = [], []
    for q in queries:
        t0 = time.perf_counter()
        found.append(fn(q))
        lat.append(time.perf_counter() - t0)
    return found, np.asarray(lat)


def _stats(found: list[np.ndarray], lat: np.ndarray, truth: np.ndarray) -> dict:
    hits = np.array([len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=False)])
    return {
        "recall@15": round(float(hits.mean() / K), 4),
        "none_found": int((hits == 0).sum()),  # queries stranded in the wrong neighbourhood
        "p50_ms": round(1000 * float(np.percentile(lat, 50)), 3),
        "p99_ms": round(1000 * float(np.percentile(lat, 99)), 3),
    }


def curve(
    path: Path,
    queries: np.ndarray,
    truth: np.ndarray,
    efs: list[int],
    rerank: list[int],
    f16: Path | None,
    dtype: str = "f16",
    warmup: np.ndarray | None = None,
) -> dict:
    """Recall and latency per expansion. ``warmup``: queries run (untimed) before each setting is
    timed; a memory-mapped index only answers at full speed once the pages a search visits are
    mapped into the process (a long-running service), and a fresh process pays for each first touch."""
    ui = usearch_index()
    enc = encoder(dtype, queries.shape[1])[1]
    t0 = time.perf_counter()
    view = ui.Index.restore(str(path), view=True)
    out: dict = {"open_view_ms": round(1000 * (time.perf_counter() - t0), 2), "curve": []}
    vecs = np.load(f16, mmap_mode="r") if f16 is not None and rerank else None
    for ef in efs:
        view.expansion_search = ef
        warm = queries[:20] if warmup is None else warmup
        _timed(lambda q: view.search(enc(q), K).keys, warm)
        point: dict = {"expansion_search": ef}
        found, lat = _timed(lambda q: view.search(enc(q), K).keys, queries)
        point["hnsw"] = _stats(found, lat, truth)
        for r in rerank if vecs is not None else ():

            def reranked(q: np.ndarray, r: int = r) -> np.ndarray:
                keys = np.sort(view.search(enc(q), r).keys)
                return keys[np.argsort(-(vecs[keys].astype(np.float32) @ q))[:K]]

            _timed(reranked, warm)
            found, lat = _timed(reranked, queries)
            point[f"hnsw_top{r}_rerank_f16"] = _stats(found, lat, truth)
        out["curve"].append(point)
        _log(curve=path.name, **point)
    m = min(20, len(queries))
    found, lat = _timed(lambda q: view.search(enc(q), K, exact=True).keys, queries[:m])
    out["usearch_exact"] = _stats(found, lat, truth[:m])
    return out


def exact_curve(sizes: list[int], dim: int, queries_n: int) -> list[dict]:
    """Single-query exact search latency per gallery size: USearch's brute force (SIMD, one thread)
    over float16 and float32 rows, which is what an exact gallery search costs; the switch to HNSW
    is where this passes a few milliseconds."""
    search = usearch_index().search
    rows = []
    for n in sizes:
        world = World(n, dim)
        base = synthetic(n, dim, 0)
        queries = world.queries(queries_n)
        truth = exact_topk(base, queries, K)[0]
        row: dict = {"size": n}
        for dtype in ("f32", "f16"):
            data = base if dtype == "f32" else base.astype(np.float16)
            qs = queries.astype(data.dtype)
            found, lat = _timed(lambda q: search(data, q, K, "cos", exact=True, threads=1).keys, qs)  # noqa: B023
            row[f"exact_{dtype}"] = _stats(found, lat, truth)
        rows.append(row)
        _log(exact_curve=row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[])
    ap.add_argument("--index", dest="indexes", action="append", default=None, help="DTYPE:CONNECTIVITY:EXPANSION_ADD")
    ap.add_argument("--ef", type=int, nargs="*", default=[64, 128, 256, 512], help="expansion_search values")
    ap.add_argument(
        "--rerank", type=int, nargs="*", default=[], help="also: HNSW top R re-scored exactly from float16 vectors"
    )
    ap.add_argument("--dim", type=int, default=512, help="of the iso world")
    ap.add_argument(
        "--world",
        choices=["iso", "places"],
        default="iso",
        help="see the module docstring",
    )
    ap.add_argument("--places-bundle", type=Path, default=Path("artifacts/demo"), help="whose gallery the places are")
    ap.add_argument(
        "--places-count",
        type=int,
        default=None,
        help="use only N of the places (more photos per place: 5M's local structure at a smaller size)",
    )
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed queries (other photos of the same places) before each setting: the steady state of a "
        "long-running process; default: the first 20 measured queries",
    )
    ap.add_argument("--index-dir", type=Path, default=None, help="keep indexes here; an index already there is reused")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--exact-curve", type=int, nargs="*", default=[], help="sizes for the exact-search latency curve")
    ap.add_argument("--bundle", type=Path, default=None, help="also benchmark this bundle's gallery (real vectors)")
    args = ap.parse_args()
    results: dict = {"cores": os.cpu_count(), "k": K, "queries": args.queries, "synthetic": []}
    specs = [s.split(":") for s in (args.indexes or ["f16:16:128"])]
    places = bundle_gallery(args.places_bundle) if args.world == "places" else None
    if places is not None and args.places_count is not None:  # a fixed random subset, not one region
        places = places[np.sort(np.random.default_rng(0).choice(len(places), args.places_count, replace=False))]
    label = args.world if args.places_count is None or args.world != "places" else f"places{args.places_count}"

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        idir = args.index_dir or Path(tmp)
        idir.mkdir(parents=True, exist_ok=True)
        for n in args.sizes:
            world = World(n, args.dim) if args.world == "iso" else PlacesWorld(n, places)
            queries = world.queries(args.queries)
            warmup = world.queries(args.warmup, stream=3) if args.warmup else None
            t0 = time.perf_counter()
            truth = streamed_truth(world, queries, K)
            entry = {
                "world": label,
                "size": n,
                "dim": world.dim,
                "truth_s": round(time.perf_counter() - t0, 1),
                "indexes": [],
            }
            results["synthetic"].append(entry)
            f16 = idir / f"vectors-{label}-{n}-f16.npy" if args.rerank else None
            if f16 is not None and not f16.is_file():
                write_f16(world, f16)
            for dtype, m, ea in specs:
                path = idir / f"{label}-{n}-{dtype}-M{m}-ea{ea}.usearch"
                res: dict = {"dtype": dtype, "connectivity": int(m), "expansion_add": int(ea)}
                if path.is_file():
                    res["reused"] = str(path)
                else:
                    res |= build(world, dtype, int(m), int(ea), path)
                entry["indexes"].append(res)
                save()
                res |= curve(path, queries, truth, args.ef, args.rerank, f16, dtype, warmup)
                save()
        if args.exact_curve:
            results["exact_curve"] = exact_curve(args.exact_curve, args.dim, args.queries)
            save()
        if args.bundle:
            from clue2geo_sdk import Bundle

            path = Bundle.open(args.bundle, verify=False).file("gallery", "index")
            base = bundle_gallery(args.bundle)
            rng = np.random.default_rng(2)
            queries = base[rng.integers(0, len(base), args.queries)]
            queries = queries + 0.05 * rng.standard_normal(queries.shape, dtype=np.float32)
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
            truth = exact_topk(base, queries, K)[0]
            results["bundle_gallery"] = {
                "size": len(base),
                "queries": "gallery vectors + noise",
                **curve(path, queries, truth, args.ef, [], None),
            }
            save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
