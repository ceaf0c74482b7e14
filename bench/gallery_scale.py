"""The product's search path at scale: a real photo-gallery folder (DuckDB rows, vectors.f16,
the int8 USearch index, manifest) assembled from ``bench/retrieval.py``'s kept files, opened with
:class:`clue2geo_sdk.retrieval.photos.PhotoGallery`, and queried with ``most_similar`` exactly
as the geolocator does (scaled int8 query, HNSW, top ``PHOTO_RERANK`` re-scored). Prints recall@15
against exact float32 search, p50/p99 latency and CPU time per query (both threads' when a
second graph is searched beside the first).

    python bench/retrieval.py --sizes 1000000 --index i8s:32:128 --ef 256 --rerank 64 --index-dir /tmp/ret/idx1m
    python bench/gallery_scale.py --size 1000000 --index-dir /tmp/ret/idx1m --out /tmp/ret/g1m

Above ``PHOTO_TWIN_ABOVE`` rows the gallery's second graph (``index2.usearch``) is built by the
product's own writer (``GalleryWriter``, from ``vectors.f16``; about as long as the first graph took)
unless the folder already has it. ``--ef`` measures other expansions than the product's.

Embedding photos is not part of this (``clue2geo gallery build`` does that, ~20 photos/s on CPU
with the demo's towers): the folder gets synthetic sha256s and coordinates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from retrieval import K, PlacesWorld, World, bundle_gallery, streamed_truth  # noqa: E402

from clue2geo_sdk.retrieval import search as retrieval  # noqa: E402
from clue2geo_sdk.retrieval.photo_writer import GalleryWriter, write_manifest  # noqa: E402
from clue2geo_sdk.retrieval.photos import (  # noqa: E402
    DB,
    INDEX,
    INDEX2,
    SCHEMA,
    VECTORS,
    PhotoGallery,
)
from clue2geo_sdk.retrieval.photos import GALLERY_MANIFEST_FILE as MANIFEST  # noqa: E402


def assemble(world: str, n: int, index_dir: Path, out: Path) -> None:
    import duckdb

    name = f"{world}-{n}-i8s-M{retrieval.PHOTO_INDEX_CONNECTIVITY}-ea{retrieval.PHOTO_INDEX_EXPANSION_ADD}.usearch"
    out.mkdir(parents=True, exist_ok=True)
    vectors = np.load(index_dir / f"vectors-{world}-{n}-f16.npy", mmap_mode="r")
    with (out / VECTORS).open("wb") as f:
        for s in range(0, n, 100_000):
            f.write(np.ascontiguousarray(vectors[s : s + 100_000]).tobytes())
    try:  # the index file is used as it is: a hard link saves copying gigabytes
        os.link(index_dir / name, out / INDEX)
    except OSError:
        shutil.copyfile(index_dir / name, out / INDEX)
    with duckdb.connect(str(out / DB)) as con:
        con.execute(SCHEMA)
        con.execute(
            "INSERT INTO photos SELECT range, 'synthetic/' || range || '.jpg', sha256(range::VARCHAR), "
            "(hash(range) % 180000) / 1000.0 - 90, (hash(range + 1) % 360000) / 1000.0 - 180, 'csv', NULL, "
            f"now()::TIMESTAMP FROM range({n})"
        )
        write_manifest(out, con, dim=int(vectors.shape[1]), image_sha256="synthetic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=["iso", "places"], default="iso")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--index-dir", type=Path, required=True, help="bench/retrieval.py --index-dir")
    ap.add_argument("--out", type=Path, required=True, help="where to assemble the gallery folder (reused)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ef", type=int, nargs="*", default=[], help="expansion_search values (default: the product's)")
    ap.add_argument(
        "--warmup",
        type=int,
        default=20,
        help="untimed queries (other photos of the same places) before each setting: a long-running process "
        "has the pages a search touches mapped in; a fresh one pays for each first touch",
    )
    args = ap.parse_args()
    if not (args.out / MANIFEST).is_file():
        assemble(args.world, args.size, args.index_dir, args.out)
    elif json.loads((args.out / MANIFEST).read_text())["count"] != args.size:
        sys.exit(f"{args.out} holds another gallery size; remove it or pass another --out")
    if args.size > retrieval.PHOTO_TWIN_ABOVE and not (args.out / INDEX2).is_file():
        t0 = time.perf_counter()
        dim = json.loads((args.out / MANIFEST).read_text())["dim"]
        w = GalleryWriter(args.out, dim=dim, image_sha256="synthetic")  # builds the second graph
        w.finish()
        w.close()
        print(json.dumps({"second_graph_build_s": round(time.perf_counter() - t0, 1)}), flush=True)
    if args.world == "iso":
        world = World(args.size, 512)
    else:
        world = PlacesWorld(args.size, bundle_gallery(Path("artifacts/demo")))
    queries = world.queries(args.queries)
    warmup = world.queries(args.warmup, stream=3)
    truth = streamed_truth(world, queries, K)
    t0 = time.perf_counter()
    g = PhotoGallery(args.out)
    open_s = time.perf_counter() - t0
    graphs = [g.index] + ([g.twin] if g.twin is not None else [])
    for ef in args.ef or [g.index.expansion_search]:
        for graph in graphs:
            graph.expansion_search = ef
        for q in warmup:
            g.most_similar(q, K)
        lat, recall = [], []
        cpu0 = time.process_time()  # both threads' CPU: what a query costs in throughput
        for q, t in zip(queries, truth, strict=True):
            t0 = time.perf_counter()
            hits = g.most_similar(q, K)
            lat.append(time.perf_counter() - t0)
            recall.append(len({h.key for h in hits} & set(t.tolist())) / K)
        print(
            json.dumps(
                {
                    "world": args.world,
                    "size": len(g),
                    "graphs": len(graphs),
                    "open_s": round(open_s, 2),
                    "expansion_search": ef,
                    "rerank": retrieval.PHOTO_RERANK,
                    "recall@15": round(float(np.mean(recall)), 4),
                    "none_found": int(np.sum(np.asarray(recall) == 0)),
                    "p50_ms": round(1000 * float(np.percentile(lat, 50)), 3),
                    "p99_ms": round(1000 * float(np.percentile(lat, 99)), 3),
                    "cpu_ms_per_query": round(1000 * (time.process_time() - cpu0) / len(queries), 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
