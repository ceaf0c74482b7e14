"""The case report as court-ready evidence (issue 21): it states the bundle's validation in one line,
calls each result an investigative lead with its ranked alternatives (never a conclusion), and shows
each RFC 3161 timestamp saved beside the results (time, TSA, verified or not).

The TSA is openssl's own (``openssl ts -reply``) with a CA and TSA certificate made in the test
(tests/tsa.py, shared with tests/test_timestamps.py). The validation is a ``validation.json`` written here with the contract's fields and attached
(``bundle.attach.attach``) to a copy of the demo bundle.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tsa import answer, make_pki, ssl

from clue2geo_sdk.bundle.attach import attach
from clue2geo_sdk.bundle.manifest import Bundle
from clue2geo_sdk.bundle.validation import NO_VALIDATION, VALIDATION_FORMAT
from clue2geo_sdk.cli import main
from clue2geo_sdk.evidence.attestation import journal_digest
from clue2geo_sdk.evidence.report.leads import ALTERNATIVES_SHOWN
from clue2geo_sdk.evidence.report.render import render_report
from clue2geo_sdk.evidence.report.stamps import response_files
from clue2geo_sdk.runs.journal import RecordWriter, read_journal

CHROMIUM = Path(os.environ.get("CLUE2GEO_CHROMIUM", "/usr/bin/chromium"))


# --- a TSA made in the test (tests/tsa.py) ----------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    return {"good": make_pki(root / "good", "Good"), "other": make_pki(root / "other", "Other")}


def _openssl_time(tsr: Path) -> str:
    """The response's time as openssl reads it ("Time stamp: Dec  4 21:12:01 2026 GMT"), in ISO form."""
    text = ssl("ts", "-reply", "-in", tsr, "-text", cwd=tsr.parent)
    said = re.search(r"Time stamp: (.+) GMT", text)
    assert said, text
    when = dt.datetime.strptime(" ".join(said.group(1).split()), "%b %d %H:%M:%S %Y").replace(tzinfo=dt.UTC)
    return when.isoformat()


# --- results, bundles, the report --------------------------------------------------------------------


