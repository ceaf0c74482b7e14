"""Ed25519 signatures over a results journal: an examiner vouches for a finished case file.

The hash chain (:mod:`clue2geo_sdk.audit`) shows that no record was edited, removed or reordered,
but anyone can write a whole new chain, and the tail can be cut. A signature binds the journal as
it was when the examiner signed it (its sha256, record count and head ``record_hash``) to the
examiner's key, name and case, so a recipient holding the examiner's public key can check that the
file they were handed is that file. Signatures live beside the journal in ``RESULTS.sig.json``;
several keys may sign one journal (the examiner, a reviewer). Each is over
``MESSAGE_PREFIX`` + the canonical JSON of its other fields. Keys are read as for bundles
(:mod:`clue2geo_sdk.signing`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from .audit import verify_journal
from .errors import Clue2GeoError
from .signing import KeyInput, key_id, load_private_key, load_public_key, public_bytes

SIGNATURE_SUFFIX = ".sig.json"
SIGNATURE_FORMAT = "clue2geo-results-signatures/1"
MESSAGE_PREFIX = b"clue2geo results journal v1\n"


class ResultsSignatureError(Clue2GeoError, ValueError):
    """A results journal is unsigned, signed by no trusted key, or changed after it was signed."""


@attrs.frozen(kw_only=True)
class JournalSignature:
    """One entry of ``RESULTS.sig.json``: who signed which state of the journal, when."""

    key_id: str
    public_key: str  # hex of the raw 32 bytes
    journal: str  # the journal's file name when signed (the pair may be moved together)
    journal_sha256: str
    records: int
    head: str  # the last record's record_hash
    signed_utc: str
    examiner: str | None = None
    case: str | None = None
    signature: str = ""  # hex

    def message(self) -> bytes:
        body = {k: v for k, v in attrs.asdict(self).items() if k != "signature"}
        return MESSAGE_PREFIX + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def describe(self) -> str:
        who = ", ".join(
            x for x in (self.examiner and f"examiner {self.examiner}", self.case and f"case {self.case}") if x
        )
        return f"key {self.key_id}{f' ({who})' if who else ''} on {self.signed_utc}, {self.records} records"

    def to_dict(self) -> dict[str, Any]:
        return {"algorithm": "ed25519", **attrs.asdict(self)}


def signature_path(journal: Path) -> Path:
    return Path(journal).with_name(Path(journal).name + SIGNATURE_SUFFIX)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_journal_signatures(journal: Path) -> list[JournalSignature]:
    """The signatures stored beside ``journal`` ([] when there are none)."""
    path = signature_path(journal)
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format") != SIGNATURE_FORMAT or not isinstance(raw.get("signatures"), list):
            raise ValueError(f"format {raw.get('format')!r}, expected {SIGNATURE_FORMAT!r} with a 'signatures' list")
        out = []
        for e in raw["signatures"]:
            if e.get("algorithm") != "ed25519":
                raise ValueError(f"algorithm {e.get('algorithm')!r}, only ed25519 is read")
            out.append(JournalSignature(**{f.name: e[f.name] for f in attrs.fields(JournalSignature)}))
        return out
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ResultsSignatureError(f"{path}: unreadable signatures file ({exc})") from None


def sign_journal(
    journal: Path, key: KeyInput, *, examiner: str | None = None, case: str | None = None
) -> JournalSignature:
    """Check ``journal``'s hash chain, then sign its current state with ``key`` into
    ``RESULTS.sig.json`` (an earlier signature by the same key is replaced, others are kept).
    A broken chain is refused: a signature must not vouch for an edited file."""
    journal = Path(journal)
    res = verify_journal(journal)
    if not res.ok:
        raise ResultsSignatureError(f"not signed: {res.message()}")
    private = load_private_key(key)
    pub = private.public_key()
    unsigned = JournalSignature(
        key_id=key_id(pub),
        public_key=public_bytes(pub).hex(),
        journal=journal.name,
        journal_sha256=_sha256(journal),
        records=res.records,
        head=res.head,
        signed_utc=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        examiner=examiner or None,
        case=case or None,
    )
    sig = attrs.evolve(unsigned, signature=private.sign(unsigned.message()).hex())
    kept = [s for s in read_journal_signatures(journal) if s.key_id != sig.key_id]
    doc = {"format": SIGNATURE_FORMAT, "signatures": [s.to_dict() for s in [*kept, sig]]}
    dest = signature_path(journal)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, dest)
    return sig


def fault_of(journal: Path, sig: JournalSignature, pub: Any | None = None) -> str | None:
    """Why ``sig`` does not vouch for ``journal`` as it is now (None: it does). ``pub`` is the key to
    check with (default: the one stored in the entry, which proves integrity but not identity)."""
    from cryptography.exceptions import InvalidSignature

    pub = pub or load_public_key(sig.public_key)
    if public_bytes(pub).hex() != sig.public_key:
        return f"key {sig.key_id}: the stored public key is not the trusted one"
    try:
        pub.verify(bytes.fromhex(sig.signature), sig.message())
    except (InvalidSignature, ValueError):
        return f"key {sig.key_id}: the signature does not verify (the signatures file was edited)"
    if _sha256(journal) == sig.journal_sha256:
        return None
    now = verify_journal(journal, anchor=sig.head)
    if now.ok and now.records > sig.records:
        return (
            f"{sig.describe()}: {now.records - sig.records} record(s) were appended after signing "
            f"(the first {sig.records} are as signed)"
        )
    return f"{sig.describe()}: the journal changed after signing ({now.message()})"


def check_journal_signatures(journal: Path, trusted_keys: Iterable[KeyInput]) -> list[JournalSignature]:
    """The signatures by trusted keys that vouch for ``journal`` as it is now; raise
    :class:`ResultsSignatureError` when there is none, saying why."""
    journal = Path(journal)
    trusted = {key_id(k): k for k in map(load_public_key, trusted_keys)}
    if not trusted:
        raise ResultsSignatureError(f"{journal}: no trusted keys given; give at least one public key")
    sigs = read_journal_signatures(journal)
    if not sigs:
        raise ResultsSignatureError(
            f"{journal} is not signed (no {signature_path(journal).name} beside it); "
            f"sign it with 'clue2geo audit sign {journal} --key PRIVATE_KEY'"
        )
    good, faults = [], []
    for sig in sigs:
        if sig.key_id not in trusted:
            continue
        fault = fault_of(journal, sig, trusted[sig.key_id])
        if fault:
            faults.append(fault)
        else:
            good.append(sig)
    if good:
        return good
    if not faults:
        others = ", ".join(s.key_id for s in sigs)
        raise ResultsSignatureError(
            f"{journal} is signed only by key(s) {others}, none of them trusted ({', '.join(trusted)})"
        )
    raise ResultsSignatureError(f"{journal}: bad signature: {'; '.join(faults)}")


__all__ = [
    "JournalSignature",
    "ResultsSignatureError",
    "check_journal_signatures",
    "fault_of",
    "read_journal_signatures",
    "sign_journal",
    "signature_path",
]
