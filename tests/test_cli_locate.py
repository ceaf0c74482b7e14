"""`clue2geo locate` as an analyst uses it: every input accounted for, exit codes, formats, resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from test_images import make_bad_inputs

from clue2geo_sdk.cli import main
from clue2geo_sdk.cli.common import EXIT_SOME_FAILED
from clue2geo_sdk.cli.flags import LoadSettings

QUICK = ["--no-verify", "--device", "cpu", "--max-cue-tokens", "16", "--max-answer-tokens", "16"]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _variants(photo: Path, folder: Path, n: int) -> list[Path]:
    """n distinct small photos (different bytes) cut from one real photo."""
    folder.mkdir(parents=True, exist_ok=True)
    img = Image.open(photo).convert("RGB")
    out = []
    for i in range(n):
        p = folder / f"img_{i:02d}.jpg"
        img.crop((i * 20, 0, i * 20 + 320, 240)).save(p, quality=90)
        out.append(p)
    return out


def test_folder_with_bad_inputs(demo_bundle: Path, photo: Path, tmp_path: Path) -> None:
    folder = tmp_path / "case"
    expected = make_bad_inputs(folder, photo)
    shutil.copy(photo, folder / "good.jpg")
    (folder / "sub").mkdir()
    shutil.copy(photo, folder / "sub" / "nested.jpg")
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)
    out = tmp_path / "res.jsonl"
    report = tmp_path / "report.html"
    res = CliRunner().invoke(
        main,
        [
            "locate",
            str(folder),
            "--recursive",
            "--bundle",
            str(demo_bundle),
            "--out",
            str(out),
            "--report",
            str(report),
            *QUICK,
        ],
    )
    assert res.exit_code == EXIT_SOME_FAILED, res.output
    recs = _records(out)
    by_name = {Path(r["path"]).name: r for r in recs}
    for name, reason in expected.items():
        assert by_name[name]["status"] == "error" and reason in by_name[name]["message"]
    assert by_name["good.jpg"]["status"] == "ok" and by_name["nested.jpg"]["status"] == "ok"
    assert any(r["error"] == "SymlinkLoop" for r in recs if r["status"] == "error")
    assert len(recs) == len(expected) + 3  # 5 bad, 2 good, 1 loop
    assert "2 located, 6 failed" in res.output
    html = report.read_text()
    assert (
        "<svg" in html
        and "good.jpg" in html
        and "http" not in html.split("<svg")[1].replace("http://www.w3.org/2000/svg", "")
    )


def test_all_ok_exits_zero_and_formats(demo_bundle: Path, photo: Path, tmp_path: Path) -> None:
    imgs = _variants(photo, tmp_path / "in", 2)
    runner = CliRunner()
    for fmt in ("csv", "geojson"):
        out = tmp_path / f"res.{fmt}"
        res = runner.invoke(main, ["locate", *map(str, imgs), "--bundle", str(demo_bundle), "--out", str(out), *QUICK])
        assert res.exit_code == 0, res.output
        assert res.stderr.count("meaningless") == 1  # the demo bundle is named as such, once
        if fmt == "csv":
            rows = list(csv.DictReader(out.open()))
            assert [Path(r["path"]).name for r in rows] == ["img_00.jpg", "img_01.jpg"] and rows[0]["status"] == "ok"
        else:
            fc = json.loads(out.read_text())
            assert fc["type"] == "FeatureCollection" and len(fc["features"]) == 2
            lon, lat = fc["features"][0]["geometry"]["coordinates"]
            assert -90 <= lat <= 90 and -180 <= lon <= 180
    # refusing to overwrite, then resuming with nothing left to do
    out = tmp_path / "res.csv"
    res = runner.invoke(main, ["locate", *map(str, imgs), "--bundle", str(demo_bundle), "--out", str(out), *QUICK])
    assert res.exit_code == 1 and "already holds results" in res.output
    mine = tmp_path / "mine.csv"  # a CSV that is not a clue2geo run is never written over
    mine.write_text("my,own\n")
    res = runner.invoke(main, ["locate", str(imgs[0]), "--bundle", str(demo_bundle), "--out", str(mine), *QUICK])
    assert res.exit_code == 1 and "not a clue2geo run" in res.output and mine.read_text() == "my,own\n"
    res = runner.invoke(
        main, ["locate", *map(str, imgs), "--bundle", str(demo_bundle), "--out", str(out), "--resume", *QUICK]
    )
    assert res.exit_code == 0 and "0 located, 0 failed, 2 skipped" in res.output
    # export converts the JSONL journal
    jl = tmp_path / "res.geojson.records.jsonl"
    res = runner.invoke(main, ["export", str(jl), "--to", str(tmp_path / "again.csv")])
    assert res.exit_code == 0 and len(list(csv.DictReader((tmp_path / "again.csv").open()))) == 2


def test_resume_skips_by_path_and_digest(demo_bundle: Path, photo: Path, tmp_path: Path) -> None:
    imgs = _variants(photo, tmp_path / "in", 2)
    out = tmp_path / "res.jsonl"
    runner = CliRunner()
    assert (
        runner.invoke(main, ["locate", str(imgs[0]), "--bundle", str(demo_bundle), "--out", str(out), *QUICK]).exit_code
        == 0
    )
    with open(out, "a") as fh:  # a torn last line, as a kill mid-write leaves it
        fh.write('{"path": "half')
    Image.open(photo).crop((5, 5, 300, 200)).save(imgs[0])  # same path, new bytes: must be redone
    res = runner.invoke(
        main, ["locate", *map(str, imgs), "--bundle", str(demo_bundle), "--out", str(out), "--resume", *QUICK]
    )
    assert res.exit_code == 0, res.output
    assert "res.jsonl:2: incomplete last line" in res.stderr and "cut off" in res.stderr  # said, then repaired
    recs = _records(out)
    assert len(recs) == 3 and [Path(r["path"]).name for r in recs] == ["img_00.jpg", "img_00.jpg", "img_01.jpg"]
    assert recs[0]["image_sha256"] != recs[1]["image_sha256"]


def test_killed_run_resumes_with_every_image_exactly_once(demo_bundle: Path, photo: Path, tmp_path: Path) -> None:
    imgs = _variants(photo, tmp_path / "in", 6)
    out = tmp_path / "res.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "clue2geo_sdk.cli",
        "locate",
        str(tmp_path / "in"),
        "--bundle",
        str(demo_bundle),
        "--out",
        str(out),
        "--resume",
        *QUICK,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = out.read_text().count("\n")
    assert 2 <= done_before < len(imgs), "the run should be killed part-way"
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    names = [Path(r["path"]).name for r in _records(out)]
    assert sorted(names) == sorted(p.name for p in imgs) and len(names) == len(set(names))


def test_bad_bundle_and_unknown_option(tmp_path: Path, photo: Path) -> None:
    res = CliRunner().invoke(
        main, ["locate", str(photo), "--bundle", str(tmp_path / "none"), "--out", str(tmp_path / "r.jsonl")]
    )
    assert res.exit_code == 1 and "does not exist" in res.output


@pytest.mark.parametrize("args", [["--format", "xml"], ["--samples-per-prompt", "0"]])
def test_usage_errors(args: list[str], tmp_path: Path, photo: Path) -> None:
    res = CliRunner().invoke(main, ["locate", str(photo), "--bundle", "b", "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2


def _validated_copy(demo_bundle: Path, dest: Path) -> str:
    """The demo bundle (hard links: its models are not copied) with a validation attached; its headline."""
    from clue2geo_sdk.bundle.attach import attach
    from clue2geo_sdk.bundle.manifest import Bundle
    from clue2geo_sdk.bundle.validation import VALIDATION_FORMAT

    shutil.copytree(demo_bundle, dest, copy_function=os.link)
    bundle = Bundle.open(dest, verify=False)
    acc = {km: {"value": v, "low": v - 0.05, "high": v + 0.05} for km, v in (("25", 0.42), ("750", 0.61))}
    data = {"format": VALIDATION_FORMAT, "evalset": {"name": "tiny-set", "n": 12}, "accuracy": acc}
    data["bundle"] = {"models_digest": bundle.models_digest}
    report = dest.parent / "validation.json"
    report.write_text(json.dumps(data))
    attach(bundle, "validation", {"report": report}, params={"models_digest": bundle.models_digest})
    return "validated on tiny-set (n = 12): 25 km 42 % [37–47], 750 km 61 % [56–66]"


def test_locate_states_the_validation_and_records_sha3(demo_bundle: Path, photo: Path, tmp_path: Path) -> None:
    """The run states the bundle's validation once on stderr, first; --hash sha3-512 records hashlib's
    SHA3-512 of each file beside its sha256; without it, no such field."""
    import hashlib

    imgs = _variants(photo, tmp_path / "in", 2)
    expected = _validated_copy(demo_bundle, tmp_path / "validated")
    out = tmp_path / "res.jsonl"
    args = ["locate", *map(str, imgs), "--bundle", str(tmp_path / "validated"), "--out", str(out), *QUICK]
    res = CliRunner().invoke(main, [*args, "--hash", "sha3-512"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count(expected) == 1 and expected not in res.stdout, res.stderr
    assert res.stderr.index("meaningless") < res.stderr.index(expected)  # with the demo warning, at the start
    for rec in _records(out):
        data = Path(rec["path"]).read_bytes()
        assert rec["image_sha3_512"] == hashlib.sha3_512(data).hexdigest()
        assert rec["image_sha256"] == hashlib.sha256(data).hexdigest()

    plain = tmp_path / "plain.jsonl"
    res = CliRunner().invoke(main, ["locate", str(imgs[0]), "--bundle", str(demo_bundle), "--out", str(plain), *QUICK])
    assert res.exit_code == 0 and "no validation on record for this bundle" in res.stderr, res.output
    assert all("image_sha3_512" not in r for r in _records(plain))
    bad = CliRunner().invoke(main, [*args, "--hash", "md5"])
    assert bad.exit_code == 2 and "sha3-512" in bad.output
    ray = CliRunner().invoke(main, [*args, "--hash", "sha3-512", "--ray", "local"])
    assert ray.exit_code == 2 and "--ray" in ray.output


def test_threads_reach_the_engine_and_zero_is_refused(demo_bundle: Path, photo: Path, tmp_path: Path) -> None:
    common = {"bundle_path": demo_bundle, "device": "cpu", "max_in_flight": 1, "verify": False, "trusted_keys": ()}
    for engine in ("batched", "chat"):
        with LoadSettings(engine=engine, gallery=None, options={}, n_threads=3, **common).load() as geo:
            assert geo.vlm.n_threads == 3  # not the default (the physical cores) on 1-, 2- or 4-core hosts
    out = tmp_path / "r.jsonl"
    res = CliRunner().invoke(
        main, ["locate", str(photo), "--bundle", str(demo_bundle), "--out", str(out), "--threads", "0"]
    )
    assert res.exit_code == 2 and "--threads" in res.output and not out.exists()
    res = CliRunner().invoke(
        main, ["locate", str(photo), "--bundle", str(demo_bundle), "--out", str(out), "--threads", "1", "--ray", "auto"]
    )
    assert res.exit_code == 2 and "--threads is for local runs" in res.output
