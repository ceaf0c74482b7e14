"""Batch runs that an analyst can trust: every input accounted for, nothing lost on interruption.

:func:`run_batch` geolocates every input into one results file. Each result is one *record*
(:mod:`clue2geo_sdk.runs.records`, ``status`` "ok" or "error"), appended durably and hash-chained to
the journal (:mod:`clue2geo_sdk.runs.journal`) in input order while up to ``in_flight`` images share
the engine; ``resume`` skips what is already done under the same identity
(:mod:`clue2geo_sdk.runs.resume`), and a csv or geojson output is written from the journal when the
run ends (:mod:`clue2geo_sdk.runs.formats`).
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs

from ..geolocator import Geolocator
from ..inputs.discover import read_input_bytes, sha256_of
from ..options import Options
from ..results import Failure, Prediction
from .formats import Format
from .journal import (
    JournalWarning,
    RecordWriter,
    ResultsExistError,
    ResultsPathError,
    ResultsWriteError,
    journal_path,
    read_journal,
)
from .records import Record, absolute, identity, input_digests, record_of, utc_now
from .resume import ImageIndex, resume_index, resume_state

_Task = tuple[Path | Failure, str, str, str | None, bytes | None]  # input, path, absolute path, sha256, bytes


@attrs.define
class BatchSummary:
    """Counts of a run and the notices it gave (journal problems, records made by something else)."""

    ok: int = 0
    error: int = 0
    skipped: int = 0
    rerun: int = 0
    notices: list[str] = attrs.field(factory=list)


def _notifier(summary: BatchSummary, on_notice: Callable[[str], None] | None) -> Callable[[str], None]:
    """Where a run's notices go: kept in ``summary``, and given to ``on_notice`` (default: a
    :class:`JournalWarning`)."""

    def notice(msg: str) -> None:
        summary.notices.append(msg)
        if on_notice:
            on_notice(msg)
        else:
            warnings.warn(msg, JournalWarning, stacklevel=3)

    return notice


def _open_run(
    out: Path, fmt: Format, resume: bool, ident: Mapping[str, Any], notice: Callable[[str], None]
) -> tuple[RecordWriter, ImageIndex]:
    """Take the journal (its lock is held to the end of the run: a second writer stops here), refuse
    results already there unless resuming, and index the records a resumed run finds."""
    journal = journal_path(out, fmt)
    writer = RecordWriter(out, fmt)
    try:
        has_journal = journal.stat().st_size > 0
        if not resume and has_journal:
            raise ResultsExistError(f"{out} already holds results; pass resume=True (--resume) or choose another file")
        if out != journal and not has_journal and out.exists() and out.stat().st_size > 0:
            raise ResultsExistError(
                f"{out} exists and is not a clue2geo run (no {journal.name} beside it); choose another file"
            )
        if not resume:
            return writer, ImageIndex()
        try:
            read = read_journal(journal, repair=True)
        except OSError as exc:
            raise ResultsWriteError(journal, exc) from None
        return writer, resume_index(read, journal, ident, notice)
    except BaseException:
        writer.discard()
        raise


def _pending(
    inputs: Iterable[Path | Failure],
    index: ImageIndex,
    ident: Mapping[str, Any],
    *,
    retry_failed: bool,
    summary: BatchSummary,
    notice: Callable[[str], None],
    on_record: Callable[[dict[str, Any]], None] | None,
) -> Iterator[_Task]:
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


def _locate_one(
    geo: Geolocator, opts: Options, ident: Mapping[str, Any], hashes: Collection[str], task: _Task
) -> dict[str, Any]:
    """One input's record: the failure its listing gave, or the image located from the bytes read for
    its digest (those are the ones decoded, and the ones ``hashes`` are computed over: one read for
    every digest; an unreadable path reports why)."""
    item, path, ab, sha, data = task
    digests = input_digests(data, hashes)
    t0, started = time.perf_counter(), utc_now()
    if isinstance(item, Failure):
        result: Prediction | Failure = item
    else:
        result = geo.try_locate(data if data is not None else item, name=str(item), options=opts)
        if isinstance(result, Failure):
            result = attrs.evolve(result, image_sha256=sha)
    seconds, finished = time.perf_counter() - t0, utc_now()
    return record_of(
        result, path, seconds, ident, started_utc=started, finished_utc=finished, abs_path=ab, digests=digests
    )


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
    hashes: Collection[str] = (),
) -> BatchSummary:
    """Geolocate every input into ``out`` under ``options`` (default: the geolocator's own), up to
    ``in_flight`` images at once (default: the geolocator's ``max_in_flight``).

    ``resume`` skips an input whose image's latest record (:class:`ImageIndex`: same absolute path, or
    same path as given with the same sha256) has the same sha256, bundle, options and SDK version;
    ``retry_failed`` also runs again those whose latest record is an error. Notices go to ``on_notice``
    (default: a :class:`JournalWarning`). ``hashes``: digests recorded besides the sha256
    (:data:`~clue2geo_sdk.runs.records.EXTRA_HASHES`, e.g. "sha3-512" as ``image_sha3_512``) for each
    input located in this run (a record a resume skips keeps what it holds); ValueError for an unknown one.

    Raises :class:`ResultsInUseError` when another run writes ``out``, :class:`ResultsPathError` when it
    is a folder, :class:`ResultsExistError` (a ``FileExistsError``) when it holds results and ``resume`` is off, and
    :class:`ResultsWriteError` when a record cannot be written (the journal keeps whole records)."""
    opts = options or geo.options
    input_digests(None, hashes)  # an unknown hash name is refused before anything is written
    ident = identity(geo, opts)
    out = Path(out)
    if out.is_dir():
        raise ResultsPathError(
            f"--out {out} is a folder; results go to a file: pass one such as {out / 'results.jsonl'} "
            "(a folder is the output of a 'locate --ray' run)"
        )
    summary = BatchSummary()
    notice = _notifier(summary, on_notice)
    writer, index = _open_run(out, fmt, resume, ident, notice)
    tasks = _pending(
        inputs, index, ident, retry_failed=retry_failed, summary=summary, notice=notice, on_record=on_record
    )
    work = functools.partial(_locate_one, geo, opts, ident, tuple(hashes))
    finished = False
    try:  # up to in_flight images in the engine at once; records are written in input order
        for rec in geo.map_in_flight(work, tasks, in_flight=in_flight):
            rec = writer.write(rec)
            written = Record.from_dict(rec, strict=False)  # lenient: a NaN position was written as null
            index.add(written)
            if written.ok:
                summary.ok += 1
            else:
                summary.error += 1
            if on_record:
                on_record(rec)
        finished = True
    finally:
        writer.close(quiet=not finished)
    return summary
