"""Batch runs that an analyst can trust: every input accounted for, nothing lost on interruption.

Each result is one *record* (``status`` "ok" or "error"), appended to a JSONL *journal* and flushed
and fsynced before the next image starts. The journal is the output itself for ``jsonl``; for ``csv``
and ``geojson`` it is ``OUT.records.jsonl`` beside it, and OUT is written from it when the run ends.

The journal holds one JSON object per ``\\n``-terminated line and is split on the byte ``\\n`` only,
so no string (U+2028, U+0085, NUL, ...) can cut a record. A torn last line (a run killed
mid-write) and any unreadable line are reported with their line numbers, never dropped silently;
``resume`` cuts the torn line off. Every record carries what made it (``bundle_digest``,
``options_digest``, ``sdk_version``, ``demo``): ``resume`` reuses a record only when the image (its
sha256 and its path: absolute, or as given) and those all match; otherwise the input runs again and
the new record supersedes (readers take the latest record per image, :func:`latest`).

One writer per journal: a run holds an advisory lock (``flock``) on the journal from start to end, and
a second run on the same file is refused (:class:`ResultsInUseError`). A failed write (a full disk)
is cut back off the journal, so it ends with whole records, and ends the run with one
:class:`ResultsWriteError`. No NaN or Infinity is ever written (they are not JSON;
:func:`clue2geo_sdk.runs.chain.chain` turns them into null and says so in the record).

Chain of custody: each record also carries ``started_utc`` / ``finished_utc`` and is hash-chained
to the one before it (``prev_hash``, ``record_hash``; :mod:`clue2geo_sdk.runs.chain`), so ``clue2geo
audit verify`` finds an edited, removed or reordered record. Appends (``resume``) continue the chain.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from .._version import __version__
from ..bundle.manifest import Bundle
from ..errors import Clue2GeoError
from ..geolocator import Geolocator
from ..inputs.discover import read_input_bytes, sha256_of
from ..options import Options
from ..results import Failure, Prediction
from ..sanitize import csv_cell
from .chain import chain, finite, last_link

try:  # advisory locks: POSIX only; elsewhere a run is not guarded against a second writer
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

Format = Literal["jsonl", "csv", "geojson"]
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


class ResultsInUseError(Clue2GeoError, RuntimeError):
    """Another run is writing the same results file (it holds the file's lock): two writers would
    interleave two hash chains in one journal."""


class ResultsWriteError(Clue2GeoError, OSError):
    """The results could not be written (a full disk, no permission, a read-only filesystem); the
    message names the file and the system's reason, and the journal is left ending with whole records."""

    def __init__(self, path: Path, exc: OSError, note: str = "") -> None:
        super().__init__(f"cannot write results to {path}: {exc.strerror or exc}{note}")
        self.errno, self.filename = exc.errno, str(path)
        self._made_from = (path, exc, note)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (Ray, multiprocessing)
        return (type(self), self._made_from)

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno n] ..." form
        return str(self.args[0])


class ResultsExistError(Clue2GeoError, FileExistsError):
    """``--out`` already holds results (pass ``resume``) or a file that is not a clue2geo run."""


class ResultsPathError(Clue2GeoError, ValueError):
    """A results path that cannot be one: a folder where a file is needed, or an export onto its own input."""


def lock_results(fd: int, target: Path) -> None:
    """Take the exclusive advisory lock on ``fd`` (``target``'s journal, or a run folder) without
    waiting; another holder means another run is writing: :class:`ResultsInUseError`. A filesystem
    that has no locks is written unguarded, with a :class:`JournalWarning` saying so."""
    if fcntl is None:  # pragma: no cover - Windows
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ResultsInUseError(
            f"{target} is being written by another clue2geo run (it holds the file's lock); wait for that run to "
            "finish, or choose another --out"
        ) from None
    except OSError as exc:  # ENOLCK / EOPNOTSUPP: some network and FUSE filesystems
        warnings.warn(
            f"{target}: the filesystem cannot lock files ({exc.strerror or exc}); make sure no other run writes it",
            JournalWarning,
            stacklevel=3,
        )


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
    abs_path: str | None = None,
) -> dict[str, Any]:
    """One journal record: the result's ``to_dict`` with its path (as given, and ``abs_path``: absolute,
    default from this process's working folder), status, time, identity and UTC start and end (when not
    given: end now, start ``seconds`` before)."""
    status = "ok" if isinstance(item, Prediction) else "error"
    if finished_utc is None:
        end = _dt.datetime.now(_dt.UTC)
        finished_utc = end.isoformat(timespec="milliseconds")
        if started_utc is None:
            started_utc = (end - _dt.timedelta(seconds=seconds)).isoformat(timespec="milliseconds")
    rec = {"path": path, "abs_path": abs_path or absolute(path), "status": status, "seconds": round(seconds, 3)}
    rec |= {**item.to_dict(), **ident}
    rec["started_utc"], rec["finished_utc"] = started_utc, finished_utc
    return rec


