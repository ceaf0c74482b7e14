"""The results' RFC 3161 timestamps on the page: each response the examiner saved beside them, with
its time (the TSA's clock), the TSA's name and whether it was verified.

Where the report looks (:func:`response_files`), beside RESULTS (the journal, or the ``locate --ray``
run folder, the report is made from):

* ``RESULTS.tsr``: what ``audit stamp-request`` tells the examiner to save (its curl line writes the
  answer to ``RESULTS.tsq`` there);
* ``RESULTS.*.tsr``: one per TSA when several were asked (``results.jsonl.freetsa.tsr``);
* ``STEM.tsr``: RESULTS' name without its suffix (``results.tsr`` beside ``results.jsonl``).

For a .csv/.geojson run (its journal is ``TABLE.records.jsonl``) the same names are also looked for
beside the table, and a stamp is checked over the journal and the table together, as ``audit
stamp-request TABLE`` made it (:func:`~clue2geo_sdk.evidence.attestation.results_digest`); a stamp over
the journal alone still holds for the journal.

A stamp is *verified* only with the TSA's CA (``report --tsa-ca``): it is then checked as ``audit
stamp-verify`` checks it (:func:`~clue2geo_sdk.evidence.timestamps.check_stamp`: over the results as they
are now, answering the query beside it when there is one, signed by a TSA that chains to the CA).
Without a CA the time and TSA are shown as the response states them, "not verified"; whether it is over
the results as they are now is checked either way. A response that cannot be read is shown as
unreadable, with why: nothing here fails the report.
"""

from __future__ import annotations

import datetime as _dt
import glob
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from ...files import read_regular_bytes
from ...runs.journal import journal_path
from ..attestation import results_digest
from ..timestamps import STAMP_MAX, TimestampError, check_stamp, load_ca, query_path, read_response, signer_name
from .style import code, esc

RESPONSE_SUFFIX = ".tsr"
_TABLES = (".csv", ".geojson")
_NO_CA = "not verified (pass --tsa-ca)"


@attrs.frozen(kw_only=True)
class StampView:
    """One saved timestamp response as the report shows it. ``state``: "verified" (checked against
    the given CA), "unverified" (no CA given; over the results as they are now), "failed" (it does not
    hold: named in ``note``) or "unreadable" (not a granted timestamp response: ``note`` says why)."""

    path: str
    state: str
    when: str | None = None
    tsa: str | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def journal_and_table(results: Path) -> tuple[Path, Path | None]:
    """What a stamp beside RESULTS covers: its journal (or run folder) and, for a .csv/.geojson run,
    the table; RESULTS may name either the table or its sidecar journal."""
    if results.suffix.lower() in _TABLES and journal_path(results, "csv").is_file():
        return journal_path(results, "csv"), results
    table = results.with_name(results.name.removesuffix(".records.jsonl"))
    if table != results and table.suffix.lower() in _TABLES and table.is_file():
        return results, table
    return results, None


def response_files(results: Path) -> list[Path]:
    """The timestamp responses saved beside ``results`` (and its table), by the module docstring's names."""
    found: set[Path] = set()
    for named in filter(None, journal_and_table(Path(results))):
        folder, name = named.parent, named.name
        found.update({folder / (name + RESPONSE_SUFFIX), folder / (named.stem + RESPONSE_SUFFIX)})
        found.update(folder.glob(glob.escape(name) + ".*" + RESPONSE_SUFFIX))
    return sorted(p for p in found if p != results and (p.exists() or p.is_symlink()))


def _query_of(tsr: Path, results: Path) -> bytes | None:
    """The query a response answers, found as ``audit stamp-verify`` finds it: the .tsq beside the
    response, else ``RESULTS.tsq``; None when neither is there (the nonce is then not checked)."""
    for q in (tsr.with_suffix(".tsq"), query_path(results)):
        if q.is_file():
            return read_regular_bytes(q, "timestamp query", max_bytes=STAMP_MAX)
    return None


