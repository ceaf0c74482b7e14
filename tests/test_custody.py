"""Chain of custody: hash-chained records that `clue2geo audit verify` checks line by line, and
Ed25519-signed bundles that `bundle verify --trusted-key` and `Geolocator.load(trusted_keys=...)` refuse
when unsigned, signed by another key, or changed after signing."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from clue2geo_sdk import Bundle, BundleIntegrityError, Geolocator
from clue2geo_sdk.bundle.signing import (
    SIGNATURES,
    BundleSignatureError,
    SigningKeyError,
    generate_keypair,
    load_public_key,
    public_bytes,
)
from clue2geo_sdk.bundle.writer import remove_bundle
from clue2geo_sdk.cli import main
from clue2geo_sdk.runs.batch import run_batch
from clue2geo_sdk.runs.chain import GENESIS, record_hash, verify_journal
from clue2geo_sdk.runs.journal import RecordWriter, read_journal

NASTY = ["line\u2028sep", "nul\x00", "surrogate \udcff", "rtl \u202e", "x" * 5000, "tab\there", -0.0, 1e308]


def _write(path: Path, records: list[dict]) -> list[dict]:
    w = RecordWriter(path, "jsonl")
    written = [w.write(r) for r in records]
    w.close()
    return written


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def _put(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _audit(path: Path, *args: str):
    return CliRunner().invoke(main, ["audit", "verify", str(path), *args])


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    out = tmp_path / "results.jsonl"
    _write(
        out, [{"path": f"img{i}.jpg", "status": "ok", "lat": i / 3, "note": NASTY[i % len(NASTY)]} for i in range(5)]
    )
    return out


def test_an_intact_chain_verifies(journal: Path) -> None:
    recs = read_journal(journal).records
    assert recs[0]["prev_hash"] == GENESIS
    assert all(b["prev_hash"] == a["record_hash"] for a, b in zip(recs, recs[1:], strict=False))
    assert all(r["record_hash"] == record_hash(r) for r in recs)
    res = _audit(journal)
    assert res.exit_code == 0 and "5 records, hash chain intact" in res.output and recs[-1]["record_hash"] in res.output


def test_edited_removed_reordered_or_cut_records_are_named(journal: Path) -> None:
    lines = _lines(journal)

    def first_bad(new_lines: list[bytes], *args: str) -> str:
        _put(journal, new_lines)
        res = _audit(journal, *args)
        assert res.exit_code == 1, res.output
        return res.output

    edited = json.loads(lines[2])
    edited["lat"] = 48.8584
    assert f"{journal}:3: record_hash does not match" in first_bad(
        [*lines[:2], json.dumps(edited).encode(), *lines[3:]]
    )
    edited["record_hash"] = record_hash(edited)  # the forger recomputes the edited record's hash
    assert f"{journal}:4: prev_hash does not match line 3" in first_bad(
        [*lines[:2], json.dumps(edited).encode(), *lines[3:]]
    )
    assert f"{journal}:2: prev_hash does not match line 1" in first_bad([lines[0], *lines[2:]])  # removed
    assert f"{journal}:2: prev_hash" in first_bad([lines[0], lines[2], lines[1], *lines[3:]])  # reordered
    assert f"{journal}:1: prev_hash is not the genesis value" in first_bad(lines[1:])  # the head removed
    assert f"{journal}:3: empty line" in first_bad([*lines[:2], b"", *lines[2:]])
    dup = lines[1][:-1] + b', "lat": 0.0}'
    assert f"{journal}:2: unreadable record (duplicate key(s) lat" in first_bad([lines[0], dup, *lines[2:]])
    _put(journal, lines)
    journal.write_bytes(journal.read_bytes() + b'{"path": "torn')
    assert _audit(journal).exit_code == 1 and ":6: incomplete last line" in _audit(journal).output
    # cutting the tail leaves a valid chain: an anchor noted earlier catches it
    head = json.loads(lines[-1])["record_hash"]
    _put(journal, lines)
    assert _audit(journal, "--anchor", head).exit_code == 0
    assert "anchor record" in first_bad(lines[:3], "--anchor", head)


def test_resumed_runs_continue_the_chain(journal: Path) -> None:
    before = read_journal(journal).records
    more = _write(journal, [{"path": "late.jpg", "status": "error", "message": "m"}])
    assert more[0]["prev_hash"] == before[-1]["record_hash"]
    assert verify_journal(journal).ok and verify_journal(journal).records == 6


def test_results_on_the_demo_bundle_edited_and_caught(geo, photo: Path, tmp_path: Path) -> None:
    """End to end: located records carry times, digests, version and options; an edit is caught."""
    folder = tmp_path / "evidence"
    folder.mkdir()
    shutil.copy(photo, folder / "a.jpg")
    Image.open(photo).rotate(90, expand=True).save(folder / "b.png")
    (folder / "c.jpg").write_bytes(b"not a photo")
    out = tmp_path / "results.jsonl"
    summary = run_batch(geo, sorted(folder.iterdir()), out, on_notice=lambda m: None)
    assert (summary.ok, summary.error) == (2, 1)
    recs = read_journal(out).records
    for r in recs:
        start, end = dt.datetime.fromisoformat(r["started_utc"]), dt.datetime.fromisoformat(r["finished_utc"])
        assert start.utcoffset() == dt.timedelta(0) and start <= end
        assert r["bundle_digest"] == geo.bundle.digest and r["sdk_version"]
        assert r["options_digest"] == geo.options.digest()
        assert r["status"] == "error" or r["options"] == geo.options.to_dict()
        assert len(r["image_sha256"] or "") == 64 and len(r["record_hash"]) == 64
    assert _audit(out).exit_code == 0
    # resume with one more image: the chain goes on across runs
    Image.open(photo).save(folder / "d.webp")
    run_batch(geo, sorted(folder.iterdir()), out, resume=True, on_notice=lambda m: None)
    assert len(read_journal(out).records) == 4 and _audit(out).exit_code == 0
    # the examiner signs the finished journal; the case report, given the examiner's key, shows it holding
    priv, pub, kid = generate_keypair(tmp_path / "examiner.key")
    res = CliRunner().invoke(main, ["audit", "sign", str(out), "--key", str(priv), "--examiner", "E. Xam"])
    assert res.exit_code == 0 and kid in res.output, res.output

    def report() -> str:
        args = ["report", str(out), "--bundle", str(geo.bundle.root), "--out", str(tmp_path / "case.html")]
        res = CliRunner().invoke(main, [*args, "--trusted-key", str(pub)])
        assert res.exit_code == 0, res.output
        return (tmp_path / "case.html").read_text(encoding="utf-8")

    assert f'<span class="good">Signed by key {kid} (examiner &#x27;E. Xam&#x27;)' in report()
    # an analyst "corrects" a coordinate in the results file
    text = out.read_text(encoding="utf-8").splitlines(keepends=True)
    rec = json.loads(text[1])
    rec["lat"] = 39.9999
    text[1] = json.dumps(rec, ensure_ascii=False) + "\n"
    out.write_text("".join(text), encoding="utf-8")
    res = _audit(out)
    assert res.exit_code == 1 and f"{out}:2: record_hash does not match the record's content" in res.output
    assert (
        f'<span class="bad">key {kid} (examiner &#x27;E. Xam&#x27;)' in report() and "changed after signing" in report()
    )


# -- signed bundles ------------------------------------------------------------------------------


@pytest.fixture
def bundle_copy(demo_bundle: Path, tmp_path: Path) -> Path:
    """A copy of the demo bundle whose large files are hard links (never written to here): only
    the manifest is a real copy, so it can be edited."""
    dst = tmp_path / "bundle"

    def link(src: str, dest: str) -> None:
        try:
            os.link(src, dest)
        except OSError:
            shutil.copy2(src, dest)

    shutil.copytree(demo_bundle, dst, copy_function=link)
    manifest = dst / "manifest.json"
    data = manifest.read_bytes()
    manifest.unlink()
    manifest.write_bytes(data)
    return dst


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    lab_priv, lab_pub, _ = generate_keypair(tmp_path / "lab.key")
    other_priv, other_pub, _ = generate_keypair(tmp_path / "other.key")
    return {"priv": lab_priv, "pub": lab_pub, "other_priv": other_priv, "other_pub": other_pub}


def test_sign_and_verify_through_the_cli(bundle_copy: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    run = CliRunner().invoke
    res = run(main, ["bundle", "keygen", str(tmp_path / "new.key")])
    assert res.exit_code == 0 and (tmp_path / "new.key.pub").is_file()
    assert oct((tmp_path / "new.key").stat().st_mode & 0o777) == "0o600"
    assert run(main, ["bundle", "keygen", str(tmp_path / "new.key")]).exit_code == 1  # never overwritten

    res = run(main, ["bundle", "verify", str(bundle_copy), "--trusted-key", str(keys["pub"])])
    assert res.exit_code == 1 and "is not signed" in res.output
    res = run(main, ["bundle", "sign", str(bundle_copy), "--key", str(keys["priv"])])
    assert res.exit_code == 0 and (bundle_copy / SIGNATURES).is_file(), res.output
    res = run(main, ["bundle", "verify", str(bundle_copy), "--trusted-key", str(keys["pub"])])
    assert res.exit_code == 0 and "signed by trusted key" in res.output, res.output
    hex_pub = public_bytes(load_public_key(keys["pub"])).hex()  # the key as 64 hex characters works too
    assert run(main, ["bundle", "verify", str(bundle_copy), "--trusted-key", hex_pub]).exit_code == 0
    res = run(main, ["bundle", "verify", str(bundle_copy)])
    assert res.exit_code == 0 and "not checked: pass --trusted-key" in res.output
    res = run(main, ["bundle", "verify", str(bundle_copy), "--trusted-key", str(keys["other_pub"])])
    assert res.exit_code == 1 and "none of them trusted" in res.output
    # locate refuses it too, before any model is loaded or any record written
    out = tmp_path / "r.jsonl"
    base = ["locate", str(tmp_path), "--bundle", str(bundle_copy), "--out", str(out)]
    res = run(main, [*base, "--trusted-key", str(keys["other_pub"])])
    assert res.exit_code == 1 and "none of them trusted" in res.output and not out.exists()
    assert run(main, [*base, "--no-verify", "--trusted-key", str(keys["pub"])]).exit_code == 2
    # and so does eval, before it writes anything
    (tmp_path / "ds.csv").write_text("IMG_ID,LAT,LON\na.jpg,1,2\n")
    ev_out = tmp_path / "ev"
    base = ["eval", "--dataset", str(tmp_path / "ds.csv"), "--images", str(tmp_path), "--bundle", str(bundle_copy)]
    res = run(main, [*base, "--out", str(ev_out), "--trusted-key", str(keys["other_pub"])])
    assert res.exit_code == 1 and "none of them trusted" in res.output and not ev_out.exists()
    assert run(main, [*base, "--out", str(ev_out), "--no-verify", "--trusted-key", str(keys["pub"])]).exit_code == 2


def test_a_tampered_signed_bundle_is_refused(bundle_copy: Path, keys: dict[str, Path]) -> None:
    from clue2geo_sdk.bundle.signing import sign_bundle

    b = Bundle.open(bundle_copy)
    sign_bundle(bundle_copy, keys["priv"], b.digest)
    assert Bundle.open(bundle_copy, trusted_keys=[keys["pub"]]).signed_by == (_kid(keys),)
    with pytest.raises(BundleSignatureError, match="none of them trusted"):
        Geolocator.load(bundle_copy, device="cpu", trusted_keys=[keys["other_pub"]])
    with pytest.raises(ValueError, match="needs verify=True"):
        Bundle.open(bundle_copy, verify=False, trusted_keys=[keys["pub"]])
    with pytest.raises(SigningKeyError, match="private key"):
        Bundle.open(bundle_copy, trusted_keys=[keys["priv"]])

    # the manifest changes after signing (a swapped prompt, a raised threshold): refused
    manifest = bundle_copy / "manifest.json"
    original = manifest.read_bytes()
    doc = json.loads(original)
    doc["name"] = doc["name"] + "-patched"
    manifest.write_text(json.dumps(doc, indent=2) + "\n")
    with pytest.raises(BundleSignatureError, match="changed after signing"):
        Geolocator.load(bundle_copy, device="cpu", trusted_keys=[keys["pub"]])
    res = CliRunner().invoke(main, ["bundle", "verify", str(bundle_copy), "--trusted-key", str(keys["pub"])])
    assert res.exit_code == 1 and "changed after signing" in res.output

    # the signature itself edited: refused
    manifest.write_bytes(original)
    sigs = json.loads((bundle_copy / SIGNATURES).read_text())
    s = sigs["signatures"][0]["signature"]
    sigs["signatures"][0]["signature"] = ("0" if s[0] != "0" else "1") + s[1:]
    (bundle_copy / SIGNATURES).write_text(json.dumps(sigs))
    with pytest.raises(BundleSignatureError, match="does not verify"):
        Bundle.open(bundle_copy, trusted_keys=[keys["pub"]])

    # a component file replaced: the signature holds, the manifest's sha256 does not
    sign_bundle(bundle_copy, keys["priv"], Bundle.open(bundle_copy).digest)
    smallest = min((f for c in b.components.values() for f in c.files.values()), key=lambda f: f.bytes)
    prompts = bundle_copy / smallest.path
    data = prompts.read_bytes()
    prompts.unlink()  # a hard link: replace it, never write through it
    prompts.write_bytes(data + b" ")
    with pytest.raises(BundleIntegrityError, match="is corrupt"):
        Bundle.open(bundle_copy, trusted_keys=[keys["pub"]])

    # unsigned: refused when keys are given, opened as before when none are
    prompts.unlink()
    prompts.write_bytes(data)
    (bundle_copy / SIGNATURES).unlink()
    with pytest.raises(BundleSignatureError, match="is not signed"):
        Bundle.open(bundle_copy, trusted_keys=[keys["pub"]])
    assert Bundle.open(bundle_copy).signed_by == ()


def test_a_signed_bundle_loads_and_locates(bundle_copy: Path, keys: dict[str, Path], photo: Path) -> None:
    from clue2geo_sdk.bundle.signing import sign_bundle

    sign_bundle(bundle_copy, keys["priv"], Bundle.open(bundle_copy).digest)
    with Geolocator.load(
        bundle_copy, device="cpu", trusted_keys=[keys["pub"]], max_in_flight=1, max_cue_tokens=32, max_answer_tokens=32
    ) as g:
        assert g.bundle.signed_by == (_kid(keys),)
        assert g.locate(photo).image_sha256
    remove_bundle(bundle_copy)  # what 'bundle demo --overwrite' does: the signatures go with the manifest
    assert not bundle_copy.exists() or not any(bundle_copy.iterdir())


def _kid(keys: dict[str, Path]) -> str:
    from clue2geo_sdk.bundle.signing import key_id

    return key_id(load_public_key(keys["pub"]))


# -- signed results ------------------------------------------------------------------------------


def test_results_signed_by_the_examiner(journal: Path, keys: dict[str, Path]) -> None:
    """`audit sign` binds the journal's bytes, record count and head to the examiner's key, name and
    case; `audit verify --trusted-key` accepts it unchanged and names what changed otherwise."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from clue2geo_sdk.evidence.attestation import MESSAGE_PREFIX, signature_path

    res = CliRunner().invoke(
        main, ["audit", "sign", str(journal), "--key", str(keys["priv"]), "--examiner", "A. Analyst", "--case", "C-17"]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(signature_path(journal).read_text())
    (entry,) = doc["signatures"]
    # an independent check of what was signed: the file's sha256, count and head, under the lab's key
    records = read_journal(journal).records
    assert entry["journal_sha256"] == hashlib.sha256(journal.read_bytes()).hexdigest()
    assert (entry["records"], entry["head"]) == (5, records[-1]["record_hash"])
    assert (entry["examiner"], entry["case"]) == ("A. Analyst", "C-17")
    body = {k: v for k, v in entry.items() if k not in ("signature", "algorithm")}
    message = MESSAGE_PREFIX + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    pub = Ed25519PublicKey.from_public_bytes(public_bytes(load_public_key(keys["pub"])))
    pub.verify(bytes.fromhex(entry["signature"]), message)  # raises if it is not the lab's signature

    ok = _audit(journal, "--trusted-key", str(keys["pub"]))
    assert (
        ok.exit_code == 0 and "signed by trusted key" in ok.output and "examiner 'A. Analyst', case 'C-17'" in ok.output
    )
    assert "is self-consistent but NOT checked against a key you trust" in _audit(journal).output
    other = _audit(journal, "--trusted-key", str(keys["other_pub"]))
    assert other.exit_code == 1 and "none of them trusted" in other.output

    original = journal.read_bytes()
    _write(journal, [{"path": "late.jpg", "status": "ok", "lat": 1.0}])  # the chain goes on, intact
    assert _audit(journal).exit_code == 0
    late = _audit(journal, "--trusted-key", str(keys["pub"]))
    assert late.exit_code == 1 and "1 record(s) were appended after signing (the first 5 are as signed)" in late.output

    # a forger edits a coordinate and writes a whole new, valid chain: only the signature catches it
    forged = [{k: v for k, v in r.items() if k not in ("prev_hash", "record_hash")} for r in records]
    forged[2]["lat"] = 48.8584
    journal.unlink()
    _write(journal, forged)
    unchecked = _audit(journal)  # the chain holds; the signature stored beside it does not
    assert unchecked.exit_code == 1 and "hash chain intact" in unchecked.output
    assert "NOT checked against a key you trust, and it does not hold" in unchecked.output
    caught = _audit(journal, "--trusted-key", str(keys["pub"]))
    assert caught.exit_code == 1 and "the results changed after signing" in caught.output, caught.output

    journal.write_bytes(original)
    assert _audit(journal, "--trusted-key", str(keys["pub"])).exit_code == 0
    entry["case"] = "C-18"  # the signatures file itself edited
    signature_path(journal).write_text(json.dumps(doc))
    edited = _audit(journal, "--trusted-key", str(keys["pub"]))
    assert edited.exit_code == 1 and "the signature does not verify" in edited.output

    lines = _lines(journal)  # a broken chain is not signed
    _put(journal, [lines[0], *lines[2:]])
    refused = CliRunner().invoke(main, ["audit", "sign", str(journal), "--key", str(keys["priv"])])
    assert refused.exit_code == 1 and "not signed: FAILED" in refused.output and ":2: prev_hash" in refused.output


def test_a_signed_run_folder_covers_its_shards(keys: dict[str, Path], tmp_path: Path) -> None:
    """A 'locate --ray' run folder is signed over its shards (what verify, report and export read):
    shards rewritten as a new valid chain are caught; a resume's appended records are named."""
    from clue2geo_sdk.cluster.shards import ShardWriter
    from clue2geo_sdk.evidence.attestation import signature_path

    run = tmp_path / "run"
    w = ShardWriter(run, records_per_shard=2, parquet=False)
    w.write([{"path": f"img{i}.jpg", "status": "ok", "lat": float(i)} for i in range(3)])
    w.close()
    res = CliRunner().invoke(main, ["audit", "sign", str(run), "--key", str(keys["priv"]), "--case", "C-9"])
    assert res.exit_code == 0 and "signed the shards of" in res.output, res.output
    assert signature_path(run) == run / "run.sig.json" and signature_path(run).is_file()
    assert _audit(run, "--trusted-key", str(keys["pub"])).exit_code == 0

    shards = sorted((run / "shards").glob("*.jsonl"))
    original = {p: p.read_bytes() for p in shards}
    bodies = [
        {k: v for k, v in r.items() if k not in ("prev_hash", "record_hash")}
        for p in shards
        for r in read_journal(p).records
    ]
    bodies[0]["lat"] = -33.0
    for p in shards:
        p.unlink()
    w = ShardWriter(run, records_per_shard=2, parquet=False)  # a whole new, valid chain
    w.write(bodies)
    w.close()
    unchecked = _audit(run)
    assert unchecked.exit_code == 1 and "the results changed after signing" in unchecked.output
    caught = _audit(run, "--trusted-key", str(keys["pub"]))
    assert caught.exit_code == 1 and "the results changed after signing" in caught.output, caught.output

    for p in (run / "shards").glob("*.jsonl"):
        p.unlink()
    for p, data in original.items():
        p.write_bytes(data)
    assert _audit(run, "--trusted-key", str(keys["pub"])).exit_code == 0
    w = ShardWriter(run, parquet=False)  # a resume appends to the chain
    w.write([{"path": "late.jpg", "status": "ok", "lat": 9.0}])
    w.close()
    late = _audit(run, "--trusted-key", str(keys["pub"]))
    assert late.exit_code == 1 and "1 record(s) were appended after signing (the first 3 are as signed)" in late.output


def test_a_forged_or_malformed_signature_entry_is_named(journal: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    """The signatures file is untrusted input: a key id borrowed from the examiner, a key given as a
    path, or fields of the wrong type are named as errors (no traceback, no file read), and the
    report says so instead of showing a signature that holds."""
    from clue2geo_sdk.evidence.attestation import ResultsSignatureError, sign_journal, signature_path
    from clue2geo_sdk.evidence.report.render import render_report

    lab_id = _kid(keys)
    sign_journal(journal, keys["other_priv"], examiner="Mallory")
    doc = json.loads(signature_path(journal).read_text())
    cases = {
        "borrowed key id": {"key_id": lab_id},
        "key as a path": {"public_key": "/etc/hostname"},
        "wrong type": {"signature": 123},
        "bool count": {"records": True},
    }
    for why, change in cases.items():
        entry = {**doc["signatures"][0], **change}
        signature_path(journal).write_text(json.dumps({**doc, "signatures": [entry]}))
        for args in ([], ["--trusted-key", str(keys["pub"])]):
            res = _audit(journal, *args)
            assert res.exit_code == 1 and "unreadable signatures file" in res.output, (why, res.output)
            assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)
        page = render_report(read_journal(journal).records, results_path=journal)
        assert 'Signature: <span class="bad">' in page and "Signed by" not in page, why
    with pytest.raises(ResultsSignatureError, match="control or invisible"):
        sign_journal(journal, keys["priv"], examiner="x\nok: signed by trusted key deadbeef")
    assert not list(tmp_path.glob("*.tmp"))


def test_a_signed_csv_run_covers_its_table(keys: dict[str, Path], tmp_path: Path) -> None:
    """`audit sign results.csv` signs the journal beside it and the table written from it: an edited
    table is caught even though the journal is intact; a journal signed alone does not vouch for it."""
    table = tmp_path / "results.csv"
    w = RecordWriter(table, "csv")
    for i in range(3):
        w.write({"path": f"img{i}.jpg", "status": "ok", "lat": float(i), "lon": 2.0})
    w.close()
    journal = tmp_path / "results.csv.records.jsonl"
    assert journal.is_file() and table.is_file()
    res = CliRunner().invoke(main, ["audit", "sign", str(table), "--key", str(keys["priv"])])
    assert res.exit_code == 0 and "with the table" in res.output, res.output
    assert _audit(table, "--trusted-key", str(keys["pub"])).exit_code == 0
    original = table.read_bytes()
    table.write_bytes(original.replace(b"1.0", b"48.85", 1))
    assert _audit(journal, "--trusted-key", str(keys["pub"])).exit_code == 0  # the journal is as signed
    edited = _audit(table, "--trusted-key", str(keys["pub"]))
    assert edited.exit_code == 1 and "the table" in edited.output and "changed after signing" in edited.output
    table.write_bytes(original)
    CliRunner().invoke(main, ["audit", "sign", str(journal), "--key", str(keys["priv"])])  # the journal alone
    alone = _audit(table, "--trusted-key", str(keys["pub"]))
    assert alone.exit_code == 1 and "is not covered" in alone.output, alone.output


def test_a_signed_report_is_checked_with_the_results(journal: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    """`audit sign --report` puts the report's sha256 in the signature: verify fails naming the report
    when it was edited or is missing, holds when it is passed where it was moved; a signature made
    without a report (the old kind) still verifies, and does not vouch for a report passed to it."""
    from clue2geo_sdk.evidence.attestation import signature_path
    from clue2geo_sdk.evidence.report.render import render_report

    trusted = ("--trusted-key", str(keys["pub"]))
    plain = CliRunner().invoke(main, ["audit", "sign", str(journal), "--key", str(keys["priv"])])
    assert plain.exit_code == 0 and _audit(journal, *trusted).exit_code == 0
    (entry,) = json.loads(signature_path(journal).read_text())["signatures"]
    assert "report" not in entry and "report_sha256" not in entry  # the old entry, byte for byte

    report = tmp_path / "case" / "report.html"
    report.parent.mkdir()
    report.write_text(render_report(read_journal(journal).records, results_path=journal), encoding="utf-8")
    unsigned = _audit(journal, *trusted, "--report", str(report))
    assert unsigned.exit_code == 1 and "report.html is not covered" in unsigned.output, unsigned.output

    res = CliRunner().invoke(main, ["audit", "sign", str(journal), "--key", str(keys["priv"]), "--report", str(report)])
    assert res.exit_code == 0 and "with the report" in res.output and "does not name" not in res.stderr, res.output
    (entry,) = json.loads(signature_path(journal).read_text())["signatures"]
    assert entry["report"] == "case/report.html"
    assert entry["report_sha256"] == hashlib.sha256(report.read_bytes()).hexdigest()
    ok = _audit(journal, *trusted)
    assert ok.exit_code == 0 and "with the report case/report.html" in ok.output, ok.output

    original = report.read_bytes()
    report.write_bytes(original.replace(b"img1.jpg", b"img9.jpg", 1))
    for args in (trusted, ()):
        edited = _audit(journal, *args)
        assert edited.exit_code == 1 and f"the report {report} changed after signing" in edited.output, edited.output
    moved = tmp_path / "elsewhere.html"
    moved.write_bytes(original)
    report.unlink()
    missing = _audit(journal, *trusted)
    assert missing.exit_code == 1 and f"the report {report} signed with the results is missing" in missing.output
    assert _audit(journal, *trusted, "--report", str(moved)).exit_code == 0

    other = tmp_path / "other.html"
    other.write_text("<html>made from other results</html>")
    res = CliRunner().invoke(main, ["audit", "sign", str(journal), "--key", str(keys["priv"]), "--report", str(other)])
    assert res.exit_code == 0 and "does not name these results' digest" in res.stderr
    res = CliRunner().invoke(
        main, ["audit", "sign", str(journal), "--key", str(keys["priv"]), "--report", str(journal)]
    )
    assert res.exit_code == 1 and "is the results" in res.output
