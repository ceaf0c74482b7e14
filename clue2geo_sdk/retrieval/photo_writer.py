"""The photo gallery's writer (the format: :mod:`clue2geo_sdk.retrieval.photos`).

Resumable and crash-safe: a batch's vectors are appended and fsynced, then its rows committed in
one DuckDB transaction; the indexes are derived (saved every minute and at the end) and are brought
up to date from ``vectors.f16`` on the next run. Killing a build loses at most the batch in flight,
and re-running it adds only photos whose sha256 is not yet in the gallery.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from .._native import duckdb_module, usearch_index
from .._version import __version__
from ..errors import BundleFormatError
from ..files import atomic_write, fsync_path
from .photos import (
    DB,
    GALLERY_FORMAT_VERSION,
    GALLERY_MANIFEST_FILE,
    INDEX,
    INDEX2,
    SCHEMA,
    VECTORS,
    gallery_rows_digest,
    needs_second_graph,
    read_manifest,
)
from .search import (
    PHOTO_INDEX_CONNECTIVITY,
    PHOTO_INDEX_DTYPE,
    PHOTO_INDEX_EXPANSION_ADD,
    PHOTO_RERANK,
    int8_scale,
    to_int8,
)
from .sources import GalleryBuildError

SAVE_EVERY_S = 60.0


def _utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(tzinfo=None)


def utc_stamp() -> str:
    """Now in UTC as the gallery writes it (ISO 8601 to the second, with a Z)."""
    return _utc_now().isoformat(timespec="seconds") + "Z"


def write_manifest(out: Path, con: Any, *, dim: int, image_sha256: str) -> str:
    """Write ``out``'s manifest for the rows in ``con`` (the gallery's DuckDB) and the current index
    settings, atomically; returns the rows' digest."""
    rows = con.execute("SELECT key, sha256, lat, lon FROM photos ORDER BY key").fetchnumpy()
    digest = gallery_rows_digest(rows["key"], rows["sha256"], rows["lat"], rows["lon"])
    manifest = {
        "kind": "photos",
        "format_version": GALLERY_FORMAT_VERSION,
        "sdk_version": __version__,
        "image_tower_sha256": image_sha256,
        "dim": dim,
        "count": len(rows["key"]),
        "metric": "cos",
        "dtype": "f16",  # of the stored vectors (vectors.f16); the index's own is under "index"
        "index": {
            "dtype": PHOTO_INDEX_DTYPE,
            "connectivity": PHOTO_INDEX_CONNECTIVITY,
            "expansion_add": PHOTO_INDEX_EXPANSION_ADD,
            "scale": int8_scale(dim) if PHOTO_INDEX_DTYPE == "i8" else 1.0,
            "rerank": PHOTO_RERANK,
            "graphs": 2 if (out / INDEX2).is_file() else 1,
        },
        "content_sha256": digest,
        "updated_at": utc_stamp(),
    }
    atomic_write(out / GALLERY_MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    return digest


class GalleryWriter:
    """The gallery folder opened for appending: reconciles a killed run, then adds batches."""

    def __init__(
        self, out: Path, *, dim: int, image_sha256: str, on_index: Callable[[str, int, int], None] | None = None
    ) -> None:
        """``on_index(file, rows, total)`` reports a graph being brought up to the rows (a new
        second graph takes as long as the first did)."""
        self.out, self.dim, self.image_sha256, self.on_index = out, dim, image_sha256, on_index
        out.mkdir(parents=True, exist_ok=True)
        if (out / GALLERY_MANIFEST_FILE).is_file():
            old = read_manifest(out)
            if old.get("image_tower_sha256") != image_sha256 or int(old.get("dim", dim)) != dim:
                raise BundleFormatError(
                    f"{out} was built with GPSCLIP image tower {old.get('image_tower_sha256')}, but this bundle's is "
                    f"{image_sha256}: embeddings of two towers cannot share a gallery; use another --out"
                )
        self.con = _open_rows(out / DB)
        n = int(self.con.execute("SELECT count(*) FROM photos").fetchone()[0])
        top = self.con.execute("SELECT max(key) FROM photos").fetchone()[0]
        if n and top != n - 1:
            raise GalleryBuildError(f"{out / DB}: keys are not 0..{n - 1}; the gallery is damaged")
        self.vectors = _open_vectors_for_append(out / VECTORS, n, dim)
        self.count = n
        # sha256 -> (lat, lon, who gave that position): a photo is added once, at its first position
        self.known: dict[str, tuple[float, float, str]] = {
            s: (float(a), float(o), f"the gallery's row for {p}")
            for s, a, o, p in self.con.execute("SELECT sha256, lat, lon, path FROM photos").fetchall()
        }
        self.scale = int8_scale(dim)
        self.graphs: dict[str, Any] = {}
        self.dirty: set[str] = set()
        self.saved_at = time.monotonic()
        self._catch_up()

    def _catch_up(self) -> None:
        """Bring the wanted graphs (``index.usearch``; ``index2.usearch`` too above
        PHOTO_TWIN_ABOVE rows) up to the rows from ``vectors.f16``."""
        wanted = [INDEX, INDEX2] if needs_second_graph(self.count) else [INDEX]
        if INDEX2 not in wanted:  # one left by a build under a lower threshold would be stale
            (self.out / INDEX2).unlink(missing_ok=True)
        for name in wanted:
            if name in self.graphs:
                continue
            index = self._usable_graph(name)
            if index is None:
                index = usearch_index().Index(
                    ndim=self.dim,
                    metric="cos",
                    dtype=PHOTO_INDEX_DTYPE,
                    connectivity=PHOTO_INDEX_CONNECTIVITY,
                    expansion_add=PHOTO_INDEX_EXPANSION_ADD,
                )
                self.dirty.add(name)
            index.expansion_add = PHOTO_INDEX_EXPANSION_ADD  # not kept in the file
            self.graphs[name] = index
            if len(index) < self.count:  # the graph lags the rows (a kill, a rebuild, a new graph)
                self._fill(name)
        self._save_index()

    def _usable_graph(self, name: str) -> Any:
        """The saved graph ``name``, or None for a new one. A graph is derived data: one that is
        damaged, ahead of the rows or built with other settings (an older version's float16 index)
        is rebuilt rather than trusted."""
        if not (self.out / name).is_file():
            return None
        try:
            index = usearch_index().Index.restore(str(self.out / name))
        except (ValueError, RuntimeError):
            return None
        if index is not None and (
            index.ndim != self.dim
            or len(index) > self.count
            or not str(index.dtype).lower().endswith(PHOTO_INDEX_DTYPE)
            or index.connectivity != PHOTO_INDEX_CONNECTIVITY
        ):
            return None
        return index

    def _fill(self, name: str) -> None:
        """Add the rows graph ``name`` lacks from ``vectors.f16``, 10K at a time (saved on the way)."""
        mm = np.memmap(self.out / VECTORS, dtype=np.float16, mode="r", shape=(self.count, self.dim))
        for s in range(len(self.graphs[name]), self.count, 10_000):
            e = min(self.count, s + 10_000)
            self._add_to(name, np.arange(s, e, dtype=np.int64), np.asarray(mm[s:e]))
            if self.on_index:
                self.on_index(name, e, self.count)
            if time.monotonic() - self.saved_at > SAVE_EVERY_S:  # a killed rebuild resumes from here
                self._save_index()
        del mm

    def _add_to(self, name: str, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add rows to one graph: the second graph takes each batch in a shuffled order, so that
        its rows draw other levels than in the first and its upper layers route queries otherwise."""
        if name == INDEX2:
            order = np.random.default_rng(int(keys[0])).permutation(len(keys))
            keys, vectors = keys[order], vectors[order]
        self.graphs[name].add(keys.astype(np.uint64), self._encode(vectors), threads=0)
        self.dirty.add(name)

    def _encode(self, vectors: np.ndarray) -> np.ndarray:
        """What the index is given: scaled int8 for an int8 index, float32 otherwise."""
        if PHOTO_INDEX_DTYPE == "i8":
            return to_int8(vectors, self.scale)
        return np.asarray(vectors, dtype=np.float32)

    def add(self, rows: list[dict[str, Any]], vectors: np.ndarray) -> None:
        """Append one batch: vectors (fsynced), then rows in one transaction, then the graphs."""
        if not rows:
            return
        keys = np.arange(self.count, self.count + len(rows), dtype=np.int64)
        self.vectors.write(np.ascontiguousarray(vectors, dtype=np.float16).tobytes())
        self.vectors.flush()
        os.fsync(self.vectors.fileno())
        added_at = _utc_now()
        self.con.execute("BEGIN TRANSACTION")
        try:
            self.con.executemany(
                "INSERT INTO photos VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    [int(k), r["path"], r["sha256"], r["lat"], r["lon"], r["source"], r["taken_at"], added_at]
                    for k, r in zip(keys, rows, strict=True)
                ],
            )
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise
        self.count += len(rows)
        self.known.update((r["sha256"], (r["lat"], r["lon"], r.get("origin", r["path"]))) for r in rows)
        for name in self.graphs:
            self._add_to(name, keys, np.asarray(vectors))
        if len(self.graphs) < 2 and needs_second_graph(self.count):
            self._catch_up()  # the gallery has just grown past one graph: build the second from the rows
        elif time.monotonic() - self.saved_at > SAVE_EVERY_S:
            self._save_index()

    def _save_index(self) -> None:
        """Save the graphs that changed (each fsynced, then renamed into place)."""
        for name in sorted(self.dirty):
            tmp = self.out / (name + ".tmp")
            self.graphs[name].save(str(tmp))  # USearch writes the file itself (it may be gigabytes)
            fsync_path(tmp)
            os.replace(tmp, self.out / name)
        self.dirty.clear()
        self.saved_at = time.monotonic()

    def finish(self) -> str:
        """Save the index and write the manifest (last: a gallery is complete when they agree)."""
        self._save_index()
        return write_manifest(self.out, self.con, dim=self.dim, image_sha256=self.image_sha256)

    def close(self) -> None:
        self.vectors.close()
        self.con.close()


def _open_rows(path: Path) -> Any:
    """The gallery's DuckDB, opened for writing, with its table."""
    duckdb = duckdb_module()
    try:
        con = duckdb.connect(str(path))
        con.execute(SCHEMA)
    except duckdb.Error as exc:  # not a DuckDB file, or another build holds it
        raise GalleryBuildError(f"{path}: cannot open the gallery rows ({exc})") from exc
    return con


def _open_vectors_for_append(path: Path, n: int, dim: int) -> IO[bytes]:
    """``vectors.f16`` opened for appending after its ``n`` committed rows. Vectors are written
    before rows are committed: any tail a killed run left behind is dropped."""
    row_bytes = 2 * dim
    have = path.stat().st_size // row_bytes if path.exists() else 0
    if have < n:
        raise GalleryBuildError(f"{path}: {have} vectors for {n} rows; the gallery is damaged")
    with path.open("ab") as f:
        f.truncate(n * row_bytes)
    return path.open("ab")
