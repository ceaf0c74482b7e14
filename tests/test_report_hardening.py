"""The case report as evidence under hostile input.

* Trust display: a signature is shown as holding (green) only when it verifies with a key the user
  named as trusted (``trusted_keys``, ``report --trusted-key``). Results rewritten as a new valid chain
  and re-signed with the forger's own key under the examiner's name verify against the key stored in
  their own signatures file: without a trusted key the report must say "not checked against a key you
  trust", and with the examiner's key it must say that no signature is by a trusted key.
* Malformed records (wrong-typed or missing fields, a record that is not an object) never fail the
  whole report: the parts that cannot be drawn are named, the rest (and the good records) render, in
  a real headless Chromium.
* No NaN or Infinity reaches JSON on the page, whatever a record holds.
"""

from __future__ import annotations

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
from PIL import Image

from clue2geo_sdk.bundle.signing import SigningKeyError, generate_keypair
from clue2geo_sdk.cli import main
from clue2geo_sdk.evidence.attestation import sign_journal, signature_path
from clue2geo_sdk.evidence.report.render import render_report, write_report
from clue2geo_sdk.files import InputFileError
from clue2geo_sdk.runs.batch import run_batch
from clue2geo_sdk.runs.journal import RecordWriter, read_journal

CHROMIUM = Path(os.environ.get("CLUE2GEO_CHROMIUM", "/usr/bin/chromium"))


class _Dom(HTMLParser):
    """Elements (tag, attributes) in document order, and the text, of a DOM dump."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.pre: list[str] = []
        self._in_pre = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag == "pre":
            self._in_pre = True
            self.pre.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._in_pre:
            self.pre[-1] += data

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [
            a for t, a in self.elements if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def _dom_in_chromium(tmp: Path, page: Path) -> _Dom:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install it with 'apt-get install -y --no-install-recommends chromium'")
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return _Dom(res.stdout)


def _signature_paragraphs(page: str) -> list[tuple[str, str]]:
    """(data-trust, text) of each signature line of the report."""
    found = re.findall(r'<p class="signature" data-trust="(\w+)">(.*?)</p>', page, flags=re.S)
    return [(trust, _Dom(body).all_text()) for trust, body in found]


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    w = RecordWriter(path, "jsonl")
    for r in records:
        w.write(r)
    w.close()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Any]:
    priv, pub, kid = generate_keypair(tmp_path / "examiner.key")
    fpriv, fpub, fkid = generate_keypair(tmp_path / "forger.key")
    return {"priv": priv, "pub": pub, "kid": kid, "fpriv": fpriv, "fpub": fpub, "fkid": fkid}


def test_a_signature_is_green_only_with_a_key_the_user_trusts(tmp_path: Path, keys: dict[str, Any]) -> None:
    journal = tmp_path / "results.jsonl"
    recs = [{"path": f"img{i}.jpg", "status": "ok", "lat": 10.0 + i, "lon": 20.0} for i in range(3)]
    _write(journal, recs)
    sign_journal(journal, keys["priv"], examiner="E. Xam")
    records = read_journal(journal).records

    def page(trusted: list[str] | None) -> str:
        return render_report(records, results_path=journal, trusted_keys=trusted)

    # without a trusted key: the signature verifies with the key stored beside it, and says only that
    untrusted = page(None)
    [(trust, text)] = _signature_paragraphs(untrusted)
    assert trust == "untrusted" and 'class="warn"' in untrusted.split('data-trust="untrusted"')[1][:40]
    assert "not checked against a key you trust" in text and keys["kid"] in text and "E. Xam" in text
    assert 'class="good">Signed by' not in untrusted
    # the examiner's public key, as a file or as its text: green, naming the trusted key
    for given in (str(keys["pub"]), keys["pub"].read_text()):
        trusted = page([given])
        [(trust, text)] = _signature_paragraphs(trusted)
        assert trust == "trusted" and f"Signed by key {keys['kid']} (examiner 'E. Xam')" in text
        assert f"checked against your trusted key {keys['kid']}" in text
    # write_report takes the same keyword and writes the same verdict
    out = write_report(tmp_path / "r.html", records, results_path=journal, trusted_keys=[str(keys["pub"])])
    assert 'data-trust="trusted"' in out.read_text(encoding="utf-8")
    # only another key trusted: the examiner's signature holds for its own key, but not for the user's
    other = page([str(keys["fpub"])])
    trusts = [t for t, _ in _signature_paragraphs(other)]
    assert trusts == ["untrusted", "bad"] and "no signature by a key you trust" in other
    assert 'class="good">Signed by' not in other
    # edited after signing: red, with or without the trusted key
    lines = journal.read_text(encoding="utf-8").splitlines(keepends=True)
    journal.write_text("".join(lines[:2]), encoding="utf-8")
    for trusted_keys in (None, [str(keys["pub"])]):
        cut = render_report(read_journal(journal).records, results_path=journal, trusted_keys=trusted_keys)
        assert [t for t, _ in _signature_paragraphs(cut)][0] == "bad" and "Signed by" not in cut


def test_results_rewritten_and_self_signed_are_never_green(tmp_path: Path, keys: dict[str, Any]) -> None:
    """The forger writes a new valid chain with a moved coordinate and signs it with their own key
    under the examiner's name: the chain and that signature both check out against themselves."""
    journal = tmp_path / "results.jsonl"
    _write(journal, [{"path": "a.jpg", "status": "ok", "lat": 39.9999, "lon": 116.2755}])
    sign_journal(journal, keys["priv"], examiner="E. Xam")
    forged = [dict(r) for r in read_journal(journal).records]
    forged[0]["lat"] = 48.8566
    for r in forged:
        r.pop("record_hash"), r.pop("prev_hash")
    journal.unlink()
    signature_path(journal).unlink()
    _write(journal, forged)
    sign_journal(journal, keys["fpriv"], examiner="E. Xam")
    records = read_journal(journal).records
    plain = render_report(records, results_path=journal)
    assert "hash chain intact" in plain  # the forged chain is a valid chain
    [(trust, text)] = _signature_paragraphs(plain)
    assert trust == "untrusted" and "not checked against a key you trust" in text and keys["fkid"] in text
    assert "Signed by" not in plain
    checked = render_report(records, results_path=journal, trusted_keys=[str(keys["pub"])])
    assert [t for t, _ in _signature_paragraphs(checked)] == ["untrusted", "bad"]
    assert f"no signature by a key you trust ({keys['kid']})" in checked and keys["fkid"] in checked


