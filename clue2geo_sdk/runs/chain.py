"""Chain of custody for results journals: every record is hash-chained to the one before it.

Each record written by :class:`clue2geo_sdk.runs.journal.RecordWriter` carries ``prev_hash`` (the previous
record's ``record_hash``; :data:`GENESIS` for the first) and ``record_hash``: the sha256 of the
record's canonical JSON (sorted keys, no spaces, ASCII escapes) without ``record_hash`` itself.
Editing a record changes its hash; removing, inserting or reordering records breaks the link of the
record after; recomputing the hashes of an edited record still breaks the next link. Only the
tail can be cut without a trace, so :func:`verify_journal` reports the head hash: write it in the
case notes, and ``clue2geo audit verify RESULTS --anchor HASH`` later proves that the journal still
holds that record and everything before it, unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

GENESIS = "0" * 64
CHAIN_FIELDS = ("prev_hash", "record_hash")


def canonical(rec: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash is taken over: sorted keys, compact separators, ASCII escapes."""
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def record_hash(rec: Mapping[str, Any]) -> str:
    """sha256 of the record's canonical JSON, ``record_hash`` left out."""
    return hashlib.sha256(canonical({k: v for k, v in rec.items() if k != "record_hash"})).hexdigest()


NONFINITE = "nonfinite"  # the record field naming values that were NaN or Infinity (not JSON), now null


def _has_nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, Mapping):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_nonfinite(v) for v in value)
    return False


def finite(rec: Mapping[str, Any]) -> dict[str, Any]:
    """``rec`` with no NaN or Infinity (JSON has neither; ``json`` would write the invalid ``NaN``).
    Inside ``metadata`` (what the photo's EXIF / XMP says) such a value is dropped and named in
    ``metadata["problems"]``, as any malformed metadata value is; elsewhere it becomes None and is
    named in the record's ``nonfinite`` list. A record without any comes back as a shallow copy."""
    if not _has_nonfinite(rec):
        return dict(rec)
    meta_found: list[str] = []
    found: list[str] = []
    drop = object()

    def walk(value: Any, where: str, in_meta: bool) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            shown = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
            (meta_found if in_meta else found).append(f"{where}: {shown} is not a number")
            return drop if in_meta else None
        if isinstance(value, Mapping):
            kept = {}
            for k, v in value.items():
                w = walk(v, f"{where}.{k}", in_meta)
                if w is not drop:
                    kept[k] = w
            return kept
        if isinstance(value, (list, tuple)):
            return [None if (w := walk(v, f"{where}[{i}]", in_meta)) is drop else w for i, v in enumerate(value)]
        return value

    out = {k: walk(v, str(k), k == "metadata") for k, v in rec.items()}
    meta = out.get("metadata")
    if meta_found and isinstance(meta, dict) and isinstance(meta.get("problems", []), list):
        meta["problems"] = [*meta.get("problems", []), *(f"{m}; dropped" for m in meta_found)]
    else:
        found += meta_found
    if found:
        previous = out.get(NONFINITE)
        out[NONFINITE] = [*(previous if isinstance(previous, list) else []), *(f"{m}; written as null" for m in found)]
    return out


