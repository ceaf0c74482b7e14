"""A journal record: what it holds (:class:`Record`), what made it, and what a well-formed one looks like.

A record is one result as a dict: the result's ``to_dict`` (a :class:`~clue2geo_sdk.results.Prediction`,
``status`` "ok", or a :class:`~clue2geo_sdk.results.Failure`, ``status`` "error"), its path (as given
and absolute), its time, and what made it: ``bundle_digest``, ``options_digest``, ``gallery_digest``,
``sdk_version``, ``demo`` (:data:`IDENTITY_FIELDS`). A result is reused on resume, and read, only
under the identity that made it. Every key a record may hold, and the kind it must have, is declared
once, as a field of :class:`Record`, which readers use instead of the dict; :func:`record_problem`
checks a record read back from a hand-edited or foreign file: it is checked, not trusted. Writing
stays on the dict (:func:`record_of`, :mod:`clue2geo_sdk.runs.chain`): the hashes are over it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import operator
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any, Literal

import attrs

from .._version import __version__
from ..bundle.manifest import Bundle
from ..errors import RecordFormatError
from ..geolocator import Geolocator
from ..options import Options
from ..results import Candidate, Failure, Prediction
from .chain import finite

_KIND = "clue2geo.kind"  # a field's metadata: what record_problem checks it is (None: checked on its own)
_IDENTITY = "clue2geo.identity"  # a field's metadata: part of what made the record (IDENTITY_FIELDS)


def is_finite_number(value: Any) -> bool:
    """True for an int or float that is finite (not a bool, NaN or Infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _key(kind: str | None = None, *, identity: bool = False) -> Any:
    """One record key: None when the record does not hold it (or holds null); ``kind`` is what
    :func:`record_problem` requires of it (see ``_CHECKS``)."""
    return attrs.field(default=None, metadata={_KIND: kind, _IDENTITY: identity})


def _present(rec: Record) -> tuple[str, ...]:
    """The keys of a Record built directly (not read): each field given a value, then ``extra``'s."""
    return (*(k for k in RECORD_KEYS if getattr(rec, k) is not None), *rec.extra)


@attrs.frozen(kw_only=True)
class Record:
    """One journal record, typed: one field per key a record may hold, each declared here once.

    Read with :meth:`from_dict`, a record keeps exactly what the line held: the keys it had (``keys``,
    in their order: absent and null stay apart), every value as it was (never converted, so
    :meth:`to_dict` gives back an equal dict and ``record_hash`` still holds), and the keys this SDK
    does not know (a newer one's) in ``extra``. The fields are typed as a well-formed record has them
    (strict :meth:`from_dict`); a record read leniently (``strict=False``: a reader that shows or skips
    a malformed record part by part) may hold any JSON value in any field, so such readers check
    (:func:`is_finite_number`, the report's list and object checks) before they use one.

    The fields are grouped by the kind :func:`record_problem` checks, in the order it checks them.
    """

    # checked on their own: the path as given, "ok" or "error", and a latitude and longitude when "ok"
    path: str | None = _key()
    status: Literal["ok", "error"] | None = _key()
    lat: float | None = _key()
    lon: float | None = _key()
    # text
    abs_path: str | None = _key("text")
    country: str | None = _key("text")
    country_code: str | None = _key("text")
    admin1: str | None = _key("text")
    city: str | None = _key("text")
    landmark: str | None = _key("text")
    model_country: str | None = _key("text")
    model_city: str | None = _key("text")
    source: str | None = _key("text")
    cues_status: str | None = _key("text")
    image_sha256: str | None = _key("text")
    image_sha3_512: str | None = _key("text")  # only when asked (``locate --hash sha3-512``); older records lack it
    image: str | None = _key("text")
    bundle: str | None = _key("text")
    bundle_digest: str | None = _key("text", identity=True)
    options_digest: str | None = _key("text", identity=True)
    gallery_digest: str | None = _key("text", identity=True)
    sdk_version: str | None = _key("text", identity=True)
    error: str | None = _key("text")
    message: str | None = _key("text")
    started_utc: str | None = _key("text")
    finished_utc: str | None = _key("text")
    prev_hash: str | None = _key("text")
    record_hash: str | None = _key("text")
    # finite numbers
    confidence: float | None = _key("number")
    similarity: float | None = _key("number")
    spread_km: float | None = _key("number")
    seconds: float | None = _key("number")
    metadata_distance_km: float | None = _key("number")
    # whole numbers
    invalid_candidates: int | None = _key("count")
    outside_region: int | None = _key("count")
    # true or false
    fallback: bool | None = _key("flag")
    demo: bool | None = _key("flag", identity=True)
    # objects (metadata is also checked inside: its position, problems and capture time)
    metadata: Mapping[str, Any] | None = _key("object")
    region: Mapping[str, Any] | None = _key("object")
    options: Mapping[str, Any] | None = _key("object")
    timings: Mapping[str, Any] | None = _key("object")
    raw_outputs: Mapping[str, Any] | None = _key("object")
    cluemap: Mapping[str, Any] | None = _key("object")
    references: Mapping[str, Any] | None = _key("object")
    # lists of objects
    candidates: list[Mapping[str, Any]] | None = _key("list")
    cues: list[Mapping[str, Any]] | None = _key("list")
    answers: list[Mapping[str, Any]] | None = _key("list")
    # never checked: what :func:`clue2geo_sdk.runs.chain.finite` wrote as null (NaN or Infinity)
    nonfinite: list[str] | None = _key()

    extra: Mapping[str, Any] = attrs.field(factory=dict)  # keys this SDK does not know, as read
    keys: tuple[str, ...] = attrs.field(default=attrs.Factory(_present, takes_self=True))  # as read, in order

    @classmethod
    def from_dict(cls, data: Any, strict: bool = True) -> Record:
        """The record a journal line's object holds (or a record's :meth:`to_dict`). ``strict``: a
        malformed record (:func:`record_problem`) raises :class:`RecordFormatError` saying why;
        ``strict=False`` keeps it as read, for the readers that always tolerated one. Anything but an
        object is a RecordFormatError either way."""
        if not isinstance(data, Mapping):
            raise RecordFormatError(f"a {type(data).__name__}, not a record (a JSON object)")
        if strict and (why := record_problem(data)) is not None:
            raise RecordFormatError(why)
        known = {k: v for k, v in data.items() if k in _KEYS}
        extra = {k: v for k, v in data.items() if k not in _KEYS}
        return cls(**known, extra=extra, keys=tuple(data))

    @classmethod
    def of(cls, value: Record | Mapping[str, Any]) -> Record:
        """``value`` if it is a Record, else the record it holds, read leniently (``strict=False``)."""
        return value if isinstance(value, Record) else cls.from_dict(value, strict=False)

    def to_dict(self) -> dict[str, Any]:
        """The record as a dict equal to the one it was read from (same keys, order and values: the
        values themselves, not copies), so its canonical JSON and ``record_hash`` are unchanged."""
        return {k: getattr(self, k) if k in _KEYS else self.extra[k] for k in self.keys}

    def __reduce__(self) -> tuple[Any, ...]:  # pickled as its dict: a resume set travels to every Ray task
        return (Record.from_dict, (self.to_dict(), False))

    @property
    def ok(self) -> bool:
        """Whether the record holds a prediction (status "ok") rather than a failure."""
        return self.status == "ok"

    @property
    def identity(self) -> dict[str, Any]:
        """What made the record (:data:`IDENTITY_FIELDS`: bundle, options, gallery, SDK, demo)."""
        return dict(zip(IDENTITY_FIELDS, _identity_of(self), strict=True))

    def made_under(self, ident: Mapping[str, Any]) -> bool:
        """Whether ``ident`` (:func:`identity_of`) made this record: only then is it reused, or read, as its result."""
        return all(v == ident[k] for k, v in self.identity.items())

    @property
    def metadata_position(self) -> Mapping[str, Any] | None:
        """The position the photo's own metadata claims, when the record holds a finite one."""
        pos = self.metadata.get("position") if isinstance(self.metadata, Mapping) else None
        ok = isinstance(pos, Mapping) and is_finite_number(pos.get("lat")) and is_finite_number(pos.get("lon"))
        return pos if ok else None

    def finite(self) -> Record:
        """This record without NaN or Infinity (:func:`clue2geo_sdk.runs.chain.finite`: what a CSV or
        GeoJSON output holds; each such value named in ``nonfinite`` or ``metadata.problems``)."""
        return Record.from_dict(finite(self.to_dict()), strict=False)

    def prediction(self) -> Prediction:
        """The :class:`Prediction` an "ok" record holds (:meth:`Prediction.from_dict`: RecordFormatError
        for a failure's record or a malformed one)."""
        return Prediction.from_dict(self.to_dict())

    def alternatives(self) -> list[Mapping[str, Any]]:
        """The record's answers of rank 2 and on (its ranked alternatives to the winner, in order) that
        hold a position: a rank and a finite latitude and longitude in range (a hand-edited one is left out)."""
        out = []
        for a in self.answers if isinstance(self.answers, list) else ():
            if not (isinstance(a, Mapping) and is_finite_number(a.get("rank")) and a["rank"] >= 2):
                continue
            lat, lon = a.get("lat"), a.get("lon")
            if is_finite_number(lat) and is_finite_number(lon) and abs(lat) <= 90 and abs(lon) <= 180:
                out.append(a)
        return out

    def candidate_objects(self) -> list[Candidate]:
        """The record's candidates as :class:`Candidate` (keys a newer SDK added are ignored)."""
        names = {f.name for f in attrs.fields(Candidate)}
        return [Candidate(**{k: v for k, v in c.items() if k in names}) for c in self.candidates or ()]


RECORD_KEYS = tuple(f.name for f in attrs.fields(Record) if _KIND in f.metadata)
_KEYS = frozenset(RECORD_KEYS)
IDENTITY_FIELDS = tuple(f.name for f in attrs.fields(Record) if f.metadata.get(_IDENTITY))
_identity_of = operator.attrgetter(*IDENTITY_FIELDS)


def record_keys(*names: str) -> tuple[str, ...]:
    """``names``, each checked to be a record key (a table's columns are declared against
    :class:`Record`'s fields, so a renamed key cannot leave a column reading nothing)."""
    unknown = [n for n in names if n not in _KEYS]
    if unknown:
        raise ValueError(f"not record keys: {', '.join(unknown)}")
    return names


def identity(geo: Geolocator, options: Options | None = None) -> dict[str, Any]:
    """What makes a record: the bundle, the options and the SDK. Stored in every record so a
    result is never reused, nor read, as if another model or setting had made it."""
    photos = geo.gallery.kind == "photos"
    return identity_of(geo.bundle, options or geo.options, gallery_digest=geo.gallery.digest if photos else None)


def identity_of(bundle: Bundle, options: Options, *, gallery_digest: str | None = None) -> dict[str, Any]:
    """:func:`identity` from a bundle and options alone (a cluster driver loads no models).
    ``gallery_digest`` names an analyst's photo gallery; None is the bundle's own gallery."""
    return {
        "bundle_digest": bundle.digest,
        "options_digest": options.digest(),
        "gallery_digest": gallery_digest,
        "sdk_version": __version__,
        "demo": bundle.demo,
    }


def utc_now() -> str:
    """The current UTC time as ISO 8601 with milliseconds (the records' ``started_utc`` / ``finished_utc``)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def record_of(
    item: Prediction | Failure,
    path: str,
    seconds: float,
    ident: Mapping[str, Any],
    *,
    started_utc: str | None = None,
    finished_utc: str | None = None,
    abs_path: str | None = None,
    digests: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One journal record: the result's ``to_dict`` with its path (as given, and ``abs_path``: absolute,
    default from this process's working folder), status, time, identity and UTC start and end (when not
    given: end now, start ``seconds`` before). ``digests``: further digests of the input asked for
    (:data:`EXTRA_HASHES`' record keys, e.g. ``image_sha3_512``), placed after the result's own."""
    status = "ok" if isinstance(item, Prediction) else "error"
    if finished_utc is None:
        end = _dt.datetime.now(_dt.UTC)
        finished_utc = end.isoformat(timespec="milliseconds")
        if started_utc is None:
            started_utc = (end - _dt.timedelta(seconds=seconds)).isoformat(timespec="milliseconds")
    rec = {"path": path, "abs_path": abs_path or absolute(path), "status": status, "seconds": round(seconds, 3)}
    rec |= {**item.to_dict(), **(digests or {}), **ident}
    rec["started_utc"], rec["finished_utc"] = started_utc, finished_utc
    return rec


#: The digests of an input a run may record besides its sha256 (always recorded): the name ``locate
#: --hash`` takes, and the record key it is written under (computed with hashlib from the bytes read once).
EXTRA_HASHES: dict[str, str] = {"sha3-512": "image_sha3_512"}


def input_digests(data: bytes | None, hashes: Collection[str]) -> dict[str, str]:
    """The record keys and hex digests of ``data`` for each of ``hashes`` (names in :data:`EXTRA_HASHES`;
    "sha256" is always recorded and is skipped here); {} when the bytes could not be read."""
    unknown = [h for h in hashes if h != "sha256" and h not in EXTRA_HASHES]
    if unknown:
        raise ValueError(f"unknown hash(es) {', '.join(unknown)}; known: sha256, {', '.join(EXTRA_HASHES)}")
    if data is None:
        return {}
    return {EXTRA_HASHES[h]: hashlib.new(h.replace("-", "_"), data).hexdigest() for h in hashes if h in EXTRA_HASHES}


def absolute(path: str) -> str:
    """``path`` made absolute from the working folder, without following links (what resume and
    :func:`clue2geo_sdk.runs.resume.latest` compare, beside the sha256, to tell two images under one
    relative path apart)."""
    return os.path.abspath(path)


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


#: What each kind of key must hold, in the order :func:`record_problem` checks the kinds.
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "text": (lambda v: isinstance(v, str), "text"),
    "number": (is_finite_number, "a finite number"),
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "flag": (lambda v: isinstance(v, bool), "true or false"),
    "object": (lambda v: isinstance(v, Mapping), "an object"),
    "list": (lambda v: isinstance(v, list) and all(isinstance(x, Mapping) for x in v), "a list of objects"),
}
#: The keys of each kind, in the order they are checked (Record's field order).
FIELDS_OF_KIND = {
    kind: tuple(f.name for f in attrs.fields(Record) if f.metadata.get(_KIND) == kind) for kind in _CHECKS
}


