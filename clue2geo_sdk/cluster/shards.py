"""Result shards of a cluster run and their merge. Reading needs no Ray; sealing writes Parquet (pyarrow).

A run folder ``DIR`` holds ``DIR/shards/part-<seq>-<run>.jsonl``: the same records, one JSON object
per line, as the single-machine journal (:mod:`clue2geo_sdk.runs.journal`), appended and fsynced by the
driver as results arrive, so a driver stopped at any moment loses nothing. A shard is *sealed* when
full (or at the end of the run): its Parquet twin ``part-<seq>-<run>.parquet`` is written beside it
(atomically), with the key columns and the whole record as JSON. The JSONL shards are the truth; a
Parquet twin is derived and rewritten when missing. ``<seq>`` numbers the shards of a folder across
runs (a resumed run goes on from the highest), and orders them: never a clock, which can go back.
``<run>`` (the driver's UTC start time and pid) only says which run wrote it. Shards named by an
earlier version, ``part-<run>-<n>.jsonl``, come first, in name order.

One driver per folder: it holds an advisory lock on ``DIR`` for the whole run (:func:`lock_run`);
a second one is refused.

Merging takes every shard in name order, then the latest record per path (a rerun supersedes, as in
:func:`clue2geo_sdk.runs.resume.latest`), sorted by path: one record per input. A record that a retried
task made twice carries the same (path, image_sha256, bundle_digest, options_digest) key and the
driver writes it once; the merge would keep one of them even if both were written.

Chain of custody (:mod:`clue2geo_sdk.runs.chain`): the driver is the only writer, so the records of all the
shards of a folder, in name order, form one hash chain, as a single-machine journal does; a resumed
run continues it. :func:`verify_run` checks it (``clue2geo audit verify DIR``). A merged file is a new
journal (one record per input, sorted), chained afresh from the genesis.
"""

from __future__ import annotations

import operator
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import attrs

from ..files import atomic_write, fsync_path
from ..runs.chain import GENESIS, AuditResult, chain, last_link, verify_journal
from ..runs.formats import Format, write_csv, write_geojson
from ..runs.journal import ResultsWriteError, append_durably, encode_record, lock_results, read_journal
from ..runs.records import Journal, Record, record_keys
from ..runs.resume import latest_records

SHARDS = "shards"
MERGED = "results.jsonl"
KEY_FIELDS = record_keys("path", "image_sha256", "bundle_digest", "options_digest")
PARQUET_COLUMNS = (  # record keys, and the whole record as JSON
    ("path", "string"),
    ("status", "string"),
    ("image_sha256", "string"),
    ("bundle_digest", "string"),
    ("options_digest", "string"),
    ("sdk_version", "string"),
    ("demo", "bool_"),
    ("lat", "float64"),
    ("lon", "float64"),
    ("country", "string"),
    ("city", "string"),
    ("confidence", "float64"),
    ("error", "string"),
    ("record", "string"),
)


_PARQUET_KEYS = record_keys(*(name for name, _ in PARQUET_COLUMNS if name != "record"))
_key_of = operator.attrgetter(*KEY_FIELDS)
_parquet_values = operator.attrgetter(*_PARQUET_KEYS)


def record_key(rec: Record) -> tuple[Any, ...]:
    """What identifies one input's result: the same key twice is the same work done twice."""
    return tuple(_key_of(rec))


def shard_dir(out: Path) -> Path:
    return Path(out) / SHARDS


def is_run_dir(path: Path) -> bool:
    """True for a cluster run's output folder (it holds ``shards/``)."""
    return Path(path).is_dir() and shard_dir(path).is_dir()


_SEQ_NAME = re.compile(r"^part-(\d+)-")  # part-<seq>-<run>.jsonl; old names: part-<YYYYMMDD>T...


def shard_seq(shard: Path) -> int | None:
    """A shard's sequence number, or None for a shard named by an earlier version (by clock)."""
    m = _SEQ_NAME.match(shard.name)
    return int(m.group(1)) if m else None


def _order(shard: Path) -> tuple[int, int, str]:
    seq = shard_seq(shard)
    return (0, 0, shard.name) if seq is None else (1, seq, shard.name)