def _answers(n: int) -> list[dict[str, Any]]:
    """``n`` ranked answers, one degree apart along a diagonal from Beijing."""
    return [
        {"rank": i + 1, "lat": 40.0 + i, "lon": 116.0 + i, "score": round(0.3 - i / 100, 3),
         "confidence": round(0.6 / (i + 1), 4), "members": [i], "sources": ["direct"], "extent_km": 2.0 * i}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    out = tmp_path / "results.jsonl"
    w = RecordWriter(out, "jsonl")
    w.write({"path": "a.jpg", "status": "ok", "lat": 40.0, "lon": 116.0, "confidence": 0.6, "answers": _answers(3)})
    w.write({"path": "b.jpg", "status": "ok", "lat": 40.0, "lon": 116.0, "confidence": 0.6, "answers": _answers(15)})
    w.close()
    return out


def _report(journal: Path, *args: str | Path) -> tuple[Any, str]:
    """``clue2geo report`` of ``journal`` with ``args``: the CLI result and the page's text."""
    page = journal.with_name("case.html")
    page.unlink(missing_ok=True)
    res = CliRunner().invoke(main, ["report", str(journal), "--out", str(page), *map(str, args)])
    return res, page.read_text(encoding="utf-8") if page.exists() else ""


def _stamps(page: str) -> list[tuple[str, str]]:
    """(data-stamp, text) of each timestamp line of the page."""
    found = re.findall(r'<li class="stamp" data-stamp="(\w+)">(.*?)</li>', page, flags=re.S)
    return [(state, _Text(body).text) for state, body in found]


class _Text(HTMLParser):
    """The text of an HTML fragment, whitespace collapsed."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.feed(fragment)
        self.text = " ".join(" ".join(self.parts).split())

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _stamp(journal: Path, pki: Path, tsr_name: str) -> Path:
    """``audit stamp-request`` (once), and the TSA's answer saved as ``tsr_name`` beside the results."""
    tsq = journal.with_name(journal.name + ".tsq")
    if not tsq.exists():
        res = CliRunner().invoke(main, ["audit", "stamp-request", str(journal)])
        assert res.exit_code == 0, res.output
    return answer(tsq, pki, journal.with_name(tsr_name))


def _bundle_copy(src: Path, dest: Path) -> Path:
    """A copy of the demo bundle that can be changed (hard links: attach replaces the manifest, never
    writes into a file in place)."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dest, copy_function=link)
    return dest


def _validation(path: Path, models_digest: str) -> Path:
    """A validation.json with the contract's fields (clue2geo-validation/1)."""
    acc = {"1": (0.02, 0.0, 0.05), "25": (0.41, 0.38, 0.44), "200": (0.55, 0.5, 0.6), "750": (0.7, 0.66, 0.74)}
    acc["2500"] = (0.9, 0.87, 0.93)
    data = {
        "format": VALIDATION_FORMAT,
        "evalset": {"name": "handset-120", "n": 120, "digest": "0" * 64},
        "bundle": {"models_digest": models_digest},
        "accuracy": {k: {"value": v, "low": lo, "high": hi} for k, (v, lo, hi) in acc.items()},
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6371.0088 * math.asin(math.sqrt(a))


# --- the tests ---------------------------------------------------------------------------------------


def test_the_bundles_validation_is_stated_in_one_line(demo_bundle: Path, journal: Path, tmp_path: Path) -> None:
    res, page = _report(journal)
    assert res.exit_code == 0, res.output
    assert 'id="bundle-validation" class="warn">No bundle was given to this report' in page
    bundle = Bundle.open(_bundle_copy(demo_bundle, tmp_path / "bundle"), verify=False)
    res, page = _report(journal, "--bundle", bundle.root)
    assert res.exit_code == 0, res.output
    assert f'Validation: <span id="bundle-validation">{NO_VALIDATION}</span>' in page
    assert f"models digest <code>{bundle.models_digest}</code>" in page
    validated = attach(
        bundle, "validation", {"report": _validation(tmp_path / "validation.json", bundle.models_digest)},
        params={"models_digest": bundle.models_digest},
    )  # fmt: skip
    assert validated.digest != bundle.digest and validated.models_digest == bundle.models_digest
    res, page = _report(journal, "--bundle", bundle.root)
    assert res.exit_code == 0, res.output
    line = re.search(r'<span id="bundle-validation">(.*?)</span>', page)
    assert line and line.group(1).startswith("validated on handset-120 (n = 120): 25 km 41 % [38–44]")
    assert "750 km 70 % [66–74], 2500 km 90 % [87–93]" in line.group(1) and NO_VALIDATION not in page
    assert f"manifest digest <code>{validated.digest}</code>" in page
    # the validation is placed where the bundle is described, before the results' checks and the images
    assert page.index("bundle-validation") < page.index("Hash chain of the results") < page.index('id="image-1"')


def test_each_result_is_an_investigative_lead_with_ranked_alternatives(journal: Path) -> None:
    records = read_journal(journal).records
    page = render_report(records, results_path=journal)
    opinion = _Text(re.search(r'<div class="opinion" id="opinion">(.*?)</div>', page, flags=re.S).group(1)).text
    assert "investigative lead with its ranked alternatives, not a conclusion" in opinion
    assert "ISO 21043-4" in opinion and "not an evaluative opinion" in opinion
    tables = re.findall(r'<table class="answers">(.*?)</table>', page, flags=re.S)
    assert len(tables) == 2
    rows = [re.findall(r'<tr class="(\w+)">(.*?)</tr>', t, flags=re.S) for t in tables]
    assert [kind for kind, _ in rows[0]] == ["lead", "alternative", "alternative"]
    assert len(rows[1]) == 1 + ALTERNATIVES_SHOWN and "4 further alternative(s) are in the record" in page
    lead = records[0]["answers"][0]
    for (_, row), a in zip(rows[0][1:], records[0]["answers"][1:], strict=True):
        cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
        want = _haversine_km(lead["lat"], lead["lon"], a["lat"], a["lon"])
        assert cells[1] == "alternative" and cells[2] == f"{a['lat']:.4f}, {a['lon']:.4f}"
        assert abs(float(cells[3].removesuffix(" km")) - want) <= 0.5, (cells[3], want)
        assert cells[4] == f"{a['confidence']:.3f}" and cells[5] == f"{a['score']:.3f}"
    assert "the lead (rank 1) and its 2 ranked alternative(s)" in page
    assert "<th>Investigative lead</th>" in page and "(a lead to check, not a conclusion)" in page
    assert "<th>Prediction</th>" not in page


def test_a_verified_stamp_shows_its_time_and_tsa(journal: Path, pki: dict[str, Path]) -> None:
    tsr = _stamp(journal, pki["good"], "results.jsonl.tsr")
    assert response_files(journal) == [tsr]
    res, page = _report(journal, "--tsa-ca", pki["good"] / "ca.crt")
    assert res.exit_code == 0, res.output
    [(state, text)] = _stamps(page)
    assert state == "verified" and "verified: chains to the given CA" in text and "nonce" not in text
    assert _openssl_time(tsr) in text and "CN=Good TSA" in text and "results.jsonl.tsr" in text
    assert 'data-stamps="1"' in page
    # without the TSA's CA: the same time and TSA, said to be not verified
    res, page = _report(journal)
    [(state, text)] = _stamps(page)
    assert state == "unverified" and "not verified (pass --tsa-ca)" in text
    assert _openssl_time(tsr) in text and "CN=Good TSA" in text and "verified:" not in text
    # another TSA's CA does not verify it
    res, page = _report(journal, "--tsa-ca", pki["other"] / "ca.crt")
    [(state, text)] = _stamps(page)
    assert state == "failed" and "does not hold: the TSA's signature does not chain to the given CA" in text


def test_stamps_from_several_tsas_are_each_checked(journal: Path, pki: dict[str, Path]) -> None:
    """The convention: RESULTS.tsr, RESULTS.*.tsr (one per TSA) and STEM.tsr; --tsa-ca is repeatable."""
    good = _stamp(journal, pki["good"], "results.tsr")
    other = _stamp(journal, pki["other"], "results.jsonl.other.tsr")
    (journal.parent / "unrelated.tsr").write_bytes(good.read_bytes())  # another file's name: not looked at
    assert response_files(journal) == sorted([good, other])
    res, page = _report(journal, "--tsa-ca", pki["good"] / "ca.crt")
    states = dict((text.split(":")[0].strip(), state) for state, text in _stamps(page))
    assert states == {"results.jsonl.other.tsr": "failed", "results.tsr": "verified"}, states
    res, page = _report(journal, "--tsa-ca", pki["good"] / "ca.crt", "--tsa-ca", pki["other"] / "ca.crt")
    assert res.exit_code == 0, res.output
    assert [s for s, _ in _stamps(page)] == ["verified", "verified"] and "CN=Other TSA" in page


def test_a_stamp_fails_after_the_journal_is_edited(journal: Path, pki: dict[str, Path]) -> None:
    _stamp(journal, pki["good"], "results.jsonl.tsr")
    stamped = journal_digest(journal)
    data = bytearray(journal.read_bytes())
    data[data.index(b"a.jpg")] = ord("A")
    journal.write_bytes(bytes(data))
    for args in (("--tsa-ca", pki["good"] / "ca.crt"), ()):
        res, page = _report(journal, *args)
        assert res.exit_code == 0, res.output
        [(state, text)] = _stamps(page)
        assert state == "failed" and "does not cover these results" in text
        assert stamped in text and journal_digest(journal) in text


def test_an_unreadable_response_is_named_and_the_report_still_made(
    journal: Path, pki: dict[str, Path], tmp_path: Path
) -> None:
    tsr = _stamp(journal, pki["good"], "results.jsonl.tsr")
    journal.with_name("results.jsonl.junk.tsr").write_bytes(b"\x30\x82\x01\x00 not DER at all")
    journal.with_name("results.jsonl.cut.tsr").write_bytes(tsr.read_bytes()[: len(tsr.read_bytes()) // 2])
    os.mkfifo(journal.with_name("results.jsonl.fifo.tsr"))  # would block a plain read for ever
    res, page = _report(journal, "--tsa-ca", pki["good"] / "ca.crt")
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    states = {text.split(":")[0].strip(): (state, text) for state, text in _stamps(page)}
    assert states["results.jsonl.tsr"][0] == "verified"
    for name in ("results.jsonl.junk.tsr", "results.jsonl.cut.tsr"):
        assert states[name][0] == "unreadable" and "not a timestamp response" in states[name][1], states[name]
    assert (
        states["results.jsonl.fifo.tsr"][0] == "unreadable"
        and "not a regular file" in states["results.jsonl.fifo.tsr"][1]
    )


def test_a_bad_tsa_ca_is_refused_before_anything_is_written(journal: Path, pki: dict[str, Path]) -> None:
    res, page = _report(journal, "--tsa-ca", pki["good"] / "tsa.cnf")
    assert res.exit_code == 1 and "--tsa-ca" in res.output and "holds no PEM certificate" in res.output
    assert page == "" and "Traceback" not in res.output


def test_no_stamp_says_where_the_report_looked(journal: Path) -> None:
    page = render_report(read_journal(journal).records, results_path=journal)
    assert 'data-stamps="0"' in page and "results.jsonl.tsr, results.jsonl.*.tsr or results.tsr" in page


def test_a_run_folders_stamp_is_found_beside_it(pki: dict[str, Path], tmp_path: Path) -> None:
    from clue2geo_sdk.cluster.shards import ShardWriter  # only this test writes a run folder

    run = tmp_path / "run"
    w = ShardWriter(run, records_per_shard=2, parquet=False)
    w.write([{"path": f"img{i}.jpg", "status": "ok", "lat": float(i), "lon": 0.0} for i in range(3)])
    w.close()
    assert CliRunner().invoke(main, ["audit", "stamp-request", str(run)]).exit_code == 0
    answer(tmp_path / "run.tsq", pki["good"], tmp_path / "run.tsr")
    res = CliRunner().invoke(
        main, ["report", str(run), "--out", str(tmp_path / "r.html"), "--tsa-ca", str(pki["good"] / "ca.crt")]
    )
    assert res.exit_code == 0, res.output
    [(state, text)] = _stamps((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert state == "verified" and text.split(":")[0].strip() == "run.tsr"


def test_the_evidence_header_renders_in_chromium(journal: Path, pki: dict[str, Path], tmp_path: Path) -> None:
    """The new header parts are real page text in a browser (the layout test is tests/test_case_report.py)."""
    _stamp(journal, pki["good"], "results.jsonl.tsr")
    journal.with_name("results.jsonl.junk.tsr").write_bytes(b"junk")
    res, page = _report(journal, "--tsa-ca", pki["good"] / "ca.crt")
    assert res.exit_code == 0, res.output
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with 'apt-get install -y --no-install-recommends chromium'")
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
           journal.with_name("case.html").resolve().as_uri()]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = _Text(dom.stdout).text
    assert "No bundle was given to this report" in text and "What these results are" in text
    assert "verified: chains to the given CA" in text and "unreadable: not a timestamp response" in text
    assert text.count("An investigative lead, not a conclusion") == 2


def test_a_tables_stamp_is_checked_over_the_journal_and_the_table(pki: dict[str, Path], tmp_path: Path) -> None:
    table = tmp_path / "results.csv"
    w = RecordWriter(table, "csv")
    w.write({"path": "a.jpg", "status": "ok", "lat": 40.0, "lon": 116.0, "confidence": 0.6, "answers": _answers(2)})
    w.close()
    res = CliRunner().invoke(main, ["audit", "stamp-request", str(table)])  # over the journal and the table
    assert res.exit_code == 0, res.output
    tsr = answer(tmp_path / "results.csv.tsq", pki["good"], tmp_path / "results.csv.tsr")
    journal = tmp_path / "results.csv.records.jsonl"
    assert response_files(journal) == [tsr]
    for results in (table, journal):
        res, page = _report(results, "--tsa-ca", pki["good"] / "ca.crt")
        assert res.exit_code == 0, res.output
        assert [s for s, _ in _stamps(page)] == ["verified"], _stamps(page)
    table.write_text(table.read_text().replace("a.jpg", "A.jpg"))  # the table edited, the journal not
    res, page = _report(journal, "--tsa-ca", pki["good"] / "ca.crt")
    [(state, text)] = _stamps(page)
    assert state == "failed" and "does not cover these results" in text
