"""Ed25519 signatures over results: an examiner vouches for a finished case file.

The hash chain (:mod:`clue2geo_sdk.runs.chain`) shows that no record was edited, removed or reordered,
but anyone can write a whole new chain, and the tail can be cut. A signature binds the results as
they were when the examiner signed them (their content digest, record count and head
``record_hash``) to the examiner's key, name and case, so a recipient holding the examiner's public
key can check that what they were handed is what was signed.

What is signed is what ``audit verify``, ``report`` and ``export`` read: a JSONL journal's bytes, or
for a ``locate --ray`` run folder its shards, in write order (the merged ``results.jsonl`` is
derived from them and rewritten by ``--resume``). Signatures live in ``RESULTS.sig.json`` beside a
journal, or ``RUN/run.sig.json``; several keys may sign (the examiner, a reviewer). Each is over
``MESSAGE_PREFIX`` + the canonical JSON of its other fields.

A signature may also cover files written from the results: the ``.csv``/``.geojson`` table (``table``,
``table_sha256``) and the HTML case report (``report``: its path from the signatures file's folder,
``report_sha256``); ``audit verify`` then fails when one was edited or, for the report, is missing.
The report fields are left out of the signed message when absent, so signatures made before they
existed still verify.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..bundle.signing import KeyInput, key_id, load_private_key, public_bytes, split_by_trust, trusted_by_id
from ..cluster.shards import shard_files, verify_run
from ..errors import Clue2GeoError
from ..files import atomic_write, regular_file, sha256_file
from ..runs.chain import AuditResult, verify_journal

SIGNATURE_SUFFIX = ".sig.json"
RUN_SIGNATURES = "run.sig.json"
SIGNATURE_FORMAT = "clue2geo-results-signatures/1"
MESSAGE_PREFIX = b"clue2geo results v1\n"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


class ResultsSignatureError(Clue2GeoError, ValueError):
    """Results are unsigned, signed by no trusted key, changed after signing, or their signatures
    file is malformed."""


@attrs.frozen(kw_only=True)
class JournalSignature:
    """One entry of a signatures file: who signed which state of the results, when."""

    key_id: str
    public_key: str  # hex of the raw 32 bytes
    journal: str  # the journal's (or run folder's) name when signed
    journal_sha256: str  # the content digest (:func:`journal_digest`)
    records: int
    head: str  # the last record's record_hash
    signed_utc: str
    examiner: str | None = None
    case: str | None = None
    table: str | None = None  # a .csv/.geojson written from the journal, signed with it
    table_sha256: str | None = None
    report: str | None = None  # the HTML report signed with the results: its path from the signatures' folder
    report_sha256: str | None = None
    signature: str = ""  # hex

    def body(self) -> dict[str, Any]:
        """The signed fields: all but the signature, and the report's only when there is one (a signature
        made before reports were signed has no such field, and its message must stay the same)."""
        d = {k: v for k, v in attrs.asdict(self).items() if k != "signature"}
        return {k: v for k, v in d.items() if k not in _OPTIONAL or v is not None}

    def message(self) -> bytes:
        return MESSAGE_PREFIX + json.dumps(self.body(), sort_keys=True, separators=(",", ":")).encode()

    def describe(self) -> str:
        who = [f"examiner {self.examiner!r}" if self.examiner else "", f"case {self.case!r}" if self.case else ""]
        names = ", ".join(x for x in who if x)
        return f"key {self.key_id}{f' ({names})' if names else ''} on {self.signed_utc}, {self.records} records"

    def to_dict(self) -> dict[str, Any]:
        return {"algorithm": "ed25519", **self.body(), "signature": self.signature}


_OPTIONAL = ("report", "report_sha256")  # fields that are absent, not null, when unused (see JournalSignature.body)


def signature_path(target: Path) -> Path:
    target = Path(target)
    return target / RUN_SIGNATURES if target.is_dir() else target.with_name(target.name + SIGNATURE_SUFFIX)


def _check(target: Path, anchor: str | None = None) -> AuditResult:
    """The hash chain of a journal, or of a run folder's shards in write order."""
    if target.is_dir():
        return verify_run(target, anchor=anchor)
    return verify_journal(target, anchor=anchor)


