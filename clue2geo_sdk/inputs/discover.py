"""Paths to inputs: folders expanded into image files (symlink loops and unreadable folders become
Failures), and each file's bytes read once to hash and decode."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import ImageLoadError
from ..results import Failure
from .image import read_image_file

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".hif"}
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


def read_input_bytes(path: Path) -> bytes | None:
    """The bytes to hash and decode, or None (unreadable, not a file, over the size cap: checked from
    ``stat`` before reading); the locator then reads the path itself and records why it failed."""
    try:
        return read_image_file(path)
    except ImageLoadError:
        return None


def sha256_of(data: bytes | None) -> str | None:
    """The sha256 of bytes read by :func:`read_input_bytes`, or None when they could not be read."""
    return hashlib.sha256(data).hexdigest() if data is not None else None
