"""Retrieval benchmark: USearch (f32 / f16 / i8, HNSW and exact) vs exact numpy on the same vectors.

Prints JSON: per size and dtype, recall@15 against numpy brute force, p50/p99 query latency,
build time, index size on disk and time to open memory-mapped.

    python bench/retrieval.py --sizes 100000 1000000 --queries 200
    python bench/retrieval.py --bundle artifacts/demo     # also the bundle's real gallery

Synthetic vectors (default) are clustered Gaussians, unit-normalized, 512-d: fine for speed and
index behaviour, not a statement about GeoCLIP's embedding distribution (use --bundle for that).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from clue2geo_sdk._native import usearch_index

K = 15


def synthetic(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(16, n // 1000), dim)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), 64):
        sims = queries[s : s + 64] @ base.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.take_along_axis(sims, part, axis=1).argsort(axis=1)[:, ::-1]
        out[s : s + 64] = np.take_along_axis(part, order, axis=1)
    return out


def bench_index(
    base: np.ndarray, queries: np.ndarray, truth: np.ndarray, dtype: str, tmp: Path, prebuilt: Path | None = None
) -> dict:
    ui = usearch_index()
    res: dict = {"dtype": dtype}
    if prebuilt is None:
        index = ui.Index(ndim=base.shape[1], metric="cos", dtype=dtype)
        t0 = time.perf_counter()
        index.add(np.arange(len(base), dtype=np.uint64), base, threads=0)
        res["build_s"] = round(time.perf_counter() - t0, 2)
        path = tmp / f"idx-{dtype}.usearch"
        index.save(str(path))
        del index
    else:
        path = prebuilt
    res["index_mb"] = round(path.stat().st_size / 1e6, 1)
    t0 = time.perf_counter()
    view = ui.Index.restore(str(path), view=True)
    res["open_view_ms"] = round(1000 * (time.perf_counter() - t0), 2)
    for mode, exact in (("hnsw_ef64", False), ("hnsw_ef1024", False), ("exact", True)):
        view.expansion_search = 1024 if mode == "hnsw_ef1024" else 64
        lat, found = [], []
        for q in queries:
            t0 = time.perf_counter()
            m = view.search(q, K, exact=exact)
            lat.append(time.perf_counter() - t0)
            found.append(m.keys)
        recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)]))
        res[mode] = {
            "recall@15": round(recall, 4),
            "p50_ms": round(1000 * float(np.percentile(lat, 50)), 3),
            "p99_ms": round(1000 * float(np.percentile(lat, 99)), 3),
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000])
    ap.add_argument("--dtypes", nargs="*", default=["f32", "f16", "i8"])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument(
        "--bundle", type=Path, default=None, help="also benchmark this bundle's gallery with its real vectors"
    )
    args = ap.parse_args()
    results = {"synthetic": [], "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            base = synthetic(n, args.dim, 0)
            queries = synthetic(args.queries, args.dim, 1)
            t0 = time.perf_counter()
            truth = exact_topk(base, queries, K)
            numpy_ms = 1000 * (time.perf_counter() - t0) / len(queries)
            entry = {"size": n, "dim": args.dim, "numpy_exact_ms_per_query": round(numpy_ms, 3), "indexes": []}
            for dt in args.dtypes:
                entry["indexes"].append(bench_index(base, queries, truth, dt, Path(tmp)))
                print(json.dumps({"progress": n, "dtype": dt}), flush=True)
            results["synthetic"].append(entry)
            del base
        if args.bundle:
            from clue2geo_sdk import Bundle

            b = Bundle.open(args.bundle, verify=False)
            path = b.file("gallery", "index")
            ui = usearch_index()
            view = ui.Index.restore(str(path), view=True)
            base = np.asarray(view.get(np.arange(len(view), dtype=np.uint64)), dtype=np.float32)
            base /= np.linalg.norm(base, axis=1, keepdims=True)
            rng = np.random.default_rng(2)
            queries = base[rng.integers(0, len(base), args.queries)] + 0.05 * rng.standard_normal(
                (args.queries, base.shape[1]), dtype=np.float32
            )
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
            truth = exact_topk(base, queries, K)
            results["bundle_gallery"] = {
                "size": len(base),
                "queries": "gallery vectors + noise",
                **bench_index(base, queries, truth, b.params("gallery")["dtype"], Path(tmp), prebuilt=path),
            }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