def journal_digest_input(target: Path) -> bytes:
    """The bytes whose sha256 is :func:`journal_digest`: a journal's own bytes; for a run folder, a short
    statement of its shards' names and sha256s in order (what a timestamp query is built over)."""
    if not target.is_dir():
        return target.read_bytes()
    lines = [b"clue2geo run shards v1\n"]
    lines += [f"{shard.name}\0{sha256_file(shard)}\n".encode() for shard in shard_files(target)]
    return b"".join(lines)


def journal_digest(target: Path) -> str:
    """A journal's sha256 (read in chunks); for a run folder, the sha256 of its shard statement."""
    if not target.is_dir():
        return sha256_file(target)
    return hashlib.sha256(journal_digest_input(target)).hexdigest()


def results_digest_input(target: Path, table: Path | None = None) -> bytes:
    """What a timestamp is over: :func:`journal_digest_input` of ``target``; with ``table`` (the
    .csv/.geojson written from the journal, which ``audit sign`` covers with it), a short statement of
    the journal's and the table's sha256s, in that order (no names: a renamed copy still verifies)."""
    if table is None:
        return journal_digest_input(target)
    return f"clue2geo journal and table v1\n{journal_digest(target)}\n{sha256_file(table)}\n".encode()


def results_digest(target: Path, table: Path | None = None) -> str:
    """The sha256 of :func:`results_digest_input`: :func:`journal_digest` when there is no ``table``."""
    if table is None:
        return journal_digest(target)
    return hashlib.sha256(results_digest_input(target, table)).hexdigest()


def _stored_key(hex_key: str) -> Ed25519PublicKey:
    """The public key a signature entry carries: 64 hex characters only (never a path)."""
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))


def _entry(e: Any) -> JournalSignature:
    """One signatures-file entry, every field checked: a malformed entry is an error, not a crash."""
    if not isinstance(e, dict) or e.get("algorithm") != "ed25519":
        raise ValueError(f"an entry that is not an ed25519 signature: {str(e)[:80]!r}")
    fields = {f.name: e.get(f.name) for f in attrs.fields(JournalSignature)}
    text = ("key_id", "public_key", "journal", "journal_sha256", "head", "signed_utc", "signature")
    bad = [k for k in text if not isinstance(fields[k], str)]
    bad += [
        k for k in ("examiner", "case", "table", "report") if fields[k] is not None and not isinstance(fields[k], str)
    ]
    bad += [k for k in ("table_sha256", "report_sha256") if fields[k] is not None and not _HEX64.match(str(fields[k]))]
    if (fields["report"] is None) != (fields["report_sha256"] is None) or "\0" in str(fields["report"]):
        bad.append("report")
    if not isinstance(fields["records"], int) or isinstance(fields["records"], bool):
        bad.append("records")
    if bad:
        raise ValueError(f"field(s) {', '.join(bad)} missing or of the wrong type")
    for k, pattern in (("public_key", _HEX64), ("journal_sha256", _HEX64), ("head", _HEX64), ("signature", _HEX128)):
        if not pattern.match(fields[k]):
            raise ValueError(f"{k} is not lower-case hex of the right length")
    if not _KEY_ID.match(fields["key_id"]) or fields["key_id"] != key_id(bytes.fromhex(fields["public_key"])):
        raise ValueError(f"key_id {fields['key_id']!r} is not the id of the public key it names")
    return JournalSignature(**fields)


