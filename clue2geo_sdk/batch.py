"""Batch runs that an analyst can trust: every input accounted for, nothing lost on interruption.

Each result is one *record* (``status`` "ok" or "error"), appended to a JSONL *journal* and flushed
and fsynced before the next image starts. The journal is the output itself for ``jsonl``; for ``csv``
and ``geojson`` it is ``OUT.records.jsonl`` beside it, and OUT is written from it when the run ends.

The journal holds one JSON object per ``\\n``-terminated line and is split on the byte ``\\n`` only,
so no string (U+2028, U+0085, NUL, ...) can cut a record. A torn last line (a run killed
mid-write) and any unreadable line are reported with their line numbers, never dropped silently;
``resume`` cuts the torn line off. Every record carries what made it (``bundle_digest``,
``options_digest``, ``sdk_version``, ``demo``): ``resume`` reuses a record only when the path, the
image's sha256 and those all match; otherwise the input runs again and the new record supersedes
(readers take the latest record per path).

Chain of custody: each record also carries ``started_utc`` / ``finished_utc`` and is hash-chained
to the one before it (``prev_hash``, ``record_hash``; :mod:`clue2geo_sdk.audit`), so ``clue2geo
audit verify`` finds an edited, removed or reordered record. Appends (``resume``) continue the chain.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from ._version import __version__
from .audit import chain, last_link
from .bundle import Bundle
from .errors import ImageLoadError
from .geolocator import Failure, Geolocator, Options
from .image import read_image_file
from .results import Prediction
from .sanitize import csv_cell

Format = Literal["jsonl", "csv", "geojson"]
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".hif"}
)
IDENTITY_FIELDS = ("bundle_digest", "options_digest", "gallery_digest", "sdk_version", "demo")
CSV_FIELDS = (
    "path",
    "status",
    "lat",
    "lon",
    "country",
    "country_code",
    "admin1",
    "city",
    "landmark",
    "model_country",
    "model_city",
    "confidence",
    "similarity",
    "spread_km",
    "source",
    "fallback",
    "invalid_candidates",
    "region",
    "outside_region",
    "cues_status",
    "image_sha256",
    "bundle",
    "bundle_digest",
    "options_digest",
    "sdk_version",
    "demo",
    "seconds",
    "error",
    "message",
    "metadata_lat",
    "metadata_lon",
    "metadata_source",
    "metadata_distance_km",
    "metadata_datetime_original",
    "metadata_problems",
    "started_utc",
    "finished_utc",
    "record_hash",
)


class JournalWarning(UserWarning):
    """A journal line was torn or unreadable (issued when no ``on_notice`` callback is given)."""


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
    """The bytes to hash and decode, or None (unreadable, not a file, over the size cap: checked from
    ``stat`` before reading); the locator then reads the path itself and records why it failed."""
    try:
        return read_image_file(path)
    except ImageLoadError:
        return None


def _sha256(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


def identity(geo: Geolocator, options: Options | None = None) -> dict[str, Any]:
    """What makes a record: the bundle, the options and the SDK. Stored in every record so a
    result is never reused, nor read, as if another model or setting had made it."""
    photos = geo.gallery.kind == "photos"
    return identity_of(geo.bundle, options or geo.options, gallery_digest=geo.gallery.digest if photos else None)


def identity_of(bundle: Bundle, options: Options, *, gallery_digest: str | None = None) -> dict[str, Any]:
    """:func:`identity` from a bundle and options alone (a cluster driver loads no models).
    ``gallery_digest`` names an analyst's photo gallery; None is the bundle's own gallery."""
    return {
        "bundle_digest": bundle.digest,
        "options_digest": options.digest(),
        "gallery_digest": gallery_digest,
        "sdk_version": __version__,
        "demo": bundle.demo,
    }


def utc_now() -> str:
    """The current UTC time as ISO 8601 with milliseconds (the records' ``started_utc`` / ``finished_utc``)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def record_of(
    item: Prediction | Failure,
    path: str,
    seconds: float,
    ident: Mapping[str, Any],
    *,
    started_utc: str | None = None,
    finished_utc: str | None = None,
) -> dict[str, Any]:
    """One journal record: the result's ``to_dict`` with its path, status, time, identity and UTC start
    and end (when not given: end now, start ``seconds`` before)."""
    status = "ok" if isinstance(item, Prediction) else "error"
    if finished_utc is None:
        end = _dt.datetime.now(_dt.UTC)
        finished_utc = end.isoformat(timespec="milliseconds")
        if started_utc is None:
            started_utc = (end - _dt.timedelta(seconds=seconds)).isoformat(timespec="milliseconds")
    rec = {"path": path, "status": status, "seconds": round(seconds, 3), **item.to_dict(), **ident}
    rec["started_utc"], rec["finished_utc"] = started_utc, finished_utc
    return rec