def _field_problem(rec: Mapping[str, Any]) -> str | None:
    """The first top-level field of ``rec`` whose value is not of its declared kind, said in words."""
    for kind, (ok, what) in _CHECKS.items():
        for k in FIELDS_OF_KIND[kind]:
            v = rec.get(k)
            if v is not None and not ok(v):
                return f"'{k}' is {_kind(v)} {str(v)[:40]!r}, not {what}"
    return None


def _metadata_problem(meta: Mapping[str, Any]) -> str | None:
    """What is wrong with a record's ``metadata`` object (the photo's own position, time, problems)."""
    pos = meta.get("position")
    if pos is not None and not (isinstance(pos, Mapping) and all(is_finite_number(pos.get(k)) for k in ("lat", "lon"))):
        return f"'metadata.position' is {_kind(pos)} {str(pos)[:40]!r}, not a position with lat and lon"
    problems = meta.get("problems")
    if problems is not None and not (isinstance(problems, list) and all(isinstance(x, str) for x in problems)):
        return f"'metadata.problems' is {_kind(problems)} {str(problems)[:40]!r}, not a list of text"
    if meta.get("datetime_original") is not None and not isinstance(meta.get("datetime_original"), str):
        return "'metadata.datetime_original' is not text"
    return None


def record_problem(rec: Mapping[str, Any]) -> str | None:
    """Why a record read back from a file cannot be exported or shown as it is (a field of the wrong
    type or out of range: a hand-edited or foreign file), or None. Records the SDK writes always pass."""
    if not isinstance(rec.get("path"), str):
        return f"'path' is {_kind(rec.get('path'))}, not text"
    if rec.get("status") not in ("ok", "error"):
        return f"'status' is {rec.get('status')!r}, not 'ok' or 'error'"
    if (why := _field_problem(rec)) is not None:
        return why
    if rec["status"] == "ok":
        for k, bound in (("lat", 90), ("lon", 180)):
            v = rec.get(k)
            if not (is_finite_number(v) and -bound <= v <= bound):
                return f"'{k}' is {_kind(v)} {str(v)[:40]!r}, not a {'latitude' if k == 'lat' else 'longitude'}"
    meta = rec.get("metadata")
    return _metadata_problem(meta) if isinstance(meta, Mapping) else None


@attrs.frozen
class Journal:
    """The records read from a journal, and what was wrong with it (one line each, with line numbers)."""

    records: list[dict[str, Any]]
    problems: list[str]
    where: list[str] = attrs.field(factory=list)  # "FILE:LINE" of each record, when read from a file


def valid_records(journal: Journal) -> Journal:
    """``journal`` without the records :func:`record_problem` refuses, each named (file and line) in
    its problems: one bad record does not stop an export or a report of the others."""
    records, where, problems = [], [], list(journal.problems)
    for i, rec in enumerate(journal.records):
        line = journal.where[i] if i < len(journal.where) else f"record {i + 1}"
        try:
            Record.from_dict(rec)
        except RecordFormatError as exc:
            problems.append(f"{line}: record skipped: {exc}")
            continue
        records.append(rec)
        where.append(line)
    return Journal(records, problems, where)
