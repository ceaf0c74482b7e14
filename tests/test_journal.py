"""The results journal: every record survives any Unicode, torn and unreadable lines are reported (never
dropped silently), and records are reused only when the same image, bundle, options and SDK made them."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner
from PIL import Image

from clue2geo_sdk.cli import main
from clue2geo_sdk.cli.common import EXIT_SOME_FAILED
from clue2geo_sdk.geolocator import Geolocator
from clue2geo_sdk.results import Failure
from clue2geo_sdk.runs.batch import run_batch
from clue2geo_sdk.runs.chain import CHAIN_FIELDS
from clue2geo_sdk.runs.journal import JournalWarning, RecordWriter, read_journal, read_records
from clue2geo_sdk.runs.records import identity

NASTY = [
    "line\u2028separator",
    "para\u2029separator",
    "next\x85line",
    "nul\x00byte",
    "rtl \u200fmark \u202eoverride\u202c and \u061c",
    "form\x0cfeed vertical\x0btab \x1c\x1d\x1e",
    "cr\r\nlf\n",
    "surrogate \udcff from an undecodable file name",
    "x" * 10_000 + "\u2028" + "y" * 100,
]


def _write(path: Path, records: list[dict]) -> None:
    w = RecordWriter(path, "jsonl")
    for r in records:
        w.write(r)
    w.close()


def test_any_unicode_survives_the_journal(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    recs = [{"path": f"img{i}.jpg", "status": "error", "message": s} for i, s in enumerate(NASTY)]
    _write(out, recs)
    assert out.read_bytes().count(b"\n") == len(recs)  # one line per record
    journal = read_journal(out)
    unchained = [{k: v for k, v in r.items() if k not in CHAIN_FIELDS} for r in journal.records]
    assert journal.problems == [] and unchained == recs


def test_torn_last_line_is_reported_and_cut_on_repair(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    _write(out, [{"path": "a", "status": "ok"}, {"path": "b", "status": "ok"}])
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"path": "c", "sta')
    j = read_journal(out)
    assert [r["path"] for r in j.records] == ["a", "b"]
    assert len(j.problems) == 1 and ":3: incomplete last line" in j.problems[0]
    assert out.read_bytes().endswith(b'"sta')  # reading alone changes nothing
    with pytest.warns(JournalWarning, match="incomplete last line"):
        assert len(read_records(out)) == 2
    j = read_journal(out, repair=True)
    assert "cut off" in j.problems[0] and out.read_bytes() == whole


def test_unreadable_line_is_reported_with_its_number(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"path": "a"}\nnot json at all\n[1, 2]\n\xff\xfe\n{"path": "b"}\n')
    j = read_journal(out)
    assert [r["path"] for r in j.records] == ["a", "b"]
    assert [p.split(": ")[0].rsplit(":", 1)[1] for p in j.problems] == ["2", "3", "4"]
    res = CliRunner().invoke(main, ["export", str(out), "--to", str(tmp_path / "x.geojson")])
    assert res.exit_code == 0 and "r.jsonl:2: unreadable record" in res.stderr


def _img(photo: Path, path: Path, i: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(photo).convert("RGB").crop((i * 10, 0, 320 + i * 10, 240)).save(path, quality=90)
    return path


def test_records_carry_what_made_them_and_stale_ones_run_again(geo: Geolocator, photo: Path, tmp_path: Path) -> None:
    img = _img(photo, tmp_path / "in" / "a.jpg")
    out = tmp_path / "r.jsonl"
    before = geo.options
    notes: list[str] = []
    s = run_batch(geo, [img, tmp_path / "in" / "missing.jpg"], out, on_notice=notes.append)
    assert (s.ok, s.error) == (1, 1)
    recs = read_journal(out).records
    ident = identity(geo)
    for r in recs:  # ok and error records alike
        assert {k: r[k] for k in ident} == ident
        assert r["demo"] is True and len(r["bundle_digest"]) == 64 and r["options_digest"] == geo.options.digest()
    # same everything: reused
    s = run_batch(geo, [img], out, resume=True, on_notice=notes.append)
    assert (s.ok, s.skipped, notes) == (0, 1, [])
    # other options: one line says what differs; the input runs again, the new record supersedes
    other = attrs.evolve(geo.options, max_answer_tokens=geo.options.max_answer_tokens + 1)
    s = run_batch(geo, [img], out, resume=True, options=other, on_notice=notes.append)
    assert (s.ok, s.skipped, s.rerun) == (1, 0, 1)
    assert len(notes) == 1 and "another options" in notes[0] and "bundle" not in notes[0]
    assert read_journal(out).records[-1]["options_digest"] == other.digest()
    assert geo.options is before  # the geolocator's own options are untouched
    # a record from another bundle and SDK version (edited in): named, and run again
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    last = json.loads(lines[-1])
    last.update(bundle_digest="f" * 64, sdk_version="0.0.1")
    out.write_text("".join(lines[:-1]) + json.dumps(last) + "\n", encoding="utf-8")
    notes.clear()
    s = run_batch(geo, [img], out, resume=True, options=other, on_notice=notes.append)
    assert s.rerun == 1 and s.ok == 1
    stale = [n for n in notes if "another" in n]
    assert len(stale) == 1 and "bundle (ffffffffffff here" in stale[0] and "clue2geo version (0.0.1 here" in stale[0]


def test_retry_failed_runs_failures_again(
    demo_bundle: Path, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = _img(photo, tmp_path / "in" / "a.jpg")
    out = tmp_path / "r.jsonl"
    args = ["locate", str(img), "--bundle", str(demo_bundle), "--out", str(out), "--no-verify", "--device", "cpu"]
    args += ["--max-cue-tokens", "16", "--max-answer-tokens", "16"]
    runner = CliRunner()
    with monkeypatch.context() as m:  # a transient failure (say, out of memory) on the first run
        m.setattr(
            Geolocator,
            "try_locate",
            lambda self, image, **kw: Failure(image=kw["name"], error="MemoryError", message="oom"),
        )
        res = runner.invoke(main, args)
    assert res.exit_code == EXIT_SOME_FAILED, res.output
    assert runner.invoke(main, [*args, "--retry-failed"]).exit_code == 2  # needs --resume
    res = runner.invoke(main, [*args, "--resume"])
    assert res.exit_code == 0 and "0 located, 0 failed, 1 skipped" in res.output
    res = runner.invoke(main, [*args, "--resume", "--retry-failed"])
    assert res.exit_code == 0 and "1 located, 0 failed, 0 skipped" in res.output, res.output
    recs = read_journal(out).records
    assert [r["status"] for r in recs] == ["error", "ok"]
    res = runner.invoke(main, ["export", str(out), "--to", str(tmp_path / "x.geojson")])
    assert res.exit_code == 0 and "1 records" in res.output  # the latest record per image