def test_report_command_takes_trusted_keys(tmp_path: Path, keys: dict[str, Any]) -> None:
    """``clue2geo report --trusted-key`` (repeatable, a key file or the key's text) reaches the page."""
    journal = tmp_path / "results.jsonl"
    _write(journal, [{"path": "a.jpg", "status": "ok", "lat": 1.0, "lon": 2.0}])
    sign_journal(journal, keys["priv"], examiner="E. Xam")
    out = tmp_path / "case.html"

    def report(*extra: str) -> list[str]:
        res = CliRunner().invoke(main, ["report", str(journal), "--out", str(out), *extra])
        assert res.exit_code == 0, res.output
        return [t for t, _ in _signature_paragraphs(out.read_text(encoding="utf-8"))]

    assert report() == ["untrusted"]
    assert report("--trusted-key", str(keys["pub"])) == ["trusted"]
    assert report("--trusted-key", str(keys["fpub"]), "--trusted-key", keys["pub"].read_text()) == ["trusted"]
    assert report("--trusted-key", str(keys["fpub"])) == ["untrusted", "bad"]


def test_an_unsigned_journal_with_a_trusted_key_says_so(tmp_path: Path, keys: dict[str, Any]) -> None:
    journal = tmp_path / "results.jsonl"
    _write(journal, [{"path": "a.jpg", "status": "ok", "lat": 1.0, "lon": 2.0}])
    page = render_report(read_journal(journal).records, results_path=journal, trusted_keys=[str(keys["pub"])])
    [(trust, text)] = _signature_paragraphs(page)
    assert trust == "bad" and "not signed" in text and keys["kid"] in text


def test_a_bad_trusted_key_is_refused_before_anything_is_written(tmp_path: Path, keys: dict[str, Any]) -> None:
    journal = tmp_path / "results.jsonl"
    _write(journal, [{"path": "a.jpg", "status": "ok", "lat": 1.0, "lon": 2.0}])
    records = read_journal(journal).records
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)  # opening it would block for ever: refused from stat alone
    dest = tmp_path / "r.html"
    with pytest.raises(InputFileError, match=r"--trusted-key .*key\.fifo: is a named pipe"):
        write_report(dest, records, results_path=journal, trusted_keys=[str(fifo)])
    with pytest.raises(InputFileError, match="is a directory"):
        write_report(dest, records, results_path=journal, trusted_keys=[str(tmp_path)])
    with pytest.raises(SigningKeyError, match="not an Ed25519 public key"):
        write_report(dest, records, results_path=journal, trusted_keys=[str(keys["priv"])])  # the private key
    assert not dest.exists()


def _malformed(good: dict[str, Any]) -> list[Any]:
    """Records of a real run, each with one field of the wrong type (or fields missing)."""

    def bad(name: str, **change: Any) -> dict[str, Any]:
        # abs_path dropped: records are grouped per image by it (see runs.resume.latest), and each must stay apart
        rec = {k: v for k, v in good.items() if k not in ("record_hash", "prev_hash", "abs_path")}
        return {**rec, "path": name, **change}

    return [
        bad("lat.jpg", lat="x"),
        bad("candidates.jpg", candidates=5),
        bad("cues.jpg", cues={"a": 1}),
        bad("metadata.jpg", metadata=[]),
        bad("timings.jpg", timings="slow"),
        bad("cluemap.jpg", cluemap=["x"], answers={"a": 1}, raw_outputs=7, options=[1]),
        bad("region.jpg", region={"kind": "circle"}, outside_region="many", references="x"),
        bad("nul.jpg", image="a\x00b.jpg"),
        {"path": "bare.jpg", "status": "ok"},  # every other key missing
        {"status": "error"},  # no path, no message
    ]


