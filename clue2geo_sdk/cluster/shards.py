"""Result shards of a cluster run and their merge. Reading needs no Ray; sealing writes Parquet (pyarrow).

A run folder ``DIR`` holds ``DIR/shards/part-<run>-<seq>.jsonl``: the same records, one JSON object
per line, as the single-machine journal (:mod:`clue2geo_sdk.batch`), appended and fsynced by the
driver as results arrive, so a driver stopped at any moment loses nothing. A shard is *sealed* when
full (or at the end of the run): its Parquet twin ``part-<run>-<seq>.parquet`` is written beside it
(atomically), with the key columns and the whole record as JSON. The JSONL shards are the truth; a
Parquet twin is derived and rewritten when missing. ``<run>`` is the driver's UTC start time, so
shard names sort in the order they were written.

Merging takes every shard in name order, then the latest record per path (a rerun supersedes, as in
:func:`clue2geo_sdk.batch.latest`), sorted by path: one record per input. A record that a retried
task made twice carries the same (path, image_sha256, bundle_digest, options_digest) key and the
driver writes it once; the merge would keep one of them even if both were written.

Chain of custody (:mod:`clue2geo_sdk.audit`): the driver is the only writer, so the records of all the
shards of a folder, in name order, form one hash chain, as a single-machine journal does; a resumed
run continues it. :func:`verify_run` checks it (``clue2geo audit verify DIR``). A merged file is a new
journal (one record per input, sorted), chained afresh from the genesis.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from ..audit import GENESIS, AuditResult, chain, last_link, verify_journal
from ..batch import Format, Journal, _encode, latest, read_journal, write_csv, write_geojson

SHARDS = "shards"
MERGED = "results.jsonl"
KEY_FIELDS = ("path", "image_sha256", "bundle_digest", "options_digest")
PARQUET_COLUMNS = (
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


def record_key(rec: Mapping[str, Any]) -> tuple[Any, ...]:
    """What identifies one input's result: the same key twice is the same work done twice."""
    return tuple(rec.get(k) for k in KEY_FIELDS)


def shard_dir(out: Path) -> Path:
    return Path(out) / SHARDS


def is_run_dir(path: Path) -> bool:
    """True for a cluster run's output folder (it holds ``shards/``)."""
    return Path(path).is_dir() and shard_dir(path).is_dir()


def shard_files(out: Path) -> list[Path]:
    """The JSONL shards of a run folder, in the order they were written."""
    folder = shard_dir(out)
    return sorted(folder.glob("part-*.jsonl")) if folder.is_dir() else []


def read_shards(out: Path, *, repair: bool = False) -> Journal:
    """Every record of every shard, in write order, and each problem (torn or unreadable lines, with
    the shard and line number). ``repair`` cuts a torn last line off its shard (a killed driver)."""
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    for path in shard_files(out):
        j = read_journal(path, repair=repair)
        records.extend(j.records)
        problems.extend(j.problems)
    return Journal(records, problems)


def merge(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per input: the latest per path, sorted by path (deterministic whatever the
    order in which the cluster finished them)."""
    return sorted(latest(records).values(), key=lambda r: str(r.get("path")))


def merged_records(out: Path) -> Journal:
    """The merged records of a run folder (one per input) and the problems met reading its shards."""
    j = read_shards(out)
    return Journal(merge(j.records), j.problems)


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Records as a new JSONL journal, hash-chained from the genesis in this order, written beside and
    renamed over ``path`` (never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    prev = GENESIS
    with open(tmp, "wb") as fh:
        for rec in records:
            linked = chain(rec, prev)
            prev = linked["record_hash"]
            fh.write(_encode(linked))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = read_journal(shard).records
    cols: dict[str, list[Any]] = {name: [] for name, _ in PARQUET_COLUMNS}
    for r in recs:
        for name, _ in PARQUET_COLUMNS:
            if name == "record":
                cols[name].append(_encode(r).decode("utf-8", "surrogateescape").rstrip("\n"))
            else:
                cols[name].append(r.get(name))
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in PARQUET_COLUMNS])
    table = pa.table(cols, schema=schema)
    dest = parquet_twin(shard)
    tmp = dest.with_name(dest.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, dest)
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
        self._prev = last_link(existing[-1]) if existing else GENESIS  # a resumed run continues the chain
        self.run = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + f"-{os.getpid()}"
        self.records_per_shard = max(1, int(records_per_shard))
        self.parquet = parquet
        self.written: list[Path] = []
        self._seq = 0
        self._fh: Any = None
        self._n = 0

    def _open(self) -> None:
        path = self.folder / f"part-{self.run}-{self._seq:05d}.jsonl"
        self._seq += 1
        self._fh = open(path, "ab")
        self._n = 0
        self.written.append(path)

    def write(self, records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Append records durably, each hash-chained to the one before; one fsync per call (call it per
        batch of results). Returns the records as written."""
        written = []
        for rec in records:
            if self._fh is None:
                self._open()
            linked = chain(rec, self._prev)
            self._fh.write(_encode(linked))
            self._prev = linked["record_hash"]
            written.append(linked)
            self._n += 1
            if self._n >= self.records_per_shard:
                self._seal()
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
        return written

    def _seal(self) -> None:
        fh, self._fh = self._fh, None
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        if self.parquet:
            write_parquet_twin(Path(fh.name))

    def close(self) -> None:
        if self._fh is not None:
            self._seal()
