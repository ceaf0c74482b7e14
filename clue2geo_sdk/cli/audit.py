"""``clue2geo audit``: the chain of custody of results (their hash chain, the examiner's signature)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..cluster import is_run_dir
from ..cluster.shards import verify_run
from ..errors import Clue2GeoError
from ..evidence.attestation import (
    JournalSignature,
    check_journal_signatures,
    journal_digest,
    read_journal_signatures,
    sign_journal,
    signature_path,
    signature_state,
)
from ..evidence.timestamps import STAMP_MAX, TimestampError, check_stamp, query_path, write_query
from ..files import read_regular_bytes, regular_file
from ..runs.chain import AuditResult, verify_journal
from ..runs.journal import journal_path
from .common import fail, key_files, reason, same_file, warn


@click.group()
def audit() -> None:
    """Check the chain of custody of results."""


def journal_of(results: Path) -> Path:
    """What RESULTS' hash chain and signatures are over: a JSONL journal itself, the .records.jsonl
    beside a .csv/.geojson (the table is derived from it), or a 'locate --ray' run folder (its shards)."""
    if results.is_dir():
        if not is_run_dir(results):
            raise click.UsageError(f"{results} is a folder (not a 'locate --ray' run); pass a JSONL journal")
        return results
    try:  # a FIFO or a device would block the read for ever
        regular_file(results, "results")
        if results.suffix.lower() in (".csv", ".geojson"):
            sidecar = journal_path(results, "csv")
            if not sidecar.is_file():
                raise click.UsageError(f"{results} has no journal beside it ({sidecar.name}); pass the JSONL journal")
            return regular_file(sidecar, "results journal")
    except Clue2GeoError as exc:
        fail(exc)
    return results


def table_of(results: Path, journal: Path) -> Path | None:
    """The .csv/.geojson table RESULTS names when its journal is the file beside it (else None)."""
    return results if results != journal and not journal.is_dir() else None


REPORT_HELP_VERIFY = (
    "The HTML report a signature covers, when it is no longer where it was signed (default: that place, "
    "recorded in the signature); given for a signature made without one, verify fails."
)


@audit.command("verify")
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("--anchor", default=None, help="A record_hash noted earlier: the chain must still hold that record.")
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    help="Examiner's Ed25519 public key (as for bundles): the results must be signed by it (audit sign), unchanged "
    "since; repeatable.",
)
@click.option("--report", type=click.Path(path_type=Path), default=None, help=REPORT_HELP_VERIFY)
def audit_verify(results: Path, anchor: str | None, trusted_keys: tuple[str, ...], report: Path | None) -> None:
    """Check the hash chain of a JSONL results journal (for a .csv or .geojson run, its .records.jsonl;
    for a 'locate --ray' run folder, its shards in write order): exit 0 when every record is intact and
    in order, 1 naming the first bad line and why. With --trusted-key, also the examiner's signature.

    The chain shows that no record was edited, removed or reordered since it was written, not who
    wrote it: anyone can write a new valid chain and sign it with a key of their own. Only
    --trusted-key says whose signature it is; without it the output says so. A signature that covers
    the HTML report ('audit sign --report') fails when the report was edited or is missing."""
    key_files(trusted_keys, "--trusted-key")
    journal = journal_of(results)
    try:
        res = verify_run(journal, anchor=anchor) if journal.is_dir() else verify_journal(journal, anchor=anchor)
    except OSError as exc:
        fail(f"cannot read {journal}: {reason(exc)}")
    if not res.ok:
        click.secho(res.message(), fg="red", err=True)
        sys.exit(1)
    table = table_of(results, journal)
    try:
        if trusted_keys:
            good = check_journal_signatures(journal, trusted_keys, table=table, report=report)
            click.echo(res.message())
            for sig in good:
                click.echo(f"ok: {journal} signed by trusted {sig.describe()}, unchanged since{_with_report(sig)}")
            return
        _untrusted_signatures(journal, table, res, report)
    except Clue2GeoError as exc:
        fail(exc)


def _with_report(sig: JournalSignature) -> str:
    return "" if sig.report is None else f" (with the report {sig.report})"


def _untrusted_signatures(journal: Path, table: Path | None, res: AuditResult, report: Path | None) -> None:
    """Without --trusted-key: the chain's verdict, then what each signature beside it is (none checked
    against a key the examiner trusts); exit 1 when one does not hold."""
    sigs = read_journal_signatures(journal)
    click.echo(res.message())
    if not sigs:
        click.secho(
            f"unsigned: the chain shows no record was changed since it was written, not who wrote {journal} "
            "(anyone can write a valid chain); sign with 'clue2geo audit sign', check with --trusted-key",
            fg="yellow",
        )
    bad = False
    for sig in sigs:
        state, why = signature_state(journal, sig, table=table, report=report)
        if state == "holds":
            click.secho(
                f"signature by {sig.describe()} is self-consistent but NOT checked against a key you trust "
                "(it was checked with the key stored beside it, which anyone can make): pass --trusted-key",
                fg="yellow",
            )
        elif state == "appended":  # the signed records are intact; later ones are not covered
            click.secho(f"signature NOT checked against a key you trust; it covers only part: {why}", fg="yellow")
        else:
            bad = True
            click.secho(f"signature NOT checked against a key you trust, and it does not hold: {why}", fg="red")
    if bad:
        sys.exit(1)


@audit.command("sign")
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("--key", required=True, help="Ed25519 private key (PEM or 64 hex, or its file); see 'bundle keygen'.")
@click.option("--examiner", default=None, help="Who signs (name, badge number): stored and signed with the hash.")
@click.option("--case", "case_id", default=None, help="The case reference: stored and signed with the hash.")
@click.option(
    "--report",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Also sign this HTML case report (its sha256, and its path from the signature's folder).",
)
def audit_sign(results: Path, key: str, examiner: str | None, case_id: str | None, report: Path | None) -> None:
    """Check the results' hash chain, then sign them as they are now (sha256, record count, head
    hash, examiner, case) into RESULTS.sig.json beside the journal (a .csv or .geojson run: its
    .records.jsonl; a 'locate --ray' run folder: its shards, into RUN/run.sig.json);
    'audit verify --trusted-key' checks it. With --report, the HTML case report is signed with them:
    verify then fails when it was edited or is missing."""
    key_files((key,), "--key")
    journal = journal_of(results)
    table = table_of(results, journal)
    if report is not None and same_file(report, journal, *([table] if table else [])):
        fail(f"--report {report} is the results; pass the HTML report made from them")
    try:
        sig = sign_journal(journal, key, examiner=examiner, case=case_id, table=table, report=report)
    except Clue2GeoError as exc:
        fail(exc)
    what = "the shards of " if journal.is_dir() else ""
    click.echo(f"signed {what}{journal} ({sig.records} records, head {sig.head}) with {sig.describe()}")
    if table is not None:
        click.echo(f"with the table {table} written from it (sha256 {sig.table_sha256})")
    if report is not None:
        click.echo(f"with the report {report} (sha256 {sig.report_sha256})")
        _check_report_names(report, journal)
    click.echo(f"signature: {signature_path(journal)}")


def _check_report_names(report: Path, journal: Path) -> None:
    """A warning when the signed report does not name these results' digest (the case report states the
    digest it was made from): it was made from other results, or from these before records were added."""
    digest = journal_digest(journal)
    try:
        names = digest.encode() in report.read_bytes()
    except OSError as exc:
        fail(f"cannot read the report {report}: {reason(exc)}")
    if not names:
        warn(
            f"note: {report} does not name these results' digest ({digest}): it was made from other results, "
            "or from these before records were added; make it again with 'clue2geo report' and sign again"
        )


def _stamp_target(results: Path) -> tuple[Path, Path | None]:
    """What a timestamp is over (as for 'audit sign': the journal, or run folder, and the .csv/.geojson
    table written from it), its hash chain checked: a broken chain is not stamped."""
    journal = journal_of(results)
    try:
        res = verify_run(journal) if journal.is_dir() else verify_journal(journal)
    except OSError as exc:
        fail(f"cannot read {journal}: {reason(exc)}")
    if not res.ok:
        fail(f"not stamped: {res.message()}")
    return journal, table_of(results, journal)


@audit.command("stamp-request")
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None, help="The query file [default: RESULTS.tsq].")
@click.option("--overwrite", is_flag=True, help="Replace an existing query file.")
def audit_stamp_request(results: Path, out: Path | None, overwrite: bool) -> None:
    """Write an RFC 3161 timestamp query (.tsq: SHA-256, a nonce, certReq) over the digest 'audit sign'
    covers, to send from any networked machine to a time-stamping authority (TSA); check its
    answer (.tsr) with 'audit stamp-verify'. Nothing leaves this machine but the digest."""
    journal, table = _stamp_target(results)
    out = out or query_path(results)
    try:
        digest = write_query(journal, out, overwrite=overwrite, table=table)
    except (Clue2GeoError, OSError) as exc:
        fail(reason(exc))
    tsr = out.with_suffix(".tsr")
    what = f"{journal}" if table is None else f"the table {table} and its journal {journal}"
    click.echo(f"timestamp query over {what} (sha256 {digest}): {out}")
    click.echo("send it to a TSA from a networked machine, e.g.:")
    click.echo(
        f"  curl -sS -H 'Content-Type: application/timestamp-query' --data-binary @{out} https://freetsa.org/tsr "
        f"-o {tsr}"
    )
    click.echo("(with the TSA's CA certificate, e.g. https://freetsa.org/files/cacert.pem, kept beside the results)")
    click.echo(f"then: clue2geo audit stamp-verify {results} --tsr {tsr} --ca TSA_CA.pem")


@audit.command("stamp-verify")
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("--tsr", "tsr", required=True, type=click.Path(exists=True, path_type=Path), help="The TSA's response.")
@click.option("--ca", "ca", required=True, type=click.Path(exists=True, path_type=Path), help="The TSA's CA (PEM).")
@click.option(
    "--tsq",
    "tsq",
    default=None,
    type=click.Path(path_type=Path),
    help="The query [default: the .tsq beside --tsr "
    "or RESULTS.tsq, when there]: the response must answer it (its nonce).",
)
def audit_stamp_verify(results: Path, tsr: Path, ca: Path, tsq: Path | None) -> None:
    """Check an RFC 3161 timestamp response for RESULTS: granted, over their digest as it is now
    (so records appended or edited since fail), answering the query, and signed by a TSA whose
    certificate chains to --ca. Prints the time (the TSA's clock, UTC) and the TSA; exit 1 naming
    the fault."""
    journal = journal_of(results)
    table = table_of(results, journal)
    if tsq is None:
        tsq = next((q for q in (tsr.with_suffix(".tsq"), query_path(results)) if q.is_file()), None)
    try:
        query = None if tsq is None else read_regular_bytes(tsq, "timestamp query", max_bytes=STAMP_MAX)
        stamp = check_stamp(
            journal,
            read_regular_bytes(tsr, "timestamp response", max_bytes=STAMP_MAX),
            read_regular_bytes(ca, "--ca", max_bytes=STAMP_MAX),
            query,
            table=table,
        )
    except TimestampError as exc:
        fail(f"{tsr}: {exc}")
    except (Clue2GeoError, OSError) as exc:
        fail(reason(exc))
    what = f"{journal}" if table is None else f"{table} with its journal {journal}"
    click.echo(f"ok: {what} (sha256 {stamp.digest}) existed as it is now at {stamp.when()}")
    click.echo(f"stamped by {stamp.tsa}, whose certificate chains to {ca}")
    if not stamp.nonce_checked:
        click.secho("the query (.tsq) was not found: the response's nonce was not checked", fg="yellow")