def absolute(path: str) -> str:
    """``path`` made absolute from the working folder, without following links (what resume and
    :func:`latest` compare, beside the sha256, to tell two images under one relative path apart)."""
    return os.path.abspath(path)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _csv_value(rec: Mapping[str, Any], key: str) -> Any:
    if key == "region":
        return json.dumps(rec["region"], separators=(",", ":")) if rec.get("region") else None
    if not key.startswith("metadata_") or key == "metadata_distance_km":
        value = rec.get(key)
        return json.dumps(value, ensure_ascii=False) if isinstance(value, (Mapping, list)) else value
    meta = _mapping(rec.get("metadata"))
    pos = _mapping(meta.get("position"))
    if key == "metadata_problems":
        problems = meta.get("problems")
        return ("; ".join(map(str, problems)) or None) if isinstance(problems, list) else None
    if key == "metadata_datetime_original":
        return meta.get("datetime_original")
    return pos.get(key[len("metadata_") :])


def csv_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    """A record as one spreadsheet-safe CSV row (text cells that start a formula are neutralised);
    ``metadata_*`` cells come from the record's ``metadata`` (the photo's own position and time).
    Never raises on a field of the wrong type (a nested value becomes its JSON text)."""
    rec = finite(rec)
    return {k: csv_cell(_csv_value(rec, k)) for k in CSV_FIELDS}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def record_to_feature(rec: Mapping[str, Any]) -> dict[str, Any] | None:
    """An ok record as a GeoJSON Point feature; None for an error record or one without a valid position."""
    if rec.get("status") != "ok" or not (_number(rec.get("lat")) and _number(rec.get("lon"))):
        return None
    rec = finite(rec)
    props = {k: v for k, v in rec.items() if k not in ("lat", "lon")}
    return {
        "type": "Feature",
        "geometry": {"type": "Point", "coordinates": [rec["lon"], rec["lat"]]},
        "properties": props,
    }


