"""Reference galleries from the analyst's own geotagged photos (image -> image retrieval).

The paper's retrieval database is images with known coordinates; an analyst has exactly that for
their own area. ``build_gallery`` embeds each photo with the bundle's GPSCLIP *image* tower and
stores, in one folder::

    manifest.json    format, SDK version, the image tower's sha256, dim, count, metric, dtype, digest
    gallery.duckdb   photos(key, path, sha256, lat, lon, source, taken_at, added_at): one row a photo
    vectors.f16      the embeddings, float16, row = key (memory-mapped: exact and subset search)
    index.usearch    USearch HNSW index over the same vectors (cosine, int8 scaled; key = row)
    index2.usearch   a second HNSW graph over the same rows, added in another order (above
                     PHOTO_TWIN_ABOVE rows: searched beside the first, see retrieval.py)
    errors.jsonl     what could not be added, one JSON line each, appended per run

Resumable and crash-safe: a batch's vectors are appended and fsynced, then its rows committed in
one DuckDB transaction; the indexes are derived (saved every minute and at the end) and are brought
up to date from ``vectors.f16`` on the next run. Killing a build loses at most the batch in flight,
and re-running it adds only photos whose sha256 is not yet in the gallery.

A photo is known by its sha256: one given again (another path, another run) is not added twice.
When a CSV row (or a photo's own GPS) gives a photo already added a position more than
:data:`POSITION_CONFLICT_KM` away from the first, the first position is kept and the row is
reported as a ``conflict`` (in ``errors.jsonl``, counted in the summary). A build that adds no
photo at all (say, a folder of photos without GPS) is refused: no empty gallery is written.

``PhotoGallery`` opens a finished gallery with the search interface of
:class:`clue2geo_sdk.retrieval.search.Gallery`; it refuses a gallery built with another image tower, or
one holding no photos.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from .._version import __version__
from ..errors import BundleFormatError, Clue2GeoError
from ..inputs.discover import discover
from .search import (
    EXACT_LIMIT,
    PHOTO_HNSW_EXPANSION,
    PHOTO_INDEX_CONNECTIVITY,
    PHOTO_INDEX_DTYPE,
    PHOTO_INDEX_EXPANSION_ADD,
    PHOTO_LONE_EXPANSION,
    PHOTO_RERANK,
    PHOTO_TWIN_ABOVE,
    PHOTO_TWIN_EXPANSION,
    PHOTO_TWIN_RETRY,
    SUBSET_BRUTE_FORCE,
    GalleryHit,
    Matches,
    SearchMixin,
    brute_force,
    int8_scale,
    to_int8,
)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DB = "gallery.duckdb"
VECTORS = "vectors.f16"
INDEX = "index.usearch"
INDEX2 = "index2.usearch"
ERRORS = "errors.jsonl"
SAVE_EVERY_S = 60.0
#: Two positions given to the same photo closer than this are the same place (a CSV's decimals and
#: the EXIF's degrees-minutes-seconds round differently); farther apart, the second is a conflict.
POSITION_CONFLICT_KM = 0.01
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


class GalleryBuildError(Clue2GeoError, ValueError):
    """The gallery source or output cannot be used at all (not one bad photo: those are recorded)."""


@attrs.frozen(kw_only=True)
class SourcePhoto:
    """One photo to add; ``lat``/``lon`` given by a CSV, else read from the photo's EXIF/XMP."""

    path: Path
    lat: float | None = None
    lon: float | None = None
    line: int | None = None


@attrs.frozen(kw_only=True)
class Problem:
    """A photo or CSV row that was not added, and why. ``kind``: "unreadable" or "bad_row" (a
    failure), "no_position" (a photo without GPS in a folder source: skipped, not a failure) or
    "conflict" (a second, different position for a photo already added: the first is kept)."""

    source: str
    kind: str
    message: str
    line: int | None = None

    @property
    def failed(self) -> bool:
        return self.kind not in ("no_position", "conflict")

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class BuildSummary:
    gallery: str
    added: int
    already: int  # photos whose sha256 was already in the gallery (resume) or repeated in the source
    skipped: int  # photos without a position
    failed: int  # unreadable photos and bad CSV rows
    count: int  # rows in the gallery now
    digest: str
    conflicts: int = 0  # rows giving a photo already added another position (the first one is kept)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


# -- sources ---------------------------------------------------------------------------------------


