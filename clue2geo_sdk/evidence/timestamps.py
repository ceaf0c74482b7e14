"""RFC 3161 trusted timestamps over results: a third party (a time-stamping authority) vouches that
the results existed, as they are, at a given time.

A signature (:mod:`.attestation`) says who vouches for the results; its ``signed_utc`` is the
signer's own clock. A timestamp token says *when*, on the TSA's clock, under the TSA's key. The
machine that holds the results may be offline: ``audit stamp-request`` writes a timestamp query
(``.tsq``) over the same digest ``audit sign`` covers (:func:`journal_digest`), the examiner carries
it to a networked machine and sends it (curl, ``openssl ts``), and ``audit stamp-verify`` checks the
response (``.tsr``) against the results as they are now and the TSA's CA certificate. For a ``.csv``
or ``.geojson`` run, which ``audit sign`` signs with its journal, the stamp covers both
(:func:`~.attestation.results_digest`: a statement of the journal's and the table's sha256s), so an
edited table fails as an edited journal does.

Nothing is stored besides the .tsq and the .tsr: the query holds the digest and the nonce.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path

import attrs
from cryptography import x509
from rfc3161_client import (
    HashAlgorithm,
    PKIStatus,
    TimestampRequestBuilder,
    TimeStampResponse,
    VerificationError,
    VerifierBuilder,
    decode_timestamp_response,
)
from rfc3161_client._rust import (
    parse_timestamp_request,  # the library's own DER reader of a TimeStampReq (no public alias in 1.0)
)

from ..errors import Clue2GeoError
from ..files import atomic_write
from .attestation import journal_digest, results_digest, results_digest_input

QUERY_SUFFIX = ".tsq"
#: A query, a response, a CA chain: a few KB each; anything larger is not one.
STAMP_MAX = 1 << 20
SHA256_OID = "2.16.840.1.101.3.4.2.1"
_OPENSSL_SAID = re.compile(r'data: "([^"]+)"')


class TimestampError(Clue2GeoError, ValueError):
    """A timestamp query or response that is malformed, not granted, not over these results, or not
    signed by a TSA that chains to the given CA."""


@attrs.frozen(kw_only=True)
class StampQuery:
    """What a timestamp query asks to be stamped: a SHA-256 digest, and the nonce that ties the
    response to this query."""

    digest: bytes
    nonce: int | None


@attrs.frozen(kw_only=True)
class Stamp:
    """A timestamp response that holds for the results: when (the TSA's clock, UTC) and by whom."""

    gen_time: _dt.datetime
    tsa: str
    digest: str
    nonce_checked: bool

    def when(self) -> str:
        return self.gen_time.astimezone(_dt.UTC).isoformat()


def query_path(results: Path) -> Path:
    """The default query file: ``RESULTS.tsq`` beside RESULTS (a journal, a table, or a run folder)."""
    results = Path(results)
    return results.with_name(results.name + QUERY_SUFFIX)


def build_query(target: Path, table: Path | None = None) -> bytes:
    """A DER TimeStampReq (RFC 3161 §2.4.1) over ``target``'s digest (:func:`results_digest`: with
    ``table``, over the journal and the table written from it), built by rfc3161-client: SHA-256, a
    random nonce, certReq true (the response then carries the TSA certificate to check). A journal
    alone is stamped over its own bytes, so ``openssl ts -verify -data results.jsonl`` checks the same
    response."""
    request = (
        TimestampRequestBuilder()
        .data(results_digest_input(target, table))
        .hash_algorithm(HashAlgorithm.SHA256)
        .nonce(nonce=True)
        .cert_request(cert_request=True)
        .build()
    )
    return bytes(request.as_bytes())


def parse_query(data: bytes) -> StampQuery:
    """The digest and nonce of a DER TimeStampReq (ours, or one made by ``openssl ts -query``)."""
    try:
        request = parse_timestamp_request(data)
        algorithm = request.message_imprint.hash_algorithm.dotted_string
        digest = bytes(request.message_imprint.message)
    except ValueError as exc:
        raise TimestampError(f"not a timestamp query ({exc})") from None
    if algorithm != SHA256_OID:
        raise TimestampError(f"not a timestamp query over SHA-256 ({algorithm})")
    return StampQuery(digest=digest, nonce=request.nonce)


def _tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """The element at ``pos``: (tag, start of its content, end of it); bounds-checked."""
    if pos + 2 > end:
        raise ValueError("truncated")
    tag, first = buf[pos], buf[pos + 1]
    pos += 2
    if first & 0x80:
        size = first & 0x7F
        if not 0 < size <= 4 or pos + size > end:
            raise ValueError("bad length")
        first, pos = int.from_bytes(buf[pos : pos + size], "big"), pos + size
    if pos + first > end:
        raise ValueError("truncated")
    return tag, pos, pos + first


def _children(buf: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    out = []
    while start < end:
        out.append(_tlv(buf, start, end))
        start = out[-1][2]
    return out


def write_query(target: Path, out: Path, *, overwrite: bool = False, table: Path | None = None) -> str:
    """Write a timestamp query over ``target``'s digest (a journal, or a run folder's shards, and
    ``table`` when given: what ``audit sign`` covers) to ``out``; return the digest (hex). An existing
    ``out`` is kept unless ``overwrite``: a response to it may still be on its way."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise TimestampError(f"{out} exists (a query sent earlier?); pass --overwrite to replace it, or --out")
    data = build_query(Path(target), table)
    atomic_write(out, data, text=False)
    return parse_query(data).digest.hex()


def sort_certificates(data: bytes) -> bytes:
    """``data`` with the certificates of its token in DER order. Some TSAs (openssl's with ``-chain``)
    embed their chain in chain order, which DER's SET OF forbids and rfc3161-client 1.0 refuses
    (``InvalidSetOrdering``); the set is outside what the TSA signs, and sorting it keeps every length,
    so the token is unchanged. The one place this module walks DER itself (``_tlv``), as a workaround;
    everything else is rfc3161-client's."""
    try:
        _, start, end = _tlv(data, 0, len(data))
        token = _children(data, start, end)[1]  # [status, timeStampToken (a ContentInfo)]
        explicit = _children(data, token[1], token[2])[1]
        signed = _children(data, explicit[1], explicit[2])[0]
        certs = next(f for f in _children(data, signed[1], signed[2]) if f[0] == 0xA0)
    except (ValueError, IndexError, StopIteration):
        return data
    parts = sorted(data[a:b] for a, b in _spans(data, certs[1], certs[2]))
    return data[: certs[1]] + b"".join(parts) + data[certs[2] :]


def _spans(data: bytes, start: int, end: int) -> list[tuple[int, int]]:
    """Where each element between ``start`` and ``end`` begins and ends (header included)."""
    out, pos = [], start
    while pos < end:
        pos_end = _tlv(data, pos, end)[2]
        out.append((pos, pos_end))
        pos = pos_end
    return out


def read_response(data: bytes) -> TimeStampResponse:
    """A DER TimeStampResp that was granted (a rejection carries no token: say what the TSA said)."""
    try:
        resp = decode_timestamp_response(sort_certificates(data))
    except ValueError:
        raise TimestampError("not a timestamp response (malformed DER; was the .tsr saved whole?)") from None
    if resp.status not in (PKIStatus.GRANTED, PKIStatus.GRANTED_WITH_MODS):
        said = "; ".join(resp.status_string) or "no reason given"
        raise TimestampError(f"the TSA did not grant the timestamp (status {resp.status}: {said})")
    try:
        algo = resp.tst_info.message_imprint.hash_algorithm.dotted_string
    except ValueError:
        raise TimestampError("not a timestamp response (its token is malformed)") from None
    if algo != SHA256_OID:
        raise TimestampError(f"the timestamp is over a digest other than SHA-256 ({algo})")
    return resp


def load_ca(pem: bytes) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """The certificates of a CA file (PEM, one or more): (self-signed roots, intermediates)."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise TimestampError("the CA file holds no PEM certificate") from None
    roots = [c for c in certs if c.subject == c.issuer]
    return roots or certs[:1], [c for c in certs if c not in roots]


def signer_name(resp: TimeStampResponse) -> str:
    """The TSA's name: the subject of the certificate the token is signed with (else its TSA field)."""
    infos = list(resp.signed_data.signer_infos)
    for der in resp.signed_data.certificates:
        cert = x509.load_der_x509_certificate(der)
        if infos and cert.issuer == infos[0].issuer and cert.serial_number == infos[0].serial_number:
            return cert.subject.rfc4514_string()
    try:
        return str(resp.tst_info.name.value)
    except (ValueError, AttributeError):
        return "(unnamed TSA)"


def _changed(target: Path, table: Path | None, now: str, stamped: bytes, asked: StampQuery | None) -> str:
    """Why the stamped digest is not the results' digest now, in words."""
    if table is not None and stamped.hex() == journal_digest(target):
        return (
            f"the timestamp covers the journal {target} alone, not the table {table}: check it with "
            f"'clue2geo audit stamp-verify {target}', or stamp {table} itself"
        )
    what = f"{target} has sha256" if table is None else f"the table {table} with its journal {target} have digest"
    other = "" if asked else " (or the response is for other results)"
    return (
        f"the results changed after they were stamped: {what} {now} now, the timestamp is over {stamped.hex()}{other}"
    )


def check_stamp(
    target: Path, response: bytes, ca_pem: bytes, query: bytes | None = None, *, table: Path | None = None
) -> Stamp:
    """Check a timestamp response against ``target`` (and ``table``, the .csv/.geojson written from it)
    as it is now: granted, over its current digest (:func:`results_digest`), answering ``query`` (its
    nonce and digest) when given, and signed by a TSA whose certificate chains to the CA in
    ``ca_pem``; raise :class:`TimestampError` naming the first fault."""
    resp = read_response(response)
    stamped = resp.tst_info.message_imprint.message
    asked = None if query is None else parse_query(query)
    if asked is not None and asked.digest != stamped:
        raise TimestampError("the response answers another query (it is over another digest than the .tsq)")
    if asked is not None and asked.nonce is not None and resp.tst_info.nonce != asked.nonce:
        raise TimestampError("the response answers another query (its nonce is not the .tsq's)")
    now = results_digest(Path(target), table)
    if stamped.hex() != now:
        raise TimestampError(_changed(Path(target), table, now, stamped, asked))
    roots, intermediates = load_ca(ca_pem)
    builder = VerifierBuilder(roots=roots, intermediates=intermediates)
    try:
        builder.build().verify(resp, stamped)
    except (VerificationError, ValueError) as exc:
        said = _OPENSSL_SAID.search(str(exc))  # openssl's error stack, one line of it
        why = said.group(1) if said else str(exc)
        raise TimestampError(f"the TSA's signature does not chain to the given CA ({why})") from None
    return Stamp(gen_time=resp.tst_info.gen_time, tsa=signer_name(resp), digest=now, nonce_checked=asked is not None)


__all__ = [
    "QUERY_SUFFIX",
    "Stamp",
    "StampQuery",
    "TimestampError",
    "build_query",
    "check_stamp",
    "load_ca",
    "parse_query",
    "query_path",
    "read_response",
    "signer_name",
    "sort_certificates",
    "write_query",
]
