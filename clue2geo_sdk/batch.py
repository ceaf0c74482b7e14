"""Batch runs that an analyst can trust: every input accounted for, nothing lost on interruption.

Each result is one *record* (``status`` "ok" or "error"), appended to the output and flushed and
fsynced before the next image starts. ``resume`` reads the output back (dropping a torn last line)
and skips inputs whose (path, sha256) already has a record, so a run killed at any moment and
resumed ends with every input exactly once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import attrs

from .geolocator import Failure, Geolocator
from .results import Prediction

Format = Literal["jsonl", "csv", "geojson"]
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
CSV_FIELDS = (
    "path",
    "status",
    "lat",
    "lon",
    "country",
    "city",
    "landmark",
    "confidence",
    "spread_km",
    "source",
    "fallback",
    "invalid_candidates",
    "image_sha256",
    "bundle",
    "seconds",
    "error",
    "message",
)


def discover(paths: Iterable[str | Path], *, recursive: bool) -> Iterator[Path | Failure]:
    """Expand arguments into image paths. Files named explicitly are always tried; folders yield
    files with an image suffix. Symlink loops and unreadable folders become Failures."""
    for arg in paths:
        p = Path(arg)
        if not p.is_dir():
            yield p
            continue
        seen: set[tuple[int, int]] = set()
        stack = [p]
        while stack:
            folder = stack.pop()
            try:
                st = folder.stat()
            except OSError as exc:
                yield Failure(image=str(folder), error="UnreadableFolder", message=f"{folder}: {exc.strerror or exc}")
                continue
            if (st.st_dev, st.st_ino) in seen:
                yield Failure(
                    image=str(folder),
                    error="SymlinkLoop",
                    message=f"{folder}: symlink loop (folder already visited); skipped",
                )
                continue
            seen.add((st.st_dev, st.st_ino))
            try:
                entries = sorted(folder.iterdir())
            except OSError as exc:
                yield Failure(image=str(folder), error="UnreadableFolder", message=f"{folder}: {exc.strerror or exc}")
                continue
            subdirs = []
            for e in entries:
                try:
                    is_dir = e.is_dir()
                except OSError:  # e.g. ELOOP on a self-referencing link
                    yield Failure(image=str(e), error="SymlinkLoop", message=f"{e}: symlink cannot be resolved")
                    continue
                if is_dir:
                    if recursive:
                        subdirs.append(e)
                elif e.suffix.lower() in IMAGE_SUFFIXES:
                    yield e
            stack.extend(reversed(subdirs))


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _sha256(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


def record_of(item: Prediction | Failure, path: str, seconds: float) -> dict[str, Any]:
    if isinstance(item, Prediction):
        return {"path": path, "status": "ok", "seconds": round(seconds, 3), **item.to_dict()}
    return {"path": path, "status": "error", "seconds": round(seconds, 3), **item.to_dict()}


def _csv_row(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: rec.get(k) for k in CSV_FIELDS}


def record_to_feature(rec: dict[str, Any]) -> dict[str, Any] | None:
    if rec.get("status") != "ok":
        return None
    props = {k: v for k, v in rec.items() if k not in ("lat", "lon")}
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [rec["lon"], rec["lat"]]},
        "properties": props,
    }


def _journal_path(out: Path, fmt: Format) -> Path:
    """Where records are appended: the output itself for jsonl/csv; a sidecar JSONL for geojson."""
    return out.with_name(out.name + ".records.jsonl") if fmt == "geojson" else out


def _read_complete_lines(path: Path) -> list[str]:
    """Lines up to the last newline; a torn final line (killed mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(end)
    return data[:end].decode("utf-8", errors="replace").splitlines()


def read_records(out: Path, fmt: Format) -> list[dict[str, Any]]:
    journal = _journal_path(out, fmt)
    lines = _read_complete_lines(journal)
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO("\n".join(lines) + "\n"))) if lines else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_geojson(path: Path, records: Iterable[dict[str, Any]]) -> None:
    features = [f for f in map(record_to_feature, records) if f is not None]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}, ensure_ascii=False))
    os.replace(tmp, path)


class RecordWriter:
    """Appends one record at a time, durably (flush + fsync)."""

    def __init__(self, out: Path, fmt: Format) -> None:
        self.out, self.fmt = out, fmt
        self.path = _journal_path(out, fmt)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._fh = open(self.path, "a", encoding="utf-8", newline="")
        if fmt == "csv":
            self._csv = csv.DictWriter(self._fh, fieldnames=CSV_FIELDS)
            if new:
                self._csv.writeheader()

    def write(self, rec: dict[str, Any]) -> None:
        if self.fmt == "csv":
            self._csv.writerow(_csv_row(rec))
        else:
            self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()
        if self.fmt == "geojson":
            write_geojson(self.out, read_records(self.out, "geojson"))


def run_batch(
    geo: Geolocator,
    inputs: Iterable[Path | Failure],
    out: Path,
    *,
    fmt: Format = "jsonl",
    resume: bool = False,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, int]:
    """Geolocate every input into ``out``; return counts {ok, error, skipped}."""
    journal = _journal_path(out, fmt)
    if not resume and journal.exists() and journal.stat().st_size > 0:
        raise FileExistsError(f"{out} already holds results; pass resume=True (--resume) or choose another file")
    done = {(r.get("path"), r.get("image_sha256") or None) for r in read_records(out, fmt)} if resume else set()
    counts = {"ok": 0, "error": 0, "skipped": 0}
    writer = RecordWriter(out, fmt)
    try:
        for item in inputs:
            t0 = time.perf_counter()
            data = None if isinstance(item, Failure) else _read_bytes(item)
            key = (item.image, None) if isinstance(item, Failure) else (str(item), _sha256(data))
            if key in done:
                counts["skipped"] += 1
                if on_record:
                    on_record({"path": key[0], "status": "skipped"})
                continue
            if isinstance(item, Failure):
                result: Prediction | Failure = item
            else:  # the bytes read for the digest are the ones decoded; unreadable paths report why
                result = geo.try_locate(data if data is not None else item, name=str(item))
                if isinstance(result, Failure):
                    result = attrs.evolve(result, image_sha256=key[1])
            rec = record_of(result, key[0], time.perf_counter() - t0)
            writer.write(rec)
            done.add(key)
            counts["ok" if rec["status"] == "ok" else "error"] += 1
            if on_record:
                on_record(rec)
    finally:
        writer.close()
    return counts