def _coordinate(text: str, name: str, limit: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number") from None
    if not math.isfinite(value) or abs(value) > limit:
        raise ValueError(f"{name} {text!r} is outside [-{limit:g}, {limit:g}]")
    return value


def read_csv_source(csv_path: Path) -> tuple[list[SourcePhoto], list[Problem]]:
    """Rows ``path,lat,lon`` (a header naming those columns is optional; other columns are ignored).
    Relative paths are resolved against the CSV's folder. Bad rows become :class:`Problem`s with
    their line number."""
    photos: list[SourcePhoto] = []
    problems: list[Problem] = []
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise GalleryBuildError(f"{csv_path}: cannot read the CSV ({exc})") from exc
    rows = list(csv.reader(text.splitlines()))
    cols, start = (0, 1, 2), 0
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if {"path", "lat", "lon"} <= set(header):
        cols, start = (header.index("path"), header.index("lat"), header.index("lon")), 1
    for number, row in enumerate(rows[start:], start=start + 1):
        if not any(c.strip() for c in row):
            continue
        where = f"{csv_path}:{number}"
        try:
            if len(row) <= max(cols):
                raise ValueError(f"{len(row)} fields, expected path,lat,lon")
            rel = row[cols[0]].strip()
            if not rel:
                raise ValueError("empty path")
            lat = _coordinate(row[cols[1]].strip(), "lat", 90.0)
            lon = _coordinate(row[cols[2]].strip(), "lon", 180.0)
        except ValueError as exc:
            problems.append(Problem(source=where, kind="bad_row", message=f"{where}: {exc}", line=number))
            continue
        path = Path(rel).expanduser()
        photos.append(
            SourcePhoto(path=path if path.is_absolute() else csv_path.parent / path, lat=lat, lon=lon, line=number)
        )
    return photos, problems


def read_source(src: Path, *, recursive: bool = True) -> tuple[list[SourcePhoto], list[Problem]]:
    """A folder (coordinates from each photo's EXIF/XMP) or a ``.csv`` of ``path,lat,lon``."""
    if src.is_dir():
        photos, problems = [], []
        for item in discover([src], recursive=recursive):
            if isinstance(item, Path):
                photos.append(SourcePhoto(path=item))
            else:
                problems.append(Problem(source=item.image, kind="unreadable", message=item.message))
        return photos, problems
    if src.suffix.lower() == ".csv" and src.is_file():
        return read_csv_source(src)
    raise GalleryBuildError(f"{src}: not a folder of photos nor a .csv file of path,lat,lon")


# -- build -----------------------------------------------------------------------------------------


def _manifest_path(out: Path) -> Path:
    return out / MANIFEST


def read_manifest(out: Path) -> dict[str, Any]:
    path = _manifest_path(out)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        if (out / DB).is_file():
            raise BundleFormatError(_incomplete(out, f"rows but no {MANIFEST} yet")) from None
        raise BundleFormatError(
            f"{out}: not a photo gallery (no {MANIFEST}); build one with `clue2geo gallery build`"
        ) from None
    except (OSError, ValueError) as exc:
        raise BundleFormatError(f"{path}: unreadable gallery manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("kind") != "photos":
        raise BundleFormatError(f"{path}: not a photo gallery manifest")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleFormatError(
            f"{path}: gallery format {manifest.get('format_version')} is newer than this SDK reads ({FORMAT_VERSION})"
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


def _fsync(path: Path) -> None:
    """Flush a file written by another library to disk before it is renamed into place."""
    with path.open("rb+") as f:
        os.fsync(f.fileno())


def content_digest(keys: Iterable[int], sha256s: Iterable[str], lat: Iterable[float], lon: Iterable[float]) -> str:
    """sha256 over the rows in key order: names the gallery's content in records, and lets the
    reader check that the manifest describes the rows next to it."""
    h = hashlib.sha256(b"clue2geo-photo-gallery-v1\n")
    for k, s, a, o in zip(keys, sha256s, lat, lon, strict=True):
        h.update(f"{int(k)},{s},{float(a)!r},{float(o)!r}\n".encode())
    return h.hexdigest()


def _utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC).replace(tzinfo=None)


def write_manifest(out: Path, con: Any, *, dim: int, image_sha256: str) -> str:
    """Write ``out``'s manifest for the rows in ``con`` (the gallery's DuckDB) and the current index
    settings, atomically; returns the content digest."""
    rows = con.execute("SELECT key, sha256, lat, lon FROM photos ORDER BY key").fetchnumpy()
    digest = content_digest(rows["key"], rows["sha256"], rows["lat"], rows["lon"])
    manifest = {
        "kind": "photos",
        "format_version": FORMAT_VERSION,
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
        "updated_at": _utc_now().isoformat(timespec="seconds") + "Z",
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(tmp)
    os.replace(tmp, _manifest_path(out))
    return digest


class _Writer:
    """The gallery folder opened for appending: reconciles a killed run, then adds batches."""

    def __init__(
        self, out: Path, *, dim: int, image_sha256: str, on_index: Callable[[str, int, int], None] | None = None
    ) -> None:
        """``on_index(file, rows, total)`` reports a graph being brought up to the rows (a new
        second graph takes as long as the first did)."""
        import duckdb

        self.out, self.dim, self.image_sha256, self.on_index = out, dim, image_sha256, on_index
        out.mkdir(parents=True, exist_ok=True)
        if _manifest_path(out).is_file():
            old = read_manifest(out)
            if old.get("image_tower_sha256") != image_sha256 or int(old.get("dim", dim)) != dim:
                raise BundleFormatError(
                    f"{out} was built with GPSCLIP image tower {old.get('image_tower_sha256')}, but this bundle's is "
                    f"{image_sha256}: embeddings of two towers cannot share a gallery; use another --out"
                )
        try:
            self.con = duckdb.connect(str(out / DB))
            self.con.execute(SCHEMA)
        except duckdb.Error as exc:  # not a DuckDB file, or another build holds it
            raise GalleryBuildError(f"{out / DB}: cannot open the gallery rows ({exc})") from exc
        n = int(self.con.execute("SELECT count(*) FROM photos").fetchone()[0])
        top = self.con.execute("SELECT max(key) FROM photos").fetchone()[0]
        if n and top != n - 1:
            raise GalleryBuildError(f"{out / DB}: keys are not 0..{n - 1}; the gallery is damaged")
        # Vectors are written before rows are committed: drop any tail a killed run left behind.
        vec_path = out / VECTORS
        row_bytes = 2 * dim
        have = vec_path.stat().st_size // row_bytes if vec_path.exists() else 0
        if have < n:
            raise GalleryBuildError(f"{vec_path}: {have} vectors for {n} rows; the gallery is damaged")
        with vec_path.open("ab") as f:
            f.truncate(n * row_bytes)
        self.vectors = vec_path.open("ab")
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
        PHOTO_TWIN_ABOVE rows) up to the rows from ``vectors.f16``. A graph is derived data: one
        that is damaged, ahead of the rows or built with other settings (an older version's float16
        index) is rebuilt rather than trusted."""
        from .._native import usearch_index

        ui = usearch_index()
        wanted = [INDEX, INDEX2] if self.count > PHOTO_TWIN_ABOVE else [INDEX]
        if INDEX2 not in wanted:  # one left by a build under a lower threshold would be stale
            (self.out / INDEX2).unlink(missing_ok=True)
        for name in wanted:
            if name in self.graphs:
                continue
            index = None
            if (self.out / name).is_file():
                try:
                    index = ui.Index.restore(str(self.out / name))
                except (ValueError, RuntimeError):
                    index = None
                if index is not None and (
                    index.ndim != self.dim
                    or len(index) > self.count
                    or not str(index.dtype).lower().endswith(PHOTO_INDEX_DTYPE)
                    or index.connectivity != PHOTO_INDEX_CONNECTIVITY
                ):
                    index = None
            if index is None:
                index = ui.Index(
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
                mm = np.memmap(self.out / VECTORS, dtype=np.float16, mode="r", shape=(self.count, self.dim))
                for s in range(len(index), self.count, 10_000):
                    e = min(self.count, s + 10_000)
                    self._add_to(name, np.arange(s, e, dtype=np.int64), np.asarray(mm[s:e]))
                    if self.on_index:
                        self.on_index(name, e, self.count)
                    if time.monotonic() - self.saved_at > SAVE_EVERY_S:  # a killed rebuild resumes from here
                        self._save_index()
                del mm
        self._save_index()

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
        if len(self.graphs) < 2 and self.count > PHOTO_TWIN_ABOVE:
            self._catch_up()  # the gallery has just grown past one graph: build the second from the rows
        elif time.monotonic() - self.saved_at > SAVE_EVERY_S:
            self._save_index()

    def _save_index(self) -> None:
        """Save the graphs that changed (each fsynced, then renamed into place)."""
        for name in sorted(self.dirty):
            tmp = self.out / (name + ".tmp")
            self.graphs[name].save(str(tmp))
            _fsync(tmp)
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


def _batches(items: list[SourcePhoto], size: int) -> Iterator[list[SourcePhoto]]:
    for s in range(0, len(items), size):
        yield items[s : s + size]


def build_gallery(
    src: str | Path,
    bundle: Any,
    out: str | Path,
    *,
    batch_size: int = 16,
    device: str = "cpu",
    recursive: bool = True,
    on_total: Callable[[int], None] | None = None,
    on_photo: Callable[[str, Problem | None], None] | None = None,
    on_index: Callable[[str, int, int], None] | None = None,
) -> BuildSummary:
    """Embed every photo of ``src`` (a folder or a CSV) into the photo gallery ``out``.

    ``bundle`` is a :class:`~clue2geo_sdk.bundle.manifest.Bundle` or its path. ``on_total(n)`` is called once
    with the number of photos to look at; ``on_photo(path, problem)`` after each photo (problem
    None when it was added or already present); ``on_index(file, rows, total)`` while a graph is
    brought up to the rows in bulk. Bad photos never stop the build: they are
    returned in the summary's counts and appended to ``out/errors.jsonl``, as are rows that give a
    photo already added a conflicting position (the first is kept). A build that leaves the gallery
    empty raises :class:`GalleryBuildError` (the files it created are removed; ``errors.jsonl``
    says why each photo was not added)."""
    from ..bundle.manifest import Bundle
    from ..engines.encoders import GpsClipEncoder, providers_for
    from ..inputs.image import load_image, read_image_file
    from ..inputs.metadata.photo import read_metadata

    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=False)
    out = Path(out)
    comp = b.component("gpsclip")
    params = b.params("gpsclip")
    dim = int(params["dim"])
    image_sha = comp.files["image"].sha256
    photos, problems = read_source(Path(src), recursive=recursive)
    had_manifest = _manifest_path(out).is_file()
    writer = _Writer(out, dim=dim, image_sha256=image_sha, on_index=on_index)
    encoder = GpsClipEncoder({k: b.file("gpsclip", k) for k in comp.files}, params, providers_for(device))  # type: ignore[arg-type]
    counts = {"added": 0, "already": 0}
    errors_file = (out / ERRORS).open("a", encoding="utf-8")
    run = _utc_now().isoformat(timespec="seconds") + "Z"

    def report(problem: Problem) -> None:
        problems_seen.append(problem)
        errors_file.write(json.dumps({"run": run, **problem.to_dict()}) + "\n")
        errors_file.flush()

    problems_seen: list[Problem] = []
    digest = ""
    try:
        for p in problems:
            report(p)
            if on_photo:
                on_photo(p.source, p)
        if on_total:
            on_total(len(photos))
        for chunk in _batches(photos, max(1, batch_size)):
            rows, images, done = [], [], []
            for sp in chunk:
                name = str(sp.path)
                where = f" (CSV line {sp.line})" if sp.line else ""
                try:
                    data = read_image_file(sp.path, name=name)
                    sha = hashlib.sha256(data).hexdigest()
                    first = writer.known.get(sha) or next(
                        ((r["lat"], r["lon"], r["origin"]) for r in rows if r["sha256"] == sha), None
                    )
                    if first is not None:  # known by its bytes: not decoded again
                        conflict = _conflict(sp, data, first, name, where, sha)
                        if conflict is None:
                            counts["already"] += 1
                        done.append((name, conflict))
                        continue
                    img = load_image(data, name=name)
                except (Clue2GeoError, OSError) as exc:
                    done.append((name, Problem(source=name, kind="unreadable", message=f"{exc}{where}", line=sp.line)))
                    continue
                meta = read_metadata(img)
                if sp.lat is not None and sp.lon is not None:
                    lat, lon, source = sp.lat, sp.lon, "csv"
                elif meta.position is not None:
                    lat, lon, source = meta.position.lat, meta.position.lon, meta.position.source
                else:
                    why = "; ".join(meta.problems) or "no GPS position in its EXIF or XMP"
                    done.append((name, Problem(source=name, kind="no_position", message=f"{name}: {why}; skipped")))
                    continue
                rows.append(
                    {
                        "path": str(sp.path.resolve()),
                        "sha256": img.sha256,
                        "lat": float(lat),
                        "lon": float(lon),
                        "source": source,
                        "taken_at": meta.datetime_original,
                        "origin": name + where,
                    }
                )
                images.append(img.image)
                done.append((name, None))
            if images:
                writer.add(rows, encoder.encode_images(images))
                counts["added"] += len(rows)
            for name, problem in done:
                if problem is not None:
                    report(problem)
                if on_photo:
                    on_photo(name, problem)
        if writer.count:
            digest = writer.finish()
    finally:
        errors_file.close()
        writer.close()
    skipped = sum(p.kind == "no_position" for p in problems_seen)
    failed = sum(p.failed for p in problems_seen)
    if not writer.count:
        if not had_manifest:  # nothing of value: leave no half-gallery that would read as interrupted
            for name in (DB, DB + ".wal", VECTORS, INDEX, INDEX2):
                (out / name).unlink(missing_ok=True)
        raise GalleryBuildError(
            f"{out}: no photo could be added ({len(photos)} looked at: {skipped} without a GPS position, {failed} "
            f"failed; see {out / ERRORS}); a gallery needs photos with EXIF/XMP GPS positions, or a CSV of "
            "path,lat,lon giving them"
        )
    return BuildSummary(
        gallery=str(out),
        added=counts["added"],
        already=counts["already"],
        skipped=skipped,
        failed=failed,
        count=writer.count,
        digest=digest,
        conflicts=sum(p.kind == "conflict" for p in problems_seen),
    )


def _conflict(
    sp: SourcePhoto, data: bytes, first: tuple[float, float, str], name: str, where: str, sha: str
) -> Problem | None:
    """A :class:`Problem` when this source gives a photo already added (``first``: its position and
    who gave it) a position farther than :data:`POSITION_CONFLICT_KM` from it; else None."""
    from ..geo.reverse import haversine_km
    from ..inputs.metadata.photo import read_metadata

    if sp.lat is not None and sp.lon is not None:
        lat, lon = sp.lat, sp.lon
    else:
        pos = read_metadata(data).position  # the header only: no pixel is decoded
        if pos is None:
            return None
        lat, lon = pos.lat, pos.lon
    klat, klon, who = first
    if float(haversine_km(klat, klon, lat, lon)) <= POSITION_CONFLICT_KM:
        return None
    return Problem(
        source=name,
        kind="conflict",
        message=(
            f"{name}{where}: position {lat:.6f}, {lon:.6f} conflicts with {klat:.6f}, {klon:.6f} given to the same "
            f"photo (sha256 {sha[:16]}...) by {who}; the first position is kept, this one is not used"
        ),
        line=sp.line,
    )


# -- search ----------------------------------------------------------------------------------------


def _open_graph(path: Path, dim: int, n: int) -> Any:
    """A gallery's HNSW graph, memory-mapped, checked against the rows it must hold."""
    from .._native import usearch_index

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


class PhotoGallery(SearchMixin):
    """A built photo gallery, read-only and memory-mapped; safe to query from several threads.
    ``image_sha256`` (the bundle's GPSCLIP image tower) refuses a gallery embedded by another."""

    kind = "photos"

    def __init__(self, path: str | Path, *, image_sha256: str | None = None) -> None:
        import duckdb

        self.root = Path(path)
        manifest = read_manifest(self.root)
        count = manifest.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise BundleFormatError(f"{_manifest_path(self.root)}: count {count!r} is not a number of photos")
        if count == 0:
            raise BundleFormatError(
                f"photo gallery {self.root} holds no photos (built from photos without GPS positions?): there is "
                "nothing to search; rebuild it with `clue2geo gallery build` from geotagged photos or a CSV of "
                "path,lat,lon"
            )
        if image_sha256 is not None:
            check_image_tower(self.root, manifest, image_sha256)
        self.manifest = manifest
        dim = int(manifest["dim"])
        n = int(manifest["count"])
        try:
            with duckdb.connect(str(self.root / DB), read_only=True) as con:
                rows = con.execute("SELECT key, path, sha256, lat, lon FROM photos ORDER BY key").fetchnumpy()
        except duckdb.Error as exc:
            raise BundleFormatError(f"{self.root / DB}: unreadable gallery rows ({exc})") from exc
        keys = np.asarray(rows["key"], dtype=np.int64)
        if len(keys) != n or (n and (keys[0] != 0 or keys[-1] != n - 1)):
            raise BundleFormatError(_incomplete(self.root / DB, f"{len(keys)} rows where the manifest says {n}"))
        self.digest = content_digest(keys, rows["sha256"], rows["lat"], rows["lon"])
        if self.digest != manifest.get("content_sha256"):
            raise BundleFormatError(_incomplete(self.root / DB, "the rows are not the ones the manifest describes"))
        vec_path = self.root / VECTORS
        have = vec_path.stat().st_size // (2 * dim) if vec_path.is_file() else 0
        if have < n:
            raise BundleFormatError(_incomplete(vec_path, f"{have} vectors for {n} rows"))
        self.vectors = (
            np.memmap(vec_path, dtype=np.float16, mode="r", shape=(n, dim)) if n else np.zeros((0, dim), np.float16)
        )
        self.index = _open_graph(self.root / INDEX, dim, n)
        # Exact galleries are brute-forced over the float16 vectors (SIMD, no index rounding);
        # larger ones search the HNSW graph(s) and re-score the top PHOTO_RERANK. An int8 index is
        # queried with the query scaled as its vectors were; the index file itself says whether it
        # is int8 (a rebuild cut short leaves a new index beside the old manifest).
        self.int8 = str(self.index.dtype).lower().endswith("i8")
        self.exact = n <= EXACT_LIMIT
        self.twin = None
        if not self.exact and manifest.get("index", {}).get("graphs", 1) == 2:
            self.twin = _open_graph(self.root / INDEX2, dim, n)
            if str(self.twin.dtype) != str(self.index.dtype):
                raise BundleFormatError(
                    f"{self.root / INDEX2}: {self.twin.dtype} where {INDEX} is {self.index.dtype}; "
                    "run `clue2geo gallery build` on it again to rebuild the graphs"
                )
        self.scale = int8_scale(dim)
        self.rerank = PHOTO_RERANK
        self.subset_limit = n if self.exact else SUBSET_BRUTE_FORCE
        if self.twin is not None:
            self.index.expansion_search = self.twin.expansion_search = PHOTO_TWIN_EXPANSION
        elif not self.exact:  # a large gallery from before second graphs: one graph, searched wider
            self.index.expansion_search = PHOTO_HNSW_EXPANSION if n <= PHOTO_TWIN_ABOVE else PHOTO_LONE_EXPANSION
        self.lat = np.asarray(rows["lat"], dtype=np.float64)
        self.lon = np.asarray(rows["lon"], dtype=np.float64)
        self.paths = rows["path"]
        self.sha256 = rows["sha256"]

    def _vectors(self, keys: np.ndarray) -> np.ndarray:
        return np.asarray(self.vectors[keys])

    def _query(self, q: np.ndarray) -> np.ndarray:
        return to_int8(q / max(float(np.linalg.norm(q)), 1e-12), self.scale) if self.int8 else q

    def _candidates(self, q: np.ndarray, count: int, exact: bool) -> Matches:
        """With a second graph both are searched at once (USearch releases the GIL) and their
        candidates merged: a query that one graph's upper layers strand, the other finds. Two
        graphs that share almost none of their candidates means one (or both) was stranded: both
        are searched again, wider (PHOTO_TWIN_RETRY; ~5 % of queries at 5M)."""
        if self.twin is None or exact:
            return super()._candidates(q, count, exact)
        qi = self._query(q)
        both = self._both(qi, count, count)
        if len(np.intersect1d(both[0].keys, both[1].keys)) < count // 4 and count < PHOTO_TWIN_RETRY:
            both = self._both(qi, PHOTO_TWIN_RETRY, count)
        keys = np.concatenate([m.keys for m in both])
        distances = np.concatenate([m.distances for m in both])
        keys, at = np.unique(keys, return_index=True)  # sorted by key: _rescore orders them
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

    def _unrestricted(self, q: np.ndarray, k: int) -> Matches:
        if self.exact:
            return brute_force(self.vectors, q, k)
        m = self._candidates(q, min(len(self), max(k, self.rerank)), False)
        return self._rescore(q, m.keys, m.distances, k)  # int8 distances are coarse: always re-scored

    def _rescore(self, q: np.ndarray, keys: np.ndarray, distances: np.ndarray, k: int) -> Matches:
        order = np.sort(keys)  # sorted reads from the memory map
        m = brute_force(self._vectors(order), q, k)
        return Matches(keys=order[m.keys], distances=m.distances)

    def _hit(self, key: int, cosine: float) -> GalleryHit:
        return GalleryHit(
            key=key, lat=float(self.lat[key]), lon=float(self.lon[key]), cosine=cosine, path=str(self.paths[key])
        )