def shard_files(out: Path) -> list[Path]:
    """The JSONL shards of a run folder, in the order they were written (by sequence number)."""
    folder = shard_dir(out)
    return sorted(folder.glob("part-*.jsonl"), key=_order) if folder.is_dir() else []


def lock_run(out: Path) -> int:
    """Create the run folder ``out`` if need be and take its lock (:func:`clue2geo_sdk.runs.journal.lock_results`):
    a descriptor to close when the run ends; :class:`~clue2geo_sdk.runs.journal.ResultsInUseError` when another
    driver holds it."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ResultsWriteError(out, exc) from None
    try:
        lock_results(fd, out)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_shards(out: Path, *, repair: bool = False) -> Journal:
    """Every record of every shard, in write order, and each problem (torn or unreadable lines, with
    the shard and line number). ``repair`` cuts a torn last line off its shard (a killed driver)."""
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    where: list[str] = []
    for path in shard_files(out):
        j = read_journal(path, repair=repair)
        records.extend(j.records)
        problems.extend(j.problems)
        where.extend(j.where)
    return Journal(records, problems, where)


def merge(records: Iterable[Record | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per input: the latest per image (:func:`clue2geo_sdk.runs.resume.latest_records`), sorted
    by path (deterministic whatever the order in which the cluster finished them); each as its dict."""
    kept = sorted(latest_records(records).values(), key=lambda r: (str(r.path), str(r.abs_path)))
    return [r.to_dict() for r in kept]


def merged_records(out: Path) -> Journal:
    """The merged records of a run folder (one per input) and the problems met reading its shards."""
    j = read_shards(out)
    return Journal(merge(j.records), j.problems)


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Records as a new JSONL journal, hash-chained from the genesis in this order, written beside and
    renamed over ``path`` (never half a file)."""

    def write(fh: IO[bytes]) -> None:
        prev = GENESIS
        for rec in records:
            linked = chain(rec, prev)
            prev = linked["record_hash"]
            fh.write(encode_record(linked))

    atomic_write(path, write, text=False)


def write_merged(out: Path, dest: Path | None = None, fmt: Format | None = None) -> tuple[Path, Journal]:
    """Merge a run folder's shards into ``dest`` (default ``out/results.jsonl``) as jsonl, csv or geojson
    (default: from the suffix)."""
    dest = dest or Path(out) / MERGED
    fmt = fmt or {".csv": "csv", ".geojson": "geojson"}.get(dest.suffix.lower(), "jsonl")  # type: ignore[assignment]
    j = merged_records(out)
    if fmt == "csv":
        write_csv(dest, j.records)
    elif fmt == "geojson":
        write_geojson(dest, j.records)
    else:
        write_jsonl(dest, j.records)
    return dest, j


def verify_run(out: Path, *, anchor: str | None = None) -> AuditResult:
    """Check the hash chain through every shard of a run folder, in write order; a bad line is named
    by its shard and its line number there."""
    files = shard_files(out)
    if not files:
        return AuditResult(path=Path(out), ok=False, records=0, reason="no shards")
    spans: list[tuple[Path, int, int]] = []  # shard, lines before it, its lines (a torn tail counts)
    parts, before = [], 0
    for f in files:
        data = f.read_bytes()
        torn = bool(data) and not data.endswith(b"\n")
        lines = data.count(b"\n") + torn
        spans.append((f, before, lines))
        before += lines
        parts.append(data + b"\n" if torn and f != files[-1] else data)  # a torn line stays a bad line
    with tempfile.TemporaryDirectory() as tmp:
        joined = Path(tmp) / "chain.jsonl"
        joined.write_bytes(b"".join(parts))
        res = verify_journal(joined, anchor=anchor)
    if res.bad_line is None:
        return attrs.evolve(res, path=Path(out))
    for f, first, lines in spans:
        if res.bad_line <= first + lines:
            return attrs.evolve(res, path=f, bad_line=res.bad_line - first)
    return attrs.evolve(res, path=files[-1])


def parquet_twin(shard: Path) -> Path:
    return shard.with_suffix(".parquet")


def write_parquet_twin(shard: Path) -> Path:
    """Write ``shard``'s Parquet twin: key columns for queries and ``record``, the full record as JSON."""
    import pyarrow as pa  # the cluster extra (with ray[data]): reading and merging shards needs none of it
    import pyarrow.parquet as pq  # the cluster extra, as above

    cols: dict[str, list[Any]] = {name: [] for name, _ in PARQUET_COLUMNS}
    for line in read_journal(shard).records:
        for name, value in zip(_PARQUET_KEYS, _parquet_values(Record.from_dict(line, strict=False)), strict=True):
            cols[name].append(value)
        cols["record"].append(encode_record(line).decode("utf-8", "surrogateescape").rstrip("\n"))
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in PARQUET_COLUMNS])
    table = pa.table(cols, schema=schema)
    dest = parquet_twin(shard)
    tmp = dest.with_name(dest.name + ".tmp")
    pq.write_table(table, tmp)  # pyarrow writes by path: fsync it before the rename publishes it
    fsync_path(tmp)
    os.replace(tmp, dest)
    fsync_path(dest.parent)
    return dest


