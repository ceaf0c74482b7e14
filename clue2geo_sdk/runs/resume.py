"""Which records are of the same image, and what resuming does with each input.

``resume`` reuses a record only when the image (its sha256 and its path: absolute, or as given) and
what made the record (:data:`~clue2geo_sdk.runs.records.IDENTITY_FIELDS`) all match; otherwise the
input runs again and the new record supersedes: readers take the latest record per image
(:func:`latest_records`, a :class:`~clue2geo_sdk.runs.records.Record` each; :func:`latest`, their
dicts), so a rerun replaces a result and two images never merge.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .records import Journal, Record


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _short(value: Any) -> str:
    return "unrecorded" if value in (None, "") else str(value)[:12]


class ImageIndex:
    """Which records are of the same image, so a rerun supersedes and two images never merge.

    Two records are of one image when they name the same absolute path (the file may have changed:
    the later record supersedes), or the same path as given with the same sha256 (the same bytes
    named from another working folder, or a case folder moved). Two different images that share a
    relative path (other folders, other bytes) stay apart. A record written before ``abs_path`` was
    recorded falls back to its path as given, as it was read then."""

    def __init__(self) -> None:
        self.records: dict[int, Record] = {}  # group -> its latest record, in the order last written
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
        if g is not None and self.records[g].image_sha256 == sha:
            other = _text(self.records[g].abs_path)
            # the same bytes from another folder are that image moved, unless its old file is still
            # there: then they are two copies, two images (else editing one would supersede the other)
            if abs_path is None or other is None or other == abs_path or not os.path.exists(other):
                return g
        if (g := self._legacy.get(path)) is not None:
            return g
        return self._by_path.get(path) if abs_path is None else None

    def same_path(self, path: str) -> Record | None:
        """The latest record that named ``path`` as given, whichever image it was."""
        g = self._by_path.get(path)
        return None if g is None else self.records[g]

    def add(self, rec: Record) -> int:
        """File ``rec`` under its image (it supersedes the image's earlier record); returns the group."""
        path, ab, sha = str(rec.path), _text(rec.abs_path), _text(rec.image_sha256)
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
        self.records[g] = rec
        return g


def resume_index(read: Journal, where: Path, ident: Mapping[str, Any], notice: Callable[[str], None]) -> ImageIndex:
    """The images a resumed run finds in ``read`` (a journal or a run folder's shards at ``where``):
    each reading problem and the stale-records summary go to ``notice``."""
    for problem in read.problems:
        notice(problem)
    index = ImageIndex()
    for rec in read.records:
        index.add(Record.from_dict(rec, strict=False))
    stale = stale_notice(where, index.records.values(), ident)
    if stale:
        notice(stale)
    return index


def latest_records(records: Iterable[Record | Mapping[str, Any]]) -> dict[str, Record]:
    """The latest record per image (a rerun supersedes; see :class:`ImageIndex`), in the order they
    were last written, keyed by path; a second image under a path already used is keyed by its
    absolute path."""
    index = ImageIndex()
    for r in records:
        index.add(Record.of(r))
    out: dict[str, Record] = {}
    for rec in index.records.values():
        key = str(rec.path)
        if key in out:
            key = _text(rec.abs_path) or f"{key} (sha256 {rec.image_sha256})"
        while key in out:
            key += "'"
        out[key] = rec
    return out


def latest(records: Iterable[Record | Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """:func:`latest_records` as the records' dicts (as read)."""
    return {key: rec.to_dict() for key, rec in latest_records(records).items()}


def stale_notice(journal: Path, records: Iterable[Record], ident: Mapping[str, Any]) -> str | None:
    """One line saying how many records were made by another bundle, options or SDK, or None."""
    labels = {
        "bundle_digest": "bundle",
        "options_digest": "options",
        "gallery_digest": "reference gallery",
        "sdk_version": "clue2geo version",
    }
    n, parts = 0, {}
    for r in records:
        made_by = r.identity
        differ = [k for k in labels if made_by[k] != ident[k]]
        n += bool(differ)
        for k in differ:
            parts.setdefault(k, made_by[k])
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
        if other is None or sha is None or other.image_sha256 in (None, sha):
            return ResumeState()
        where = _text(other.abs_path) or "another folder"
        return ResumeState(
            notice=f"{path}: the record under this path is of another image ({where}, sha256 "
            f"{_short(other.image_sha256)}); this one ({abs_path}, sha256 {_short(sha)}) gets its own record"
        )
    old = index.records[g]
    old_sha = _text(old.image_sha256)
    if old_sha != sha:
        changed = None
        if old_sha is not None and sha is not None:
            changed = (
                f"{path}: the file now holds other bytes than when it was recorded (sha256 {_short(old_sha)} then, "
                f"{_short(sha)} now); it runs again and its new record supersedes the old one"
            )
        return ResumeState(rerun=True, notice=changed)
    if old.made_under(ident) and not (retry_failed and old.status == "error"):
        return ResumeState(done=True)
    return ResumeState(rerun=True)
