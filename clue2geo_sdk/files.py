"""Files in and out, done once for the whole package.

In: refuse anything but a regular file before opening it. Opening a FIFO blocks until a writer comes
(for ever, in a batch job), and a device can be endless; ``stat`` tells both apart from a file without
opening anything. Out: one all-or-nothing write (:func:`atomic_write`) and one fsync, so every file the
SDK publishes is whole on disk before its name appears. And the sha256 of a file, read in chunks.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import Clue2GeoError


class InputFileError(Clue2GeoError, ValueError):
    """A file the user named is missing, not a regular file, or unreadable; the message names it."""


def regular_file(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` if it is a regular file (symlinks followed), else an :class:`InputFileError` that
    names ``what`` (e.g. "trusted key"), the path and what it is instead. Nothing is opened."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputFileError(f"{what} {p}: no such file") from None
    except OSError as exc:
        raise InputFileError(f"{what} {p}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputFileError(f"{what} {p}: is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a device, socket or other special file"
        raise InputFileError(f"{what} {p}: is {kind}, not a regular file; refusing to open it")
    return p


def read_regular_bytes(path: str | os.PathLike[str], what: str, *, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file (see :func:`regular_file`), refused past ``max_bytes``."""
    p = regular_file(path, what)
    try:
        with open(p, "rb") as fh:
            data = fh.read(-1 if max_bytes is None else max_bytes + 1)
    except OSError as exc:
        raise InputFileError(f"{what} {p}: cannot be read ({exc.strerror or exc})") from None
    if max_bytes is not None and len(data) > max_bytes:
        raise InputFileError(f"{what} {p}: larger than {max_bytes} bytes")
    return data


_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's or folder's data to disk, so a rename after it cannot publish a name whose bytes
    a power cut would lose. Filesystems that cannot fsync (or a path gone meanwhile) are let be."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str],
    content: str | bytes | Callable[[IO[Any]], None],
    *,
    text: bool = True,
) -> None:
    """Write ``path`` all or nothing: into ``NAME.tmp`` beside it, fsync'd, then renamed over it.

    ``content`` is the text or bytes, or a function that writes to the open file (``text`` picks the
    file's mode then: UTF-8 text without newline translation, or binary). A failure removes the
    temporary file and leaves any previous ``path`` as it was."""
    dest = Path(path)
    tmp = dest.with_name(dest.name + ".tmp")
    binary = isinstance(content, bytes) or (callable(content) and not text)
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8", newline="") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(dest.parent)