def seal_all(out: Path) -> list[Path]:
    """Write the Parquet twin of every JSONL shard that lacks one (the open shard of a stopped driver)."""
    return [write_parquet_twin(s) for s in shard_files(out) if not parquet_twin(s).exists()]


class ShardWriter:
    """The driver's writer: appends records to the open JSONL shard (flush + fsync per call), seals
    it (Parquet twin) after ``records_per_shard`` records and opens the next."""

    def __init__(self, out: Path, *, records_per_shard: int = 1000, parquet: bool = True) -> None:
        self.folder = shard_dir(out)
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = shard_files(out)
        self._prev = GENESIS  # a resumed run continues the chain from the last shard holding a record
        for shard in reversed(existing):  # (a driver stopped before its first flush left an empty one)
            if (link := last_link(shard)) != GENESIS:
                self._prev = link
                break
        self.run = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + f"-{os.getpid()}"
        self.records_per_shard = max(1, int(records_per_shard))
        self.parquet = parquet
        self.written: list[Path] = []
        self._seq = 1 + max((q for q in map(shard_seq, existing) if q is not None), default=-1)
        self._fh: Any = None
        self._n = 0

    def _open(self) -> None:
        path = self.folder / f"part-{self._seq:08d}-{self.run}.jsonl"
        self._seq += 1
        self._fh = open(path, "ab", buffering=0)
        self._n = 0
        self.written.append(path)

    def write(self, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Append records durably, each hash-chained to the one before; one fsync per call (call it per
        batch of results). Returns the records as written."""
        written: list[dict[str, Any]] = []
        lines: list[bytes] = []
        for rec in records:
            if self._fh is None:
                self._open()
            linked = chain(rec, self._prev)
            lines.append(encode_record(linked))
            self._prev = linked["record_hash"]
            written.append(linked)
            self._n += 1
            if self._n >= self.records_per_shard:
                self._flush(lines)
                self._seal()
        self._flush(lines)
        return written

    def _flush(self, lines: list[bytes]) -> None:
        """Append ``lines`` to the open shard and fsync; a failed write (a full disk) is cut back off
        the shard and raises :class:`~clue2geo_sdk.runs.journal.ResultsWriteError`."""
        if lines and self._fh is not None:
            append_durably(self._fh.fileno(), b"".join(lines), Path(self._fh.name))
        lines.clear()

    def _seal(self) -> None:
        fh, self._fh = self._fh, None
        fh.close()
        if self.parquet:
            try:
                write_parquet_twin(Path(fh.name))
            except OSError as exc:
                raise ResultsWriteError(parquet_twin(Path(fh.name)), exc) from None

    def close(self, *, quiet: bool = False) -> None:
        """Seal the open shard. ``quiet``: a seal that fails is left for the next run's
        :func:`seal_all` (the run already failed, and that first error is the one to report)."""
        if self._fh is not None:
            try:
                self._seal()
            except OSError:  # ResultsWriteError included
                if not quiet:
                    raise