_TEXT_FIELDS = (
    "abs_path", "country", "country_code", "admin1", "city", "landmark", "model_country", "model_city", "source",
    "cues_status", "image_sha256", "image", "bundle", "bundle_digest", "options_digest", "gallery_digest",
    "sdk_version", "error", "message", "started_utc", "finished_utc", "prev_hash", "record_hash",
)  # fmt: skip
_NUMBER_FIELDS = ("confidence", "similarity", "spread_km", "seconds", "metadata_distance_km")
_COUNT_FIELDS = ("invalid_candidates", "outside_region")
_FLAG_FIELDS = ("fallback", "demo")
_OBJECT_FIELDS = ("metadata", "region", "options", "timings", "raw_outputs", "cluemap", "references")
_LIST_FIELDS = ("candidates", "cues", "answers")


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def record_problem(rec: Mapping[str, Any]) -> str | None:
    """Why a record read back from a file cannot be exported or shown as it is (a field of the wrong
    type or out of range: a hand-edited or foreign file), or None. Records the SDK writes always pass."""
    if not isinstance(rec.get("path"), str):
        return f"'path' is {_kind(rec.get('path'))}, not text"
    if rec.get("status") not in ("ok", "error"):
        return f"'status' is {rec.get('status')!r}, not 'ok' or 'error'"
    checks: list[tuple[tuple[str, ...], Callable[[Any], bool], str]] = [
        (_TEXT_FIELDS, lambda v: isinstance(v, str), "text"),
        (_NUMBER_FIELDS, _number, "a finite number"),
        (_COUNT_FIELDS, lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
        (_FLAG_FIELDS, lambda v: isinstance(v, bool), "true or false"),
        (_OBJECT_FIELDS, lambda v: isinstance(v, Mapping), "an object"),
        (_LIST_FIELDS, lambda v: isinstance(v, list) and all(isinstance(x, Mapping) for x in v), "a list of objects"),
    ]
    for fields, ok, what in checks:
        for k in fields:
            v = rec.get(k)
            if v is not None and not ok(v):
                return f"'{k}' is {_kind(v)} {str(v)[:40]!r}, not {what}"
    if rec["status"] == "ok":
        for k, bound in (("lat", 90), ("lon", 180)):
            v = rec.get(k)
            if not (_number(v) and -bound <= v <= bound):
                return f"'{k}' is {_kind(v)} {str(v)[:40]!r}, not a {'latitude' if k == 'lat' else 'longitude'}"
    meta = rec.get("metadata")
    if isinstance(meta, Mapping):
        pos = meta.get("position")
        if pos is not None and not (isinstance(pos, Mapping) and all(_number(pos.get(k)) for k in ("lat", "lon"))):
            return f"'metadata.position' is {_kind(pos)} {str(pos)[:40]!r}, not a position with lat and lon"
        problems = meta.get("problems")
        if problems is not None and not (isinstance(problems, list) and all(isinstance(x, str) for x in problems)):
            return f"'metadata.problems' is {_kind(problems)} {str(problems)[:40]!r}, not a list of text"
        if meta.get("datetime_original") is not None and not isinstance(meta.get("datetime_original"), str):
            return "'metadata.datetime_original' is not text"
    return None


def valid_records(journal: Journal) -> Journal:
    """``journal`` without the records :func:`record_problem` refuses, each named (file and line) in
    its problems: one bad record does not stop an export or a report of the others."""
    records, where, problems = [], [], list(journal.problems)
    for i, rec in enumerate(journal.records):
        line = journal.where[i] if i < len(journal.where) else f"record {i + 1}"
        why = record_problem(rec)
        if why is None:
            records.append(rec)
            where.append(line)
        else:
            problems.append(f"{line}: record skipped: {why}")
    return Journal(records, problems, where)


def journal_path(out: Path, fmt: Format) -> Path:
    """Where records are appended: the output itself for jsonl; a sidecar JSONL for csv and geojson."""
    return out if fmt == "jsonl" else out.with_name(out.name + ".records.jsonl")


@attrs.frozen
class Journal:
    """The records read from a journal, and what was wrong with it (one line each, with line numbers)."""

    records: list[dict[str, Any]]
    problems: list[str]
    where: list[str] = attrs.field(factory=list)  # "FILE:LINE" of each record, when read from a file


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
    where: list[str] = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not an object")
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep JSON
            problems.append(f"{path}:{n}: unreadable record skipped ({type(exc).__name__}: {exc}): {raw[:60]!r}")
            continue
        records.append(rec)
        where.append(f"{path}:{n}")
    if end < len(data):
        what = f"{path}:{len(lines) + 1}: incomplete last line ({len(data) - end} bytes; a run killed mid-write?)"
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(end)
                os.fsync(fh.fileno())
            problems.append(what + "; cut off, its input runs again")
        else:
            problems.append(what + "; ignored")
    return Journal(records, problems, where)


def read_records(out: Path, fmt: Format = "jsonl") -> list[dict[str, Any]]:
    """Every record behind ``out``; each problem in the journal is issued as a :class:`JournalWarning`."""
    journal = read_journal(journal_path(out, fmt))
    for problem in journal.problems:
        warnings.warn(problem, JournalWarning, stacklevel=2)
    return journal.records


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class ImageIndex:
    """Which records are of the same image, so a rerun supersedes and two images never merge.

    Two records are of one image when they name the same absolute path (the file may have changed:
    the later record supersedes), or the same path as given with the same sha256 (the same bytes
    named from another working folder, or a case folder moved). Two different images that share a
    relative path (other folders, other bytes) stay apart. A record written before ``abs_path`` was
    recorded falls back to its path as given, as it was read then."""

    def __init__(self) -> None:
        self.records: dict[int, dict[str, Any]] = {}  # group -> its latest record, in the order last written
        self._by_abs: dict[str, int] = {}
        self._by_bytes: dict[tuple[str, str], int] = {}
        self._legacy: dict[str, int] = {}  # path -> group, for records without abs_path
        self._by_path: dict[str, int] = {}  # path as given -> the group that last used it
        self._next = 0

    def find(self, path: str, abs_path: str | None, sha: str | None) -> int | None:
        """The group of an image named ``path`` (absolute: ``abs_path``) holding bytes ``sha``, or None."""
        if abs_path is not None and (g := self._by_abs.get(abs_path)) is not None:
            return g
        g = self._by_bytes.get((path, sha)) if sha is not None else None
        if g is not None and self.records[g].get("image_sha256") == sha:
            other = _text(self.records[g].get("abs_path"))
            # the same bytes from another folder are that image moved, unless its old file is still
            # there: then they are two copies, two images (else editing one would supersede the other)
            if abs_path is None or other is None or other == abs_path or not os.path.exists(other):
                return g
        if (g := self._legacy.get(path)) is not None:
            return g
        return self._by_path.get(path) if abs_path is None else None

    def same_path(self, path: str) -> dict[str, Any] | None:
        """The latest record that named ``path`` as given, whichever image it was."""
        g = self._by_path.get(path)
        return None if g is None else self.records[g]

    def add(self, rec: Mapping[str, Any]) -> int:
        """File ``rec`` under its image (it supersedes the image's earlier record); returns the group."""
        path, ab, sha = str(rec.get("path")), _text(rec.get("abs_path")), _text(rec.get("image_sha256"))
        g = self.find(path, ab, sha)
        if g is None:
            g, self._next = self._next, self._next + 1
        if ab is not None:
            self._by_abs[ab] = g
        else:
            self._legacy[path] = g
        if sha is not None:
            self._by_bytes[(path, sha)] = g
        self._by_path[path] = g
        self.records.pop(g, None)
        self.records[g] = dict(rec)
        return g


def resume_index(read: Journal, where: Path, ident: Mapping[str, Any], notice: Callable[[str], None]) -> ImageIndex:
    """The images a resumed run finds in ``read`` (a journal or a run folder's shards at ``where``):
    each reading problem and the stale-records summary go to ``notice``."""
    for problem in read.problems:
        notice(problem)
    index = ImageIndex()
    for rec in read.records:
        index.add(rec)
    stale = stale_notice(where, index.records.values(), ident)
    if stale:
        notice(stale)
    return index


def latest(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The latest record per image (a rerun supersedes; see :class:`ImageIndex`), in the order they
    were last written, keyed by path; a second image under a path already used is keyed by its
    absolute path."""
    index = ImageIndex()
    for r in records:
        index.add(r)
    out: dict[str, dict[str, Any]] = {}
    for rec in index.records.values():
        key = str(rec.get("path"))
        if key in out:
            key = _text(rec.get("abs_path")) or f"{key} (sha256 {rec.get('image_sha256')})"
        while key in out:
            key += "'"
        out[key] = rec
    return out


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        write(fh)
    os.replace(tmp, path)


def write_geojson(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """The ok records with a position as a GeoJSON FeatureCollection (no NaN or Infinity: not JSON)."""
    features = [f for f in map(record_to_feature, records) if f is not None]
    doc = {"type": "FeatureCollection", "features": features}
    _atomic_write(path, lambda fh: fh.write(json.dumps(doc, ensure_ascii=False, allow_nan=False)))


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
    """One journal line. Lone surrogates (undecodable file names) cannot be UTF-8: escape them. NaN and
    Infinity are refused (ValueError): records pass through :func:`clue2geo_sdk.runs.chain.chain` first."""
    try:
        return json.dumps(rec, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(rec, allow_nan=False).encode("ascii") + b"\n"


def check_not_in_use(path: Path) -> None:
    """Raise :class:`ResultsInUseError` now if another run holds ``path``'s lock (a journal or a run
    folder), so a command can refuse before it loads any model; the writer takes the lock itself."""
    if fcntl is None or not (os.path.isfile(path) or os.path.isdir(path)):  # never open a FIFO: it blocks
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # unreadable: the writer says why
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", JournalWarning)
            lock_results(fd, Path(path))
    finally:
        os.close(fd)  # closing the descriptor lets the probe's lock go


def _open_append(path: Path) -> tuple[int, bool]:
    """An append-only descriptor on ``path`` and whether this call created the file."""
    flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666), True
    except FileExistsError:
        return os.open(path, flags), False


def append_durably(fd: int, data: bytes, path: Path) -> None:
    """Append ``data`` to ``fd`` (``path``, opened with O_APPEND) and fsync; on any OSError (a full disk)
    cut the file back to where it ended, so it never keeps part of a line, and raise
    :class:`ResultsWriteError` naming ``path``."""
    start = os.fstat(fd).st_size
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        note = ""
        try:
            os.ftruncate(fd, start)
            os.fsync(fd)
        except OSError:
            note = f"; its last line may be torn: --resume cuts it off (whole records end at byte {start})"
        raise ResultsWriteError(path, exc, note) from None


class RecordWriter:
    """Appends one record at a time to the journal, durably (fsync), each hash-chained to the one before
    it (the journal's last record when appending to an existing one).

    It holds the journal's lock (:func:`lock_results`) from opening to :meth:`close`: a second writer
    on the same file is refused with :class:`ResultsInUseError`. A write that fails (a full disk) is cut
    back off, and raises :class:`ResultsWriteError`."""

    def __init__(self, out: Path, fmt: Format) -> None:
        self.out, self.fmt = Path(out), fmt
        self.path = journal_path(self.out, fmt)
        if self.path.is_dir():
            raise ResultsPathError(
                f"{self.path} is a folder; results go to a file: pass one such as {self.path / 'results.jsonl'} "
                "(a folder is the output of a 'locate --ray' run)"
            )
        if self.path.exists() and not self.path.is_file():  # a FIFO would block the open for ever
            raise ResultsPathError(f"{self.path} is not a regular file (a pipe or a device); results go to a file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self.created = _open_append(self.path)
        except OSError as exc:
            raise ResultsWriteError(self.path, exc) from None
        try:
            lock_results(fd, self.path)
            self._prev = last_link(self.path)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def write(self, rec: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``rec`` with ``prev_hash`` and ``record_hash``; return the record as written."""
        if self._fd is None:
            raise ValueError(f"{self.path}: the writer is closed")
        chained = chain(rec, self._prev)
        append_durably(self._fd, _encode(chained), self.path)
        self._prev = chained["record_hash"]
        return chained

    def discard(self) -> None:
        """Let go of the journal without writing anything (a run refused before its first record): a
        journal this writer created and left empty is removed."""
        if self._fd is None:
            return
        try:
            if self.created and os.fstat(self._fd).st_size == 0:
                self.path.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def close(self, *, quiet: bool = False) -> None:
        """Write the csv/geojson table from the journal (still under the lock), then let the journal go.
        ``quiet``: a table that cannot be written is left as it was rather than raising (the run
        already failed, and that first error is the one to report)."""
        if self._fd is None:
            return
        try:
            if self.fmt != "jsonl":
                try:
                    write_output(self.out, self.fmt, read_journal(self.path).records)
                except OSError as exc:
                    if not quiet:
                        raise ResultsWriteError(self.out, exc) from None
        finally:
            os.close(self._fd)
            self._fd = None


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


@attrs.frozen
class ResumeState:
    """What resuming does with one input: ``done`` (skip it), ``rerun`` (it has a record, made from
    other bytes, settings or with a failure to retry), and a ``notice`` to give, if any."""

    done: bool = False
    rerun: bool = False
    notice: str | None = None


def resume_state(
    index: ImageIndex,
    path: str,
    abs_path: str,
    sha: str | None,
    ident: Mapping[str, Any],
    *,
    retry_failed: bool = False,
) -> ResumeState:
    """Whether the input ``path`` (absolute ``abs_path``, bytes ``sha``) is already done in ``index``:
    its image's latest record has the same sha256 and identity (and is no failure to retry). Says so
    when the path now holds other bytes, or names another image under the same relative path."""
    g = index.find(path, abs_path, sha)
    if g is None:
        other = index.same_path(path)
        if other is None or sha is None or other.get("image_sha256") in (None, sha):
            return ResumeState()
        where = _text(other.get("abs_path")) or "another folder"
        return ResumeState(
            notice=f"{path}: the record under this path is of another image ({where}, sha256 "
            f"{_short(other.get('image_sha256'))}); this one ({abs_path}, sha256 {_short(sha)}) gets its own record"
        )
    old = index.records[g]
    old_sha = _text(old.get("image_sha256"))
    if old_sha != sha:
        changed = None
        if old_sha is not None and sha is not None:
            changed = (
                f"{path}: the file now holds other bytes than when it was recorded (sha256 {_short(old_sha)} then, "
                f"{_short(sha)} now); it runs again and its new record supersedes the old one"
            )
        return ResumeState(rerun=True, notice=changed)
    same = all(old.get(k) == ident[k] for k in IDENTITY_FIELDS)
    if same and not (retry_failed and old.get("status") == "error"):
        return ResumeState(done=True)
    return ResumeState(rerun=True)


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

    ``resume`` skips an input whose image's latest record (:class:`ImageIndex`: same absolute path, or
    same path as given with the same sha256) has the same sha256, bundle, options and SDK version;
    ``retry_failed`` also runs again those whose latest record is an error. Notices go to ``on_notice``
    (default: a :class:`JournalWarning`).

    Raises :class:`ResultsInUseError` when another run writes ``out``, :class:`ResultsPathError` when it
    is a folder, :class:`ResultsExistError` (a ``FileExistsError``) when it holds results and ``resume`` is off, and
    :class:`ResultsWriteError` when a record cannot be written (the journal keeps whole records)."""
    opts = options or geo.options
    ident = identity(geo, opts)
    out = Path(out)
    if out.is_dir():
        raise ResultsPathError(
            f"--out {out} is a folder; results go to a file: pass one such as {out / 'results.jsonl'} "
            "(a folder is the output of a 'locate --ray' run)"
        )
    journal = journal_path(out, fmt)
    summary = BatchSummary()

    def notice(msg: str) -> None:
        summary.notices.append(msg)
        if on_notice:
            on_notice(msg)
        else:
            warnings.warn(msg, JournalWarning, stacklevel=3)

    writer = RecordWriter(out, fmt)  # the journal's lock, held to the end: a second writer stops here
    try:
        has_journal = journal.stat().st_size > 0
        if not resume and has_journal:
            raise ResultsExistError(f"{out} already holds results; pass resume=True (--resume) or choose another file")
        if out != journal and not has_journal and out.exists() and out.stat().st_size > 0:
            raise ResultsExistError(
                f"{out} exists and is not a clue2geo run (no {journal.name} beside it); choose another file"
            )
        index = ImageIndex()
        if resume:
            try:
                read = read_journal(journal, repair=True)
            except OSError as exc:
                raise ResultsWriteError(journal, exc) from None
            index = resume_index(read, journal, ident, notice)
    except BaseException:
        writer.discard()
        raise

    def todo() -> Iterator[tuple[Path | Failure, str, str, str | None, bytes | None]]:
        """Inputs that need a record, read here in input order; skips are counted as they pass."""
        for item in inputs:
            data = None if isinstance(item, Failure) else read_input_bytes(item)
            path, sha = (item.image, None) if isinstance(item, Failure) else (str(item), sha256_of(data))
            ab = absolute(path)
            state = resume_state(index, path, ab, sha, ident, retry_failed=retry_failed)
            if state.notice:
                notice(state.notice)
            if state.done:
                summary.skipped += 1
                if on_record:
                    on_record({"path": path, "status": "skipped"})
                continue
            summary.rerun += state.rerun
            yield item, path, ab, sha, data

    def work(task: tuple[Path | Failure, str, str, str | None, bytes | None]) -> dict[str, Any]:
        item, path, ab, sha, data = task
        t0, started = time.perf_counter(), utc_now()
        if isinstance(item, Failure):
            result: Prediction | Failure = item
        else:  # the bytes read for the digest are the ones decoded; unreadable paths report why
            result = geo.try_locate(data if data is not None else item, name=str(item), options=opts)
            if isinstance(result, Failure):
                result = attrs.evolve(result, image_sha256=sha)
        seconds, finished = time.perf_counter() - t0, utc_now()
        return record_of(result, path, seconds, ident, started_utc=started, finished_utc=finished, abs_path=ab)

    finished = False
    try:  # up to in_flight images in the engine at once; records are written in input order
        for rec in geo.map_in_flight(work, todo(), in_flight=in_flight):
            rec = writer.write(rec)
            index.add(rec)
            if rec["status"] == "ok":
                summary.ok += 1
            else:
                summary.error += 1
            if on_record:
                on_record(rec)
        finished = True
    finally:
        writer.close(quiet=not finished)
    return summary