def test_malformed_records_do_not_lose_the_report(geo, photo: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photo, folder / "good1.jpg")
    Image.open(photo).rotate(90, expand=True).save(folder / "good2.png")
    journal = tmp_path / "results.jsonl"
    summary = run_batch(geo, sorted(folder.iterdir()), journal, on_notice=lambda m: None)
    assert summary.ok == 2
    good = read_journal(journal).records
    bad = _malformed(good[0])
    with journal.open("a", encoding="utf-8") as fh:
        for r in bad:
            fh.write(json.dumps(r) + "\n")
        fh.write("[5]\n")  # not a record: read_journal names it
    # as a library user (or examples/locate_folder.py) does: every record read, handed to write_report
    read = read_journal(journal)
    assert len(read.records) == 2 + len(bad) and len(read.problems) == 1
    out = tmp_path / "case.html"
    write_report(out, read.records, geo.bundle, results_path=journal, problems=read.problems)
    dom = _dom_in_chromium(tmp_path, out)
    sections = dom.find("section")
    assert [s["id"] for s in sections] == [f"image-{n}" for n in range(1, 3 + len(bad))]
    # the good records, whole: their photos, their maps, their custody blocks
    assert [s["data-thumb"] for s in sections[:2]] == ["ok", "ok"]
    text = dom.all_text()
    for r in good:
        assert r["record_hash"] in text
    # each malformed record is named, and what in it could not be drawn
    expect = [
        'the record\'s lat/lon ("x", ',
        "The candidates could not be shown: TypeError: the record's 'candidates' is a JSON number, not a list",
        "The cluemap could not be shown: TypeError: the record's 'cues' is a JSON object, not a list",
        "The photo metadata could not be shown: TypeError: the record's 'metadata' is a JSON list, not an object",
        "The cluemap could not be shown: TypeError: the record's 'cluemap' is a JSON list, not an object",
        "The answers could not be shown: TypeError: the record's 'answers' is a JSON object, not a list",
        "The photo could not be shown: TypeError: the record's 'cues' is a JSON object, not a list",
        "the image file is missing at report time",  # nul.jpg: a NUL in its path
        '"many" outside dropped',
    ]
    for phrase in expect:
        assert phrase in text, phrase
    assert text.count("could not be shown") >= 7
    by_id = {s["id"]: s for s in sections}
    assert by_id["image-7"]["data-status"] == "ok"  # timings: "slow" is not used by the report
    assert by_id["image-12"]["data-status"] == "error"
    assert "11 located, 1 failed" in text  # all 12 records shown
    assert f"1 problem(s) reading the results: what they name is not in this report. {read.problems[0]}" in text
    assert "FAILED" in text  # the appended lines are not chained: the hash chain check says so


def test_a_record_that_is_not_an_object_is_named_and_the_rest_shown(tmp_path: Path) -> None:
    good = {"path": "a.jpg", "status": "ok", "lat": 1.0, "lon": 2.0}
    page = render_report([good, 5, ["x"], {"path": "b.jpg", "status": "ok", "lat": 3.0, "lon": 4.0}])
    assert "record 2 could not be shown: TypeError: a int, not a record (a JSON object)" in page
    assert "record 3 could not be shown: TypeError: a list, not a record" in page
    assert "2 located, 0 failed, 2 could not be shown" in page
    summary = json.loads(_Dom(page).find("body")[0]["data-summary"] or "")
    assert summary == {"ok": 2, "failed": 0, "unshown": 2, "demo": False}
    assert page.count('data-status="unshown"') == 2 and page.count('data-status="ok"') == 2


def _strict(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_no_nan_or_infinity_reaches_json_on_the_page() -> None:
    nan, inf = math.nan, math.inf
    rec = {
        "path": "a.jpg",
        "status": "ok",
        "lat": nan,
        "lon": inf,
        "confidence": nan,
        "options": {"temperature": nan, "radius_km": inf, "nested": [-inf]},
        "region": {"kind": "circle", "lat": 0.0, "lon": 0.0, "radius_km": inf},
        "metadata": {"position": {"lat": 1.0, "lon": 2.0, "altitude_m": nan, "source": "xmp"}},
        "raw_outputs": {"direct": [nan, {"score": inf}]},
        "candidates": [{"source": "direct", "lat": nan, "lon": 2.0, "score": inf}],
    }
    page = render_report([rec, {"path": "b.jpg", "status": "error", "options": {"x": -inf}}])
    dom = _Dom(page)
    assert _strict(dom.find("body")[0]["data-summary"] or "")["ok"] == 1
    assert len(dom.pre) >= 3  # the two options blocks and the raw answers
    for block in dom.pre:
        _strict(block)
    # nowhere a bare NaN/Infinity (only as quoted names inside JSON strings)
    assert not re.search(r"(?<![;\w-])-?(?:NaN|Infinity)(?![&\w])", page)
