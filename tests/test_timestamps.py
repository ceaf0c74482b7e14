"""RFC 3161 trusted timestamps: `audit stamp-request` writes a query over the digest `audit sign`
covers; a TSA (here `openssl ts -reply` with a CA and TSA certificate made in the test) answers it;
`audit stamp-verify` checks the answer against the results as they are now and the TSA's CA."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from tsa import answer, make_pki

from clue2geo_sdk.cli import main
from clue2geo_sdk.cluster.shards import ShardWriter
from clue2geo_sdk.evidence.attestation import journal_digest, results_digest
from clue2geo_sdk.evidence.report.render import render_report
from clue2geo_sdk.evidence.timestamps import TimestampError, build_query, parse_query
from clue2geo_sdk.runs.journal import RecordWriter, read_journal

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    return {"good": make_pki(root / "good", "Good"), "other": make_pki(root / "other", "Other")}


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    out = tmp_path / "results.jsonl"
    w = RecordWriter(out, "jsonl")
    for i in range(3):
        w.write({"path": f"img{i}.jpg", "status": "ok", "lat": i / 3, "lon": 2.0})
    w.close()
    return out


def _cli(*args: str | Path):
    return CliRunner().invoke(main, ["audit", *map(str, args)])


def _stamped(journal: Path, pki: dict[str, Path], signer: str = "good") -> Path:
    res = _cli("stamp-request", journal)
    assert res.exit_code == 0, res.output
    return answer(journal.with_name(journal.name + ".tsq"), pki[signer], journal.with_name("results.tsr"))


def _verify(journal: Path, tsr: Path, ca: Path, *args: str):
    return _cli("stamp-verify", journal, "--tsr", tsr, "--ca", ca, *args)


def test_a_query_is_over_the_signed_digest_and_openssl_reads_it(journal: Path) -> None:
    res = _cli("stamp-request", journal)
    tsq = journal.with_name("results.jsonl.tsq")
    digest = journal_digest(journal)
    assert res.exit_code == 0 and digest in res.output and "curl" in res.output and str(tsq) in res.output
    query = parse_query(tsq.read_bytes())
    assert query.digest.hex() == digest and query.nonce is not None
    text = subprocess.run(["openssl", "ts", "-query", "-in", tsq, "-text"], capture_output=True, text=True, check=True)
    assert "sha256" in text.stdout and "Certificate required: yes" in text.stdout
    assert digest[:2] in text.stdout.replace(" ", "").replace("-", "").lower()
    again = _cli("stamp-request", journal)
    assert again.exit_code == 1 and "exists" in again.output and "--overwrite" in again.output
    assert _cli("stamp-request", journal, "--overwrite").exit_code == 0
    assert parse_query(tsq.read_bytes()).nonce != query.nonce  # a fresh nonce each time


def test_a_stamp_verifies_with_the_time_and_the_tsa(journal: Path, pki: dict[str, Path]) -> None:
    tsr = _stamped(journal, pki)
    res = _verify(journal, tsr, pki["good"] / "ca.crt")
    assert res.exit_code == 0, res.output
    assert "existed as it is now at 20" in res.output and "+00:00" in res.output
    assert "Good TSA" in res.output and "not checked" not in res.output


@pytest.mark.parametrize("change", ["append", "edit"])
def test_results_changed_after_the_stamp_fail(journal: Path, pki: dict[str, Path], change: str) -> None:
    tsr = _stamped(journal, pki)
    if change == "append":
        w = RecordWriter(journal, "jsonl")
        w.write({"path": "late.jpg", "status": "ok", "lat": 1.0, "lon": 1.0})
        w.close()
    else:
        data = bytearray(journal.read_bytes())
        data[data.index(b"img1")] = ord("I")
        journal.write_bytes(bytes(data))
    res = _verify(journal, tsr, pki["good"] / "ca.crt")
    assert res.exit_code == 1 and "the results changed after they were stamped" in res.output
    assert str(journal) in res.output and "Traceback" not in res.output


def test_a_tsa_of_another_ca_fails(journal: Path, pki: dict[str, Path]) -> None:
    tsr = _stamped(journal, pki, signer="other")
    res = _verify(journal, tsr, pki["good"] / "ca.crt")
    assert res.exit_code == 1 and "does not chain to the given CA (Verify error:" in res.output
    assert _verify(journal, tsr, pki["other"] / "ca.crt").exit_code == 0


def test_a_response_for_another_digest_fails(journal: Path, pki: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other.tsq"
    (tmp_path / "other.jsonl").write_bytes(b"other results\n")
    other.write_bytes(build_query(tmp_path / "other.jsonl"))
    tsr = answer(other, pki["good"], tmp_path / "other.tsr")
    assert _cli("stamp-request", journal).exit_code == 0
    res = _verify(journal, tsr, pki["good"] / "ca.crt", "--tsq", str(journal) + ".tsq")
    assert res.exit_code == 1 and "another query" in res.output
    res = _verify(journal, tsr, pki["good"] / "ca.crt")  # its own other.tsq beside it: the digest is not ours
    assert res.exit_code == 1 and "after they were stamped" in res.output


def test_a_response_to_another_query_of_the_same_results_fails_on_the_nonce(
    journal: Path, pki: dict[str, Path]
) -> None:
    tsr = _stamped(journal, pki)
    assert _cli("stamp-request", journal, "--overwrite").exit_code == 0  # a new nonce
    res = _verify(journal, tsr, pki["good"] / "ca.crt", "--tsq", str(journal) + ".tsq")
    assert res.exit_code == 1 and "nonce" in res.output


def test_garbage_or_missing_pieces_fail_cleanly(journal: Path, pki: dict[str, Path], tmp_path: Path) -> None:
    junk = tmp_path / "junk.tsr"
    junk.write_bytes(b"\x30\x82\x01\x00 not DER at all")
    res = _verify(journal, junk, pki["good"] / "ca.crt")
    assert res.exit_code == 1 and "not a timestamp response" in res.output and "Traceback" not in res.output
    tsr = _stamped(journal, pki)
    res = _verify(journal, tsr, pki["good"] / "tsa.cnf")
    assert res.exit_code == 1 and "no PEM certificate" in res.output and "Traceback" not in res.output
    (tmp_path / "results.tsq").unlink(missing_ok=True)
    res = _verify(journal, tsr, pki["good"] / "ca.crt", "--tsq", str(junk))
    assert res.exit_code == 1 and "not a timestamp query" in res.output
    with pytest.raises(TimestampError, match="not a timestamp query"):
        parse_query(b"\x30\x03\x02\x01")


def test_without_the_query_the_nonce_is_said_unchecked(journal: Path, pki: dict[str, Path]) -> None:
    tsr = _stamped(journal, pki)
    Path(str(journal) + ".tsq").unlink()
    res = _verify(journal, tsr, pki["good"] / "ca.crt")
    assert res.exit_code == 0 and "nonce was not checked" in res.output


def test_a_broken_chain_is_not_stamped(journal: Path) -> None:
    lines = journal.read_bytes().split(b"\n")
    journal.write_bytes(b"\n".join([lines[1], lines[0], *lines[2:]]))
    res = _cli("stamp-request", journal)
    assert res.exit_code == 1 and "not stamped" in res.output
    assert not Path(str(journal) + ".tsq").exists()


def test_a_run_folder_is_stamped_over_its_shards(pki: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    w = ShardWriter(run, records_per_shard=2, parquet=False)
    w.write([{"path": f"img{i}.jpg", "status": "ok", "lat": float(i)} for i in range(3)])
    w.close()
    res = _cli("stamp-request", run)
    tsq = tmp_path / "run.tsq"
    assert res.exit_code == 0 and journal_digest(run) in res.output and tsq.is_file(), res.output
    tsr = answer(tsq, pki["good"], tmp_path / "run.tsr")
    assert _verify(run, tsr, pki["good"] / "ca.crt").exit_code == 0
    shard = sorted((run / "shards").glob("*.jsonl"))[-1]
    shard.write_bytes(shard.read_bytes().replace(b"img2", b"IMG2"))
    res = _verify(run, tsr, pki["good"] / "ca.crt")
    assert res.exit_code == 1 and "the results changed after they were stamped" in res.output


def test_openssl_checks_the_same_response_over_the_journal_itself(journal: Path, pki: dict[str, Path]) -> None:
    """A journal is stamped over its own bytes: another tool (openssl) verifies the response from the file."""
    tsr = _stamped(journal, pki)
    ca = pki["good"] / "ca.crt"
    cmd = ["openssl", "ts", "-verify", "-data", str(journal), "-in", str(tsr), "-CAfile", str(ca)]
    ok = subprocess.run([*cmd, "-untrusted", str(pki["good"] / "tsa.crt")], capture_output=True, text=True)
    assert ok.returncode == 0 and "Verification: OK" in ok.stdout, ok.stderr
    journal.write_bytes(journal.read_bytes() + b"\n")
    changed = subprocess.run([*cmd, "-untrusted", str(pki["good"] / "tsa.crt")], capture_output=True, text=True)
    assert changed.returncode != 0


def test_the_report_names_the_digest_that_is_stamped_and_signed(journal: Path, tmp_path: Path) -> None:
    """The case report says which results it was made from by the same digest stamp-request covers."""
    html = render_report(read_journal(journal).records, results_path=journal)
    assert f"sha256 <code>{journal_digest(journal)}</code>" in html
    run = tmp_path / "run"
    w = ShardWriter(run, records_per_shard=2, parquet=False)
    w.write([{"path": f"img{i}.jpg", "status": "ok", "lat": float(i)} for i in range(3)])
    w.close()
    html = render_report([], results_path=run)
    assert f"run digest over its shards <code>{journal_digest(run)}</code>" in html


def test_a_csv_run_is_stamped_with_its_table(pki: dict[str, Path], tmp_path: Path) -> None:
    """`stamp-request results.csv` stamps what `audit sign results.csv` signs: the journal beside it and
    the table written from it. An edited table fails though the journal is intact; a stamp over the
    journal alone is said to be one."""
    table = tmp_path / "results.csv"
    w = RecordWriter(table, "csv")
    for i in range(3):
        w.write({"path": f"img{i}.jpg", "status": "ok", "lat": i / 3, "lon": 2.0})
    w.close()
    journal = tmp_path / "results.csv.records.jsonl"
    res = _cli("stamp-request", table)
    tsq = tmp_path / "results.csv.tsq"
    digest = results_digest(journal, table)
    assert res.exit_code == 0 and digest in res.output and "the table" in res.output, res.output
    assert digest not in (journal_digest(journal), hashlib.sha256(table.read_bytes()).hexdigest())
    table_sha = hashlib.sha256(table.read_bytes()).hexdigest()
    statement = f"clue2geo journal and table v1\n{journal_digest(journal)}\n{table_sha}\n"
    assert parse_query(tsq.read_bytes()).digest.hex() == hashlib.sha256(statement.encode()).hexdigest() == digest
    tsr = answer(tsq, pki["good"], tmp_path / "results.csv.tsr")
    ok = _verify(table, tsr, pki["good"] / "ca.crt")
    assert ok.exit_code == 0 and f"ok: {table} with its journal {journal}" in ok.output, ok.output

    original = table.read_bytes()
    table.write_bytes(original.replace(b"img1", b"IMG1"))
    res = _verify(table, tsr, pki["good"] / "ca.crt")
    assert res.exit_code == 1 and "the results changed after they were stamped" in res.output
    assert str(table) in res.output and "Traceback" not in res.output
    table.write_bytes(original)
    assert _verify(table, tsr, pki["good"] / "ca.crt").exit_code == 0

    assert _cli("stamp-request", journal).exit_code == 0  # the journal alone
    alone = answer(tmp_path / "results.csv.records.jsonl.tsq", pki["good"], tmp_path / "alone.tsr")
    assert _verify(journal, alone, pki["good"] / "ca.crt").exit_code == 0
    res = _verify(table, alone, pki["good"] / "ca.crt", "--tsq", str(tmp_path / "results.csv.records.jsonl.tsq"))
    assert res.exit_code == 1 and "covers the journal" in res.output and "alone, not the table" in res.output
