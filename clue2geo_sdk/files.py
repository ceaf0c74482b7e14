"""Reading files a user names: refuse anything but a regular file before opening it.

Opening a FIFO blocks until a writer comes (for ever, in a batch job), and a device can be endless;
``stat`` tells both apart from a file without opening anything.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

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