def read_journal_signatures(target: Path) -> list[JournalSignature]:
    """The signatures stored for ``target`` (a journal or a run folder; [] when there are none)."""
    path = signature_path(target)
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if (
            not isinstance(raw, dict)
            or raw.get("format") != SIGNATURE_FORMAT
            or not isinstance(raw.get("signatures"), list)
        ):
            raise ValueError(f"expected format {SIGNATURE_FORMAT!r} with a 'signatures' list")
        return [_entry(e) for e in raw["signatures"]]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ResultsSignatureError(
            f"{path}: unreadable signatures file ({exc}); nothing in it is trusted: repair it from a copy, or "
            "remove it and sign again"
        ) from None


def _label(value: str | None, option: str) -> str | None:
    """An examiner name or case reference as it will be signed and printed: one line of text."""
    if not value:
        return None
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs") for ch in value):
        raise ResultsSignatureError(f"{option} {value!r}: control or invisible characters are not signed")
    return value


def sign_journal(
    target: Path,
    key: KeyInput,
    *,
    examiner: str | None = None,
    case: str | None = None,
    table: Path | None = None,
    report: Path | None = None,
) -> JournalSignature:
    """Check the hash chain of ``target`` (a JSONL journal, or a run folder's shards), then sign its
    current state with ``key`` (an earlier signature by the same key is replaced, others are kept),
    and ``table`` (the .csv/.geojson written from the journal) and ``report`` (the HTML case report)
    with it. A broken chain is refused: a signature must not vouch for an edited file."""
    target = Path(target)
    examiner, case = _label(examiner, "--examiner"), _label(case, "--case")
    report_name = None if report is None else _report_name(target, report)
    digest = journal_digest(target)
    res = _check(target)
    if not res.ok:
        raise ResultsSignatureError(f"not signed: {res.message()}")
    if journal_digest(target) != digest:
        raise ResultsSignatureError(f"not signed: {target} changed while it was being checked (a run still writing?)")
    private = load_private_key(key)
    pub = private.public_key()
    unsigned = JournalSignature(
        key_id=key_id(pub),
        public_key=public_bytes(pub).hex(),
        journal=target.name,
        journal_sha256=digest,
        records=res.records,
        head=res.head,
        signed_utc=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        examiner=examiner,
        case=case,
        table=None if table is None else Path(table).name,
        table_sha256=None if table is None else sha256_file(Path(table)),
        report=report_name,
        report_sha256=None if report is None else sha256_file(Path(report)),
    )
    sig = attrs.evolve(unsigned, signature=private.sign(unsigned.message()).hex())
    kept = [s for s in read_journal_signatures(target) if s.key_id != sig.key_id]
    doc = {"format": SIGNATURE_FORMAT, "signatures": [s.to_dict() for s in [*kept, sig]]}
    atomic_write(signature_path(target), json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return sig


def _report_name(target: Path, report: Path) -> str:
    """How a signature names the report: its path from the signatures file's folder (so the pair can be
    moved together), or its absolute path when there is none (another drive); refused unless it is a
    regular file other than the results."""
    report = regular_file(Path(report), "--report")
    if report.resolve() == target.resolve() or report.name.endswith(SIGNATURE_SUFFIX):
        raise ResultsSignatureError(f"--report {report} is the results or their signatures, not an HTML report")
    try:
        return Path(os.path.relpath(report.resolve(), signature_path(target).parent.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path
        return str(report.resolve())


def signed_report(target: Path, sig: JournalSignature) -> Path | None:
    """Where the report ``sig`` covers should be: its stored path, from the signatures file's folder."""
    return None if sig.report is None else signature_path(target).parent / sig.report


def _report_fault(target: Path, sig: JournalSignature, report: Path | None) -> str | None:
    """Why the HTML report does not hold for ``sig`` (None: it does, or none is signed nor asked for):
    ``report`` given but not signed, or the signed one (at ``report``, else where it was) missing or edited."""
    if sig.report_sha256 is None:
        if report is None:
            return None
        return f"{sig.describe()}: the report {report} is not covered (signed without --report); sign with --report"
    path = report or signed_report(target, sig)
    if path is None or not path.is_file():
        return (
            f"{sig.describe()}: the report {path} signed with the results is missing "
            "(moved? pass its path with --report)"
        )
    now = sha256_file(path)
    if now != sig.report_sha256:
        return f"{sig.describe()}: the report {path} changed after signing (sha256 {now}, signed {sig.report_sha256})"
    return None


def signature_state(
    target: Path,
    sig: JournalSignature,
    pub: Any | None = None,
    table: Path | None = None,
    report: Path | None = None,
) -> tuple[str, str | None]:
    """Whether ``sig`` vouches for ``target`` (and ``table``, the .csv/.geojson written from it, and the
    HTML report it signed, at ``report`` or where it was signed) as they are now: ``("holds", None)``;
    ``("appended", why)`` when records were appended after signing (the signed ones are intact);
    ``("bad", why)`` otherwise. ``pub`` is the trusted key to check with; without it, the key stored in
    the entry is used, which shows the content is what that key signed, not whose key it is."""
    if pub is not None and public_bytes(pub).hex() != sig.public_key:
        return "bad", f"key {sig.key_id}: the stored public key is not the trusted one"
    try:
        (pub or _stored_key(sig.public_key)).verify(bytes.fromhex(sig.signature), sig.message())
    except (InvalidSignature, ValueError):
        return "bad", f"key {sig.key_id}: the signature does not verify (the signatures file was edited)"
    if table is not None and sig.table_sha256 is None:
        why = f"{sig.describe()}: the table {table.name} is not covered (the journal was signed alone); sign {table}"
        return "bad", why
    if table is not None and sha256_file(table) != sig.table_sha256:
        return "bad", f"{sig.describe()}: the table {table} changed after signing (it is not the one written then)"
    if (why := _report_fault(target, sig, report)) is not None:
        return "bad", why
    if journal_digest(target) == sig.journal_sha256:
        return "holds", None
    now = _check(target, anchor=sig.head)
    if now.ok and now.records > sig.records:
        return "appended", (
            f"{sig.describe()}: {now.records - sig.records} record(s) were appended after signing "
            f"(the first {sig.records} are as signed)"
        )
    return "bad", f"{sig.describe()}: the results changed after signing ({now.message()})"


def fault_of(
    target: Path, sig: JournalSignature, pub: Any | None = None, table: Path | None = None, report: Path | None = None
) -> str | None:
    """Why ``sig`` does not vouch for ``target`` (and ``table``, and its report) as they are now (None:
    it does); see :func:`signature_state`."""
    return signature_state(target, sig, pub, table, report)[1]


def check_journal_signatures(
    target: Path, trusted_keys: Iterable[KeyInput], *, table: Path | None = None, report: Path | None = None
) -> list[JournalSignature]:
    """The signatures by trusted keys that vouch for ``target`` (and ``table``, and the report each
    signed, at ``report`` when given) as they are now; raise :class:`ResultsSignatureError` when there
    is none, saying why."""
    target = Path(target)
    trusted = trusted_by_id(trusted_keys)
    if not trusted:
        raise ResultsSignatureError(f"{target}: no trusted keys given; give at least one public key")
    sigs = read_journal_signatures(target)
    if not sigs:
        raise ResultsSignatureError(
            f"{target} is not signed (no {signature_path(target)}); "
            f"sign it with 'clue2geo audit sign {target} --key PRIVATE_KEY'"
        )
    good, faults = split_by_trust(sigs, trusted, lambda sig, pub: fault_of(target, sig, pub, table, report))
    if good:
        return good
    if not faults:
        others = ", ".join(s.key_id for s in sigs)
        raise ResultsSignatureError(
            f"{target} is signed only by key(s) {others}, none of them trusted ({', '.join(trusted)})"
        )
    raise ResultsSignatureError(f"{target}: bad signature: {'; '.join(faults)}")


__all__ = [
    "JournalSignature",
    "ResultsSignatureError",
    "check_journal_signatures",
    "journal_digest",
    "fault_of",
    "results_digest",
    "results_digest_input",
    "read_journal_signatures",
    "sign_journal",
    "signature_path",
    "signature_state",
    "signed_report",
]
