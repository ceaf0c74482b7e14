"""The chain of custody on the page: what a reader needs to check the report's source themselves.

At the top, the results' hash chain checked at report time and each examiner's signature, shown as
holding (green) only when made by a key the user trusts; per record, its hashes recomputed, the
image's sha256 now, the bundle that made it and how to check the whole chain (``audit verify``).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ...bundle.signing import trusted_by_id
from ...cluster import is_run_dir
from ...cluster.shards import verify_run
from ...errors import Clue2GeoError
from ...files import regular_file
from ...runs.chain import record_hash, verify_journal
from ...runs.records import Record
from ..attestation import fault_of, read_journal_signatures, signature_path
from .figures import Thumbnail
from .style import code, esc, json_text, num, table_rows


def _hash_check(rec: Record) -> str:
    """Whether the record's own record_hash is the hash of what it holds now."""
    rh = rec.record_hash
    if not isinstance(rh, str):
        return '<span class="warn">not recorded (a record written before chaining)</span>'
    if record_hash(rec.to_dict()) == rh:
        return '<span class="good">matches</span>'
    return '<span class="bad">DOES NOT MATCH: this record was edited after it was written</span>'


def _image_now(thumb: Thumbnail | None) -> str:
    """The photo's file at report time, against the record's sha256."""
    if thumb is None:
        return "not checked (the locator failed on this input)"
    if thumb.status == "ok":
        return '<span class="good">the file still has this sha256</span>'
    return f'<span class="bad">{esc(thumb.note)}</span>'


def _bundle_check(recorded: Any, bundle_digest: str | None) -> str:
    """The bundle given to the report, against the one the record names."""
    if bundle_digest is None:
        return "no bundle given to the report"
    if not recorded:
        return '<span class="warn">the record does not say which bundle made it</span>'
    if recorded == bundle_digest:
        return '<span class="good">the bundle given to the report is this one</span>'
    return f'<span class="warn">the bundle given to the report is another one ({code(bundle_digest)})</span>'


def custody_html(rec: Record, thumb: Thumbnail | None, bundle_digest: str | None, results_label: str) -> str:
    """A record's chain-of-custody block; ``thumb`` is None for a failed record (no photo checked)."""
    rd = rec.bundle_digest
    opts = (
        f"<details><summary>{code(rec.options_digest)}</summary><pre>"
        f"{html.escape(json_text(rec.options, sort_keys=True))}</pre></details>"
        if isinstance(rec.options, Mapping)
        else code(rec.options_digest)
    )
    pairs = [
        ("Started (UTC)", esc(rec.started_utc)),
        ("Finished (UTC)", f"{esc(rec.finished_utc)} ({num(rec.seconds, '.2f', ' s')})"),
        ("Image (as recorded)", code(rec.image or rec.path)),
        ("Image sha256", f"{code(rec.image_sha256)}<br>at report time: {_image_now(thumb)}"),
        ("Bundle", f"{esc(rec.bundle)} · manifest digest {code(rd)}<br>{_bundle_check(rd, bundle_digest)}"),
        ("SDK version", esc(rec.sdk_version)),
        ("Options", opts),
        ("prev_hash", code(rec.prev_hash)),
        ("record_hash", f"{code(rec.record_hash)}<br>recomputed from this record: {_hash_check(rec)}"),
    ]
    return (
        '<div class="custody"><h3>Chain of custody</h3><table class="kv">'
        + table_rows(pairs)
        + "</table><p>To check that no record was edited, removed or reordered since it was written, run "
        f"<code>clue2geo audit verify {esc(results_label)}</code> on the results file: it recomputes every "
        "record_hash and prev_hash link and names the first bad line.</p></div>"
    )


def audit_line(results_path: Path | None, trusted: Mapping[str, Any]) -> str:
    """The hash chain of the results (a journal, or a 'locate --ray' run folder) checked now, and
    their signatures (checked with the ``trusted`` keys)."""
    if results_path is None:
        return ""
    path = Path(results_path)
    try:
        if path.is_dir():
            if not is_run_dir(path):
                return ""
            res = verify_run(path)
        elif path.is_file():
            res = verify_journal(path)
        else:
            return ""
    except OSError as exc:
        return f'<p class="bad">The results could not be read to check their hash chain: {esc(exc)}</p>'
    cls = "good" if res.ok else "bad"
    line = f'<p>Hash chain of the results at report time: <span class="{cls}">{esc(res.message())}</span></p>'
    return line + signature_lines(path, trusted)


def load_trusted_keys(trusted_keys: Iterable[Any] | None) -> dict[str, Any]:
    """The user's trusted public keys by key id, given as ``--trusted-key`` takes them (a key file's path
    or the key's text): a key file that is a FIFO or device is refused before it is opened (it would
    block for ever), and a key that cannot be read raises a :class:`~clue2geo_sdk.errors.Clue2GeoError`."""
    keys = list(trusted_keys or [])
    for k in keys:
        if isinstance(k, str | Path):
            try:
                path = Path(k).expanduser()
                named = path.exists() or path.is_symlink()
            except (OSError, ValueError):  # key text too long, or with a NUL, for a path: not a file
                named = False
            if named:
                regular_file(path, "--trusted-key")
    return trusted_by_id(keys)


def _signature_line(trust: str, cls: str, text: str, note: str = "") -> str:
    return f'<p class="signature" data-trust="{trust}">Signature: <span class="{cls}">{esc(text)}</span>{note}</p>'


_UNTRUSTED_NOTE = (
    " (it verifies only against the public key stored in the signatures file itself, which shows "
    "these results are what that key signed, not whose key it is: anyone who can write the file can "
    "sign with a key of their own under any name. Check it with the examiner's public key: "
    "<code>clue2geo report --trusted-key</code> or <code>clue2geo audit verify --trusted-key</code>)"
)


def signature_lines(target: Path, trusted: Mapping[str, Any]) -> str:
    """The examiners' signatures of the results. Green only for a signature that verifies with a key
    the user named as trusted (``trusted``, by key id); one that verifies only with the public key
    stored beside it in the signatures file is said to be unchecked (amber): whoever can write that
    file can re-sign rewritten results with a key of their own, under any examiner's name."""
    try:
        sigs = read_journal_signatures(target)
    except (Clue2GeoError, OSError) as exc:
        return _signature_line("bad", "bad", str(exc))
    out: list[str] = []
    for sig in sigs:
        pub = trusted.get(sig.key_id)
        try:
            fault = fault_of(target, sig, pub)
        except (Clue2GeoError, OSError) as exc:
            fault = f"key {sig.key_id}: cannot be checked ({exc})"
        if fault is not None:
            out.append(_signature_line("bad", "bad", fault))
        elif pub is not None:
            text = f"Signed by {sig.describe()}: checked against your trusted key {sig.key_id}"
            out.append(_signature_line("trusted", "good", text, "; these results are what that key signed"))
        else:
            text = f"not checked against a key you trust: {sig.describe()}"
            out.append(_signature_line("untrusted", "warn", text, _UNTRUSTED_NOTE))
    if trusted and not any(s.key_id in trusted for s in sigs):  # (one by a trusted key that fails said why)
        given = ", ".join(trusted)
        why = (
            f"no signature by a key you trust ({given}): the results are signed only by key(s) "
            f"{', '.join(s.key_id for s in sigs)}"
            if sigs
            else f"not signed (no {signature_path(target).name}), and trusted key(s) {given} were given"
        )
        out.append(_signature_line("bad", "bad", why))
    return "".join(out)