def _csv_value(rec: Mapping[str, Any], key: str) -> Any:
    if key == "region":
        return json.dumps(rec["region"], separators=(",", ":")) if rec.get("region") else None
    if not key.startswith("metadata_") or key == "metadata_distance_km":
        return rec.get(key)
    meta = rec.get("metadata") or {}
    pos = meta.get("position") or {}
    if key == "metadata_problems":
        return "; ".join(meta.get("problems") or ()) or None
    if key == "metadata_datetime_original":
        return meta.get("datetime_original")
    return pos.get(key[len("metadata_") :])


def csv_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A record as one spreadsheet-safe CSV row (text cells that start a formula are neutralised);
    ``metadata_*`` cells come from the record's ``metadata`` (the photo's own position and time)."""
    return {k: csv_cell(_csv_value(rec, k)) for k in CSV_FIELDS}


def record_to_feature(rec: dict[str, Any]) -> dict[str, Any] | None:
    if rec.get("status") != "ok":
        return None
    props = {k: v for k, v in rec.items() if k not in ("lat", "lon")}
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [rec["lon"], rec["lat"]]},
        "properties": props,
    }


def journal_path(out: Path, fmt: Format) -> Path:
    """Where records are appended: the output itself for jsonl; a sidecar JSONL for csv and geojson."""
    return out if fmt == "jsonl" else out.with_name(out.name + ".records.jsonl")


@attrs.frozen
class Journal:
    """The records read from a journal, and what was wrong with it (one line each, with line numbers)."""

    records: list[dict[str, Any]]
    problems: list[str]


def read_journal(path: Path, *, repair: bool = False) -> Journal:
    """Every record of a JSONL journal, split on ``b"\\n"`` only. A torn last line is reported and, with
    ``repair``, cut off the file; an unreadable line is reported with its number and skipped."""
    if not path.exists():
        return Journal([], [])
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    lines = data[:end].split(b"\n")[:-1]
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
        except (UnicodeDecodeError, ValueError) as exc:
            problems.append(f"{path}:{n}: unreadable record skipped ({exc}): {raw[:60]!r}")
            continue
        records.append(rec)
    if end < len(data):
        what = f"{path}:{len(lines) + 1}: incomplete last line ({len(data) - end} bytes; a run killed mid-write?)"
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
            problems.append(what + "; cut off, its input runs again")
        else:
            problems.append(what + "; ignored")
    return Journal(records, problems)


def read_records(out: Path, fmt: Format = "jsonl") -> list[dict[str, Any]]:
    """Every record behind ``out``; each problem in the journal is issued as a :class:`JournalWarning`."""
    journal = read_journal(journal_path(out, fmt))
    for problem in journal.problems:
        warnings.warn(problem, JournalWarning, stacklevel=2)
    return journal.records


def latest(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The latest record per path (a re-run supersedes), in the order they were last written."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        key = str(r.get("path"))
        out.pop(key, None)
        out[key] = dict(r)
    return out


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        write(fh)
    os.replace(tmp, path)


def write_geojson(path: Path, records: Iterable[dict[str, Any]]) -> None:
    features = [f for f in map(record_to_feature, records) if f is not None]
    doc = {"type": "FeatureCollection", "features": features}
    _atomic_write(path, lambda fh: fh.write(json.dumps(doc, ensure_ascii=False)))


def write_csv(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """CSV_FIELDS of each record, every cell through :func:`csv_cell` (numbers stay numbers)."""

    def write(fh: Any) -> None:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(csv_row(r) for r in records)

    _atomic_write(path, write)


def write_output(out: Path, fmt: Format, records: Iterable[dict[str, Any]]) -> None:
    """Write a csv or geojson output from the latest record per path (jsonl is its own journal)."""
    rows = list(latest(records).values())
    if fmt == "csv":
        write_csv(out, rows)
    elif fmt == "geojson":
        write_geojson(out, rows)


def _encode(rec: Mapping[str, Any]) -> bytes:
    """One journal line. Lone surrogates (undecodable file names) cannot be UTF-8: escape them."""
    try:
        return json.dumps(rec, ensure_ascii=False).encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(rec).encode("ascii") + b"\n"


class RecordWriter:
    """Appends one record at a time to the journal, durably (flush + fsync), each hash-chained to the
    one before it (the journal's last record when appending to an existing one)."""

    def __init__(self, out: Path, fmt: Format) -> None:
        self.out, self.fmt = out, fmt
        self.path = journal_path(out, fmt)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "ab")
        self._prev = last_link(self.path)

    def write(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``rec`` with ``prev_hash`` and ``record_hash``; return the record as written."""
        chained = chain(rec, self._prev)
        self._fh.write(_encode(chained))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._prev = chained["record_hash"]
        return chained

    def close(self) -> None:
        self._fh.close()
        if self.fmt != "jsonl":
            write_output(self.out, self.fmt, read_journal(self.path).records)


@attrs.define
class BatchSummary:
    """Counts of a run and the notices it gave (journal problems, records made by something else)."""

    ok: int = 0
    error: int = 0
    skipped: int = 0
    rerun: int = 0
    notices: list[str] = attrs.field(factory=list)


def _short(value: Any) -> str:
    return "unrecorded" if value in (None, "") else str(value)[:12]


def stale_notice(journal: Path, records: Iterable[Mapping[str, Any]], ident: Mapping[str, Any]) -> str | None:
    """One line saying how many records were made by another bundle, options or SDK, or None."""
    labels = {
        "bundle_digest": "bundle",
        "options_digest": "options",
        "gallery_digest": "reference gallery",
        "sdk_version": "clue2geo version",
    }
    n, parts = 0, {}
    for r in records:
        differ = [k for k in labels if r.get(k) != ident[k]]
        n += bool(differ)
        for k in differ:
            parts.setdefault(k, r.get(k))
    if not n:
        return None
    what = ", ".join(f"{labels[k]} ({_short(v)} here, {_short(ident[k])} now)" for k, v in parts.items())
    return f"{journal}: {n} record(s) were made with another {what}; those inputs run again (new records supersede)"


def run_batch(
    geo: Geolocator,
    inputs: Iterable[Path | Failure],
    out: Path,
    *,
    fmt: Format = "jsonl",
    resume: bool = False,
    retry_failed: bool = False,
    options: Options | None = None,
    in_flight: int | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> BatchSummary:
    """Geolocate every input into ``out`` under ``options`` (default: the geolocator's own), up to
    ``in_flight`` images at once (default: the geolocator's ``max_in_flight``).

    ``resume`` skips an input whose latest record has the same path, image sha256, bundle, options
    and SDK version; ``retry_failed`` also runs again those whose latest record is an error. Notices
    go to ``on_notice`` (default: a :class:`JournalWarning`)."""
    opts = options or geo.options
    ident = identity(geo, opts)
    journal = journal_path(out, fmt)
    summary = BatchSummary()

    def notice(msg: str) -> None:
        summary.notices.append(msg)
        if on_notice:
            on_notice(msg)
        else:
            warnings.warn(msg, JournalWarning, stacklevel=3)

    has_journal = journal.exists() and journal.stat().st_size > 0
    if not resume and has_journal:
        raise FileExistsError(f"{out} already holds results; pass resume=True (--resume) or choose another file")
    if out != journal and not has_journal and out.exists() and out.stat().st_size > 0:
        raise FileExistsError(
            f"{out} exists and is not a clue2geo run (no {journal.name} beside it); choose another file"
        )
    prior: dict[str, dict[str, Any]] = {}
    if resume:
        read = read_journal(journal, repair=True)
        for problem in read.problems:
            notice(problem)
        prior = latest(read.records)
        stale = stale_notice(journal, prior.values(), ident)
        if stale:
            notice(stale)

    def todo() -> Iterator[tuple[Path | Failure, str, str | None, bytes | None]]:
        """Inputs that need a record, read here in input order; skips are counted as they pass."""
        for item in inputs:
            data = None if isinstance(item, Failure) else _read_bytes(item)
            path, sha = (item.image, None) if isinstance(item, Failure) else (str(item), _sha256(data))
            old = prior.get(path)
            if old is not None:
                same = (old.get("image_sha256") or None) == sha and all(old.get(k) == ident[k] for k in IDENTITY_FIELDS)
                if same and not (retry_failed and old.get("status") == "error"):
                    summary.skipped += 1
                    if on_record:
                        on_record({"path": path, "status": "skipped"})
                    continue
                summary.rerun += 1
            yield item, path, sha, data

    def work(task: tuple[Path | Failure, str, str | None, bytes | None]) -> dict[str, Any]:
        item, path, sha, data = task
        t0, started = time.perf_counter(), utc_now()
        if isinstance(item, Failure):
            result: Prediction | Failure = item
        else:  # the bytes read for the digest are the ones decoded; unreadable paths report why
            result = geo.try_locate(data if data is not None else item, name=str(item), options=opts)
            if isinstance(result, Failure):
                result = attrs.evolve(result, image_sha256=sha)
        seconds, finished = time.perf_counter() - t0, utc_now()
        return record_of(result, path, seconds, ident, started_utc=started, finished_utc=finished)

    writer = RecordWriter(out, fmt)
    try:  # up to in_flight images in the engine at once; records are written in input order
        for rec in geo.map_in_flight(work, todo(), in_flight=in_flight):
            rec = writer.write(rec)
            prior[rec["path"]] = rec
            if rec["status"] == "ok":
                summary.ok += 1
            else:
                summary.error += 1
            if on_record:
                on_record(rec)
    finally:
        writer.close()
    return summary
