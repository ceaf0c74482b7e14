"""A bounds-checked reader of TIFF-structured blocks (an EXIF block, or a TIFF file itself).

Every offset, count and field type is checked against the block before it is read: a broken IFD is
named in ``problems`` and read as far as it is sound, never trusted past its end (untrusted input).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import attrs

from ...sanitize import clean_text

MAX_IFD_ENTRIES = 1000

# TIFF field types: (bytes per value, struct code); codes for rationals read two values each.
TYPES: dict[int, tuple[int, str]] = {
    1: (1, "B"),
    2: (1, "B"),
    3: (2, "H"),
    4: (4, "L"),
    5: (8, "L"),
    6: (1, "b"),
    7: (1, "B"),
    8: (2, "h"),
    9: (4, "l"),
    10: (8, "l"),
    11: (4, "f"),
    12: (8, "d"),
}


@attrs.frozen
class Entry:
    """One IFD entry: its field type, value count and raw value bytes."""

    type: int
    count: int
    raw: bytes


class Tiff:
    """A bounds-checked reader of the IFDs in an EXIF (TIFF-structured) block."""

    def __init__(self, data: bytes, problems: list[str], where: str) -> None:
        self.data, self.problems, self.where = data, problems, where
        self.endian = "<" if data[:2] == b"II" else ">"
        self.ok = False
        self.visited: set[int] = set()
        if len(data) < 8 or data[:2] not in (b"II", b"MM"):
            problems.append(f"{where}: not a TIFF structure (byte order mark {data[:2]!r})")
            return
        magic = struct.unpack(self.endian + "H", data[2:4])[0]
        if magic == 43:
            problems.append(f"{where}: BigTIFF layout; its metadata is not read")
            return
        if magic != 42:
            problems.append(f"{where}: TIFF magic number {magic}, not 42")
            return
        self.ok = True
        self.ifd0_offset = struct.unpack(self.endian + "L", data[4:8])[0]

    def ifd(self, offset: int, name: str, names: Mapping[int, str]) -> dict[int, Entry]:
        """The entries of the IFD at ``offset``; a broken IFD is reported and read as far as it is sound.
        ``names``: the tags worth naming in problems (others that are broken are skipped silently)."""
        data = self.data
        if offset in self.visited:
            self.problems.append(f"{self.where}: {name} at offset {offset} was already read (a loop); skipped")
            return {}
        self.visited.add(offset)
        if offset < 8 or offset + 2 > len(data):
            self.problems.append(
                f"{self.where}: {name} points to offset {offset}, outside the {len(data)}-byte block; not read"
            )
            return {}
        n = struct.unpack(self.endian + "H", data[offset : offset + 2])[0]
        if n > MAX_IFD_ENTRIES:
            self.problems.append(f"{self.where}: {name} claims {n} entries; not read")
            return {}
        entries: dict[int, Entry] = {}
        for i in range(n):
            at = offset + 2 + 12 * i
            if at + 12 > len(data):
                self.problems.append(f"{self.where}: {name} is truncated after {i} of {n} entries")
                break
            tag, entry = self._entry(at, name, names)
            if entry is None:
                continue
            if tag in entries:
                if tag in names:
                    self.problems.append(f"{self.where}: {name} holds {names[tag]} twice; the first is used")
                continue
            entries[tag] = entry
        return entries

    def _entry(self, at: int, name: str, names: Mapping[int, str]) -> tuple[int, Entry | None]:
        """The 12-byte entry at ``at``: its tag, and its value (None when its type or bounds are bad)."""
        data, e = self.data, self.endian
        tag, typ, count = struct.unpack(e + "HHL", data[at : at + 8])
        if typ not in TYPES:
            if tag in names:
                self.problems.append(f"{self.where}: {name} {names[tag]} has unknown field type {typ}; ignored")
            return tag, None
        size = TYPES[typ][0] * count
        if size <= 4:
            return tag, Entry(typ, count, data[at + 8 : at + 8 + size])
        ptr = struct.unpack(e + "L", data[at + 8 : at + 12])[0]
        if ptr + size > len(data):
            if tag in names:
                self.problems.append(
                    f"{self.where}: {name} {names[tag]}: {size} bytes at offset {ptr} run past the "
                    f"{len(data)}-byte block; ignored"
                )
            return tag, None
        return tag, Entry(typ, count, data[ptr : ptr + size])

    def ints(self, entry: Entry) -> list[int] | None:
        """An integer field's values; None for another field type."""
        if entry.type not in (1, 3, 4, 6, 8, 9):
            return None
        return list(struct.unpack(f"{self.endian}{entry.count}{TYPES[entry.type][1]}", entry.raw))

    def rationals(self, entry: Entry) -> list[tuple[int, int]] | None:
        """A rational field's (numerator, denominator) pairs; None for another field type."""
        if entry.type not in (5, 10):
            return None
        v = struct.unpack(f"{self.endian}{2 * entry.count}{TYPES[entry.type][1]}", entry.raw)
        return list(zip(v[0::2], v[1::2], strict=True))


def entry_text(entry: Entry | None, max_len: int = 200) -> str | None:
    """An ASCII (or, leniently, byte) field as cleaned text, cut at the first NUL."""
    if entry is None or entry.type not in (1, 2, 7):
        return None
    return clean_text(entry.raw.split(b"\x00", 1)[0].decode("utf-8", "replace"), max_len)
