"""The JSONL journal: records read, appended durably and locked, so nothing is lost or interleaved.

Each result is one record, appended to a JSONL *journal* and flushed and fsynced before the next
image starts. The journal is the output itself for ``jsonl``; for ``csv`` and ``geojson`` it is
``OUT.records.jsonl`` beside it, and OUT is written from it when the run ends.

The journal holds one JSON object per ``\\n``-terminated line and is split on the byte ``\\n`` only,
so no string (U+2028, U+0085, NUL, ...) can cut a record. A torn last line (a run killed
mid-write) and any unreadable line are reported with their line numbers, never dropped silently;
``resume`` cuts the torn line off.

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

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import Clue2GeoError
from .chain import chain, last_link
from .formats import Format, write_output
from .records import Journal

try:  # advisory locks: POSIX only; elsewhere a run is not guarded against a second writer
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


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


def journal_path(out: Path, fmt: Format) -> Path:
    """Where records are appended: the output itself for jsonl; a sidecar JSONL for csv and geojson."""
    return out if fmt == "jsonl" else out.with_name(out.name + ".records.jsonl")


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


def encode_record(rec: Mapping[str, Any]) -> bytes:
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
        append_durably(self._fd, encode_record(chained), self.path)
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
