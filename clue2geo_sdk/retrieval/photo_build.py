"""Building a photo gallery from a folder or a CSV (:func:`build_gallery`): each photo read, its
position found, embedded with the bundle's GPSCLIP image tower and added by the resumable
:class:`~clue2geo_sdk.retrieval.photo_writer.GalleryWriter`.

A photo is known by its sha256: one given again (another path, another run) is not added twice.
When a CSV row (or a photo's own GPS) gives a photo already added a position more than
:data:`POSITION_CONFLICT_KM` away from the first, the first position is kept and the row is
reported as a ``conflict`` (in ``errors.jsonl``, counted in the summary). A build that adds no
photo at all (say, a folder of photos without GPS) is refused: no empty gallery is written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from ..bundle.manifest import Bundle
from ..engines.encoders import GpsClipEncoder, providers_for
from ..errors import Clue2GeoError
from ..geo.distance import haversine_km
from ..inputs.image import load_image, read_image_file
from ..inputs.metadata.photo import read_metadata
from .photo_writer import GalleryWriter, utc_stamp
from .photos import DB, ERRORS, GALLERY_MANIFEST_FILE, INDEX, INDEX2, VECTORS
from .sources import GalleryBuildError, Problem, SourcePhoto, read_source

#: Two positions given to the same photo closer than this are the same place (a CSV's decimals and
#: the EXIF's degrees-minutes-seconds round differently); farther apart, the second is a conflict.
POSITION_CONFLICT_KM = 0.01


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


def _batches(items: list[SourcePhoto], size: int) -> Iterator[list[SourcePhoto]]:
    for s in range(0, len(items), size):
        yield items[s : s + size]


class _Build:
    """One run of :func:`build_gallery`: reads, embeds and adds photos batch by batch, and keeps
    what was not added (``errors.jsonl``, ``on_photo``) and the counts for the summary."""

    def __init__(
        self,
        out: Path,
        writer: GalleryWriter,
        encoder: GpsClipEncoder,
        on_photo: Callable[[str, Problem | None], None] | None,
    ) -> None:
        self.out, self.writer, self.encoder, self.on_photo = out, writer, encoder, on_photo
        self.added = self.already = 0
        self.problems: list[Problem] = []
        self.errors_file = (out / ERRORS).open("a", encoding="utf-8")
        self.run = utc_stamp()

    def tell(self, name: str, problem: Problem | None) -> None:
        """One photo (or source row) is done: a problem goes to ``errors.jsonl``; ``on_photo`` hears."""
        if problem is not None:
            self.problems.append(problem)
            self.errors_file.write(json.dumps({"run": self.run, **problem.to_dict()}) + "\n")
            self.errors_file.flush()
        if self.on_photo:
            self.on_photo(name, problem)

    def add_batch(self, chunk: list[SourcePhoto]) -> None:
        """Read every photo of ``chunk``, embed the new ones in one call, add them, then tell."""
        rows: list[dict[str, Any]] = []
        images: list[Any] = []
        done: list[tuple[str, Problem | None]] = []
        for sp in chunk:
            got = self._read_one(sp, rows)
            if isinstance(got, tuple):
                rows.append(got[0])
                images.append(got[1])
                got = None
            done.append((str(sp.path), got))
        if images:
            self.writer.add(rows, self.encoder.encode_images(images))
            self.added += len(rows)
        for name, problem in done:
            self.tell(name, problem)

    def _read_one(self, sp: SourcePhoto, batch: list[dict[str, Any]]) -> tuple[dict[str, Any], Any] | Problem | None:
        """The row and decoded image of a photo to add; a :class:`Problem` when it cannot be added (or
        gives a photo already added a conflicting position); None when it is already there (in the
        gallery or earlier in ``batch``: known by its bytes, not decoded again)."""
        name = str(sp.path)
        where = f" (CSV line {sp.line})" if sp.line else ""
        try:
            data = read_image_file(sp.path, name=name)
            sha = hashlib.sha256(data).hexdigest()
            first = self.writer.known.get(sha) or next(
                ((r["lat"], r["lon"], r["origin"]) for r in batch if r["sha256"] == sha), None
            )
            if first is not None:
                conflict = _conflict(sp, data, first, name, where, sha)
                if conflict is None:
                    self.already += 1
                return conflict
            img = load_image(data, name=name)
        except (Clue2GeoError, OSError) as exc:
            return Problem(source=name, kind="unreadable", message=f"{exc}{where}", line=sp.line)
        meta = read_metadata(img)
        if sp.lat is not None and sp.lon is not None:
            lat, lon, source = sp.lat, sp.lon, "csv"
        elif meta.position is not None:
            lat, lon, source = meta.position.lat, meta.position.lon, meta.position.source
        else:
            why = "; ".join(meta.problems) or "no GPS position in its EXIF or XMP"
            return Problem(source=name, kind="no_position", message=f"{name}: {why}; skipped")
        row = {
            "path": str(sp.path.resolve()),
            "sha256": img.sha256,
            "lat": float(lat),
            "lon": float(lon),
            "source": source,
            "taken_at": meta.datetime_original,
            "origin": name + where,
        }
        return row, img.image

    def close(self) -> None:
        self.errors_file.close()
        self.writer.close()

    def summary(self, digest: str) -> BuildSummary:
        return BuildSummary(
            gallery=str(self.out),
            added=self.added,
            already=self.already,
            skipped=sum(p.kind == "no_position" for p in self.problems),
            failed=sum(p.failed for p in self.problems),
            count=self.writer.count,
            digest=digest,
            conflicts=sum(p.kind == "conflict" for p in self.problems),
        )


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
    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle, verify=False)
    out = Path(out)
    comp = b.component("gpsclip")
    params = b.params("gpsclip")
    dim = int(params["dim"])
    photos, problems = read_source(Path(src), recursive=recursive)
    had_manifest = (out / GALLERY_MANIFEST_FILE).is_file()
    writer = GalleryWriter(out, dim=dim, image_sha256=comp.files["image"].sha256, on_index=on_index)
    encoder = GpsClipEncoder({k: b.file("gpsclip", k) for k in comp.files}, params, providers_for(device))  # type: ignore[arg-type]
    build = _Build(out, writer, encoder, on_photo)
    digest = ""
    try:
        for p in problems:
            build.tell(p.source, p)
        if on_total:
            on_total(len(photos))
        for chunk in _batches(photos, max(1, batch_size)):
            build.add_batch(chunk)
        if writer.count:
            digest = writer.finish()
    finally:
        build.close()
    summary = build.summary(digest)
    if not writer.count:
        _refuse_empty(out, had_manifest, len(photos), summary)
    return summary


def _refuse_empty(out: Path, had_manifest: bool, looked_at: int, summary: BuildSummary) -> None:
    """A build that added nothing: raise, leaving no half-gallery that would read as interrupted."""
    if not had_manifest:
        for name in (DB, DB + ".wal", VECTORS, INDEX, INDEX2):
            (out / name).unlink(missing_ok=True)
    raise GalleryBuildError(
        f"{out}: no photo could be added ({looked_at} looked at: {summary.skipped} without a GPS position, "
        f"{summary.failed} failed; see {out / ERRORS}); a gallery needs photos with EXIF/XMP GPS positions, or a "
        "CSV of path,lat,lon giving them"
    )


def _conflict(
    sp: SourcePhoto, data: bytes, first: tuple[float, float, str], name: str, where: str, sha: str
) -> Problem | None:
    """A :class:`Problem` when this source gives a photo already added (``first``: its position and
    who gave it) a position farther than :data:`POSITION_CONFLICT_KM` from it; else None."""
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