def chain(rec: Mapping[str, Any], prev_hash: str) -> dict[str, Any]:
    """The record as it is written: without NaN or Infinity (:func:`finite`), normalised through JSON
    (so the writer hashes exactly what a reader parses back), linked to ``prev_hash`` and sealed with
    its own ``record_hash``."""
    body = finite({k: v for k, v in rec.items() if k not in CHAIN_FIELDS})
    try:
        text = json.dumps(body, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (undecodable file names) are kept as escapes
        text = json.dumps(body, allow_nan=False)
    out = json.loads(text)
    out["prev_hash"] = prev_hash
    out["record_hash"] = record_hash(out)
    return out


def link_of(raw_line: bytes) -> str:
    """What the next record's ``prev_hash`` must be after this journal line: its ``record_hash``,
    or, for a line written before records were chained (or unreadable), the sha256 of its bytes."""
    try:
        rec = json.loads(raw_line.decode("utf-8"))
        h = rec.get("record_hash") if isinstance(rec, dict) else None
        if isinstance(h, str) and len(h) == 64:
            return h
    except (UnicodeDecodeError, ValueError):
        pass
    return hashlib.sha256(raw_line).hexdigest()


def last_link(path: Path) -> str:
    """The ``prev_hash`` for a record appended to the journal at ``path`` (GENESIS when it is empty).
    Reads only the file's tail."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return GENESIS
    if size == 0:
        return GENESIS
    with open(path, "rb") as fh:
        buf, pos = b"", size
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
            last_nl = buf.rfind(b"\n")  # the end of the last complete line (a torn tail is not one)
            if last_nl < 0:
                continue
            prev_nl = buf.rfind(b"\n", 0, last_nl)
            if prev_nl >= 0 or pos == 0:
                return link_of(buf[prev_nl + 1 : last_nl])
    return GENESIS


@attrs.frozen(kw_only=True)
class AuditResult:
    """The outcome of :func:`verify_journal`: ``ok``, how many records were checked, the first bad
    line (1-based) and why, the head hash (last good ``record_hash``), and whether ``anchor`` was seen."""

    path: Path
    ok: bool
    records: int
    bad_line: int | None = None
    reason: str | None = None
    head: str = GENESIS
    anchor_found: bool | None = None

    def message(self) -> str:
        if self.ok:  # the chain shows nothing was edited since it was written, not who wrote it: no "ok"
            tail = "" if self.anchor_found is None else "; the anchor record is in the chain"
            return f"{self.path}: {self.records} records, hash chain intact; head {self.head}{tail}"
        if self.bad_line is None:
            return f"FAILED: {self.path}: {self.reason}"
        return f"FAILED: {self.path}:{self.bad_line}: {self.reason}"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate key(s) {', '.join(dupes)} (a reader could be shown either value)")
    return dict(pairs)


def verify_journal(path: Path, *, anchor: str | None = None) -> AuditResult:
    """Check every line of a journal: it parses, its ``record_hash`` matches its content, and its
    ``prev_hash`` is the previous record's hash (GENESIS on line 1). Stops at the first bad line.
    With ``anchor`` (a ``record_hash`` written down earlier), also require that record to be present."""
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    expected, n = GENESIS, 0
    found = False

    def bad(line: int, why: str) -> AuditResult:
        return AuditResult(path=path, ok=False, records=n, bad_line=line, reason=why, head=expected)

    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            return bad(i, "empty line (records are never blank: the file was edited)")
        try:
            rec = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
            if not isinstance(rec, dict):
                raise ValueError(f"a JSON {type(rec).__name__}, not a record")
        except (UnicodeDecodeError, ValueError) as exc:
            return bad(i, f"unreadable record ({exc})")
        if not all(isinstance(rec.get(k), str) for k in CHAIN_FIELDS):
            return bad(i, "no prev_hash/record_hash: not a chained record (written before chaining, or edited)")
        if rec["record_hash"] != record_hash(rec):
            return bad(i, "record_hash does not match the record's content: this record was edited")
        if rec["prev_hash"] != expected:
            if i == 1:
                why = "prev_hash is not the genesis value: records before this one were removed"
            else:
                why = (
                    f"prev_hash does not match line {i - 1}'s record_hash: a record was removed, inserted or "
                    f"reordered here, or line {i - 1} was edited and its hash recomputed"
                )
            return bad(i, why)
        expected = rec["record_hash"]
        found = found or expected == anchor
        n += 1
    if torn:
        return bad(len(lines) + 1, f"incomplete last line ({len(torn)} bytes with no newline: a torn write or an edit)")
    if n == 0:
        return AuditResult(path=path, ok=False, records=0, reason="no records")
    if anchor is not None and not found:
        return AuditResult(
            path=path,
            ok=False,
            records=n,
            head=expected,
            anchor_found=False,
            reason=f"the anchor record {anchor} is not in the chain: the journal was cut or replaced after it",
        )
    return AuditResult(path=path, ok=True, records=n, head=expected, anchor_found=None if anchor is None else True)