def load_tsa_cas(paths: Iterable[str | os.PathLike[str]] | None) -> bytes | None:
    """The CA certificates (PEM) given as ``--tsa-ca``, joined into one trust list; None when none
    were given. A file that is not a regular file or holds no PEM certificate raises a
    :class:`~clue2geo_sdk.errors.Clue2GeoError` naming it, before anything is written."""
    pems = []
    for path in paths or ():
        pem = read_regular_bytes(path, "--tsa-ca", max_bytes=STAMP_MAX)
        try:
            load_ca(pem)
        except TimestampError as exc:
            raise TimestampError(f"--tsa-ca {path}: {exc}") from None
        pems.append(pem.rstrip(b"\n") + b"\n")
    return b"".join(pems) if pems else None


def read_stamp(tsr: Path, results: Path, ca_pem: bytes | None) -> StampView:
    """The timestamp response ``tsr`` checked against ``results`` as they are now (and against the CA
    in ``ca_pem`` when given); never raises for what the file holds."""
    try:
        data = read_regular_bytes(tsr, "timestamp response", max_bytes=STAMP_MAX)
        resp = read_response(data)
        when = resp.tst_info.gen_time.astimezone(_dt.UTC).isoformat()
        tsa = signer_name(resp)
        stamped = resp.tst_info.message_imprint.message.hex()
    except Exception as exc:  # noqa: BLE001 - a malformed response (any fault in its DER) must not lose the report
        return StampView(path=str(tsr), state="unreadable", note=str(exc) or type(exc).__name__)
    view = StampView(path=str(tsr), state="unverified", when=when, tsa=tsa, note=_NO_CA)
    journal, table = journal_and_table(Path(results))
    try:  # a .csv/.geojson run's stamp covers journal and table; a stamp over the journal alone still holds
        covers = {results_digest(journal): None} | ({results_digest(journal, table): table} if table else {})
    except OSError as exc:
        return attrs.evolve(view, state="failed", note=f"the results cannot be read to check it ({exc})")
    if stamped not in covers:
        now = " or ".join(covers)
        why = (
            f"does not cover these results: it is over sha256 {stamped}, the results have {now} now (they "
            "changed after it was made, or it is for other results)"
        )
        unchecked = "; its TSA was not verified either (pass --tsa-ca)" if ca_pem is None else ""
        return attrs.evolve(view, state="failed", note=why + unchecked)
    if ca_pem is None:
        return view
    try:
        query = _query_of(tsr, Path(results))
        stamp = check_stamp(journal, data, ca_pem, query, table=covers[stamped])
    except Exception as exc:  # noqa: BLE001 - a malformed query or CA chain is this stamp's fault, not the report's
        return attrs.evolve(view, state="failed", note=f"does not hold: {exc}")
    nonce = "" if stamp.nonce_checked else "; no query (.tsq) beside it: its nonce was not checked"
    return attrs.evolve(view, state="verified", note=f"verified: chains to the given CA{nonce}")


_CLASSES = {"verified": "good", "unverified": "warn", "failed": "bad", "unreadable": "bad"}


def _stamp_line(view: StampView) -> str:
    cls = _CLASSES[view.state]
    name = code(Path(view.path).name)
    if view.state == "unreadable":
        body = f'{name}: <span class="bad">unreadable: {esc(view.note)}</span>'
    else:
        body = (
            f"{name}: {esc(view.when)} (the TSA's clock, UTC) by {esc(view.tsa)}: "
            f'<span class="{cls}">{esc(view.note)}</span>'
        )
    return f'<li class="stamp" data-stamp="{view.state}">{body}</li>'


def stamps_html(results_path: Path | None, ca_pem: bytes | None) -> str:
    """The timestamps block of the page's top: one line per saved response, or that none was found
    (and where the report looked); nothing without results."""
    if results_path is None:
        return ""
    results = Path(results_path)
    views = [read_stamp(tsr, results, ca_pem) for tsr in response_files(results)]
    if not views:
        where = f"{results.name}.tsr, {results.name}.*.tsr or {results.stem}.tsr"
        return (
            '<p class="stamps" data-stamps="0">Trusted timestamps (RFC 3161): none found beside the results '
            f"(looked for {esc(where)}; <code>clue2geo audit stamp-request</code> makes the query).</p>"
        )
    items = "".join(_stamp_line(v) for v in views)
    return (
        f'<div class="stamps" data-stamps="{len(views)}"><p>Trusted timestamps (RFC 3161) saved beside the '
        f"results: each says the results existed, as they are now, at that time on the TSA's clock.</p>"
        f"<ul>{items}</ul></div>"
    )
