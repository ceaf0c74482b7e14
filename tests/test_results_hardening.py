"""Results that survive faults: one writer per results file, no export onto its own input, resume
that tells images apart by their bytes, a full disk that ends the run cleanly with whole records,
cluster shards that resume in order, no NaN in JSON, honest trust display and one-line errors."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from clue2geo_sdk.bundle.signing import generate_keypair
from clue2geo_sdk.cli import main
from clue2geo_sdk.cluster import shards
from clue2geo_sdk.evidence.attestation import sign_journal
from clue2geo_sdk.geolocator import Geolocator
from clue2geo_sdk.runs.batch import run_batch
from clue2geo_sdk.runs.chain import verify_journal
from clue2geo_sdk.runs.journal import (
    RecordWriter,
    ResultsInUseError,
    ResultsPathError,
    ResultsWriteError,
    read_journal,
)
from clue2geo_sdk.runs.resume import latest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--no-verify", "--device", "cpu", "--max-cue-tokens", "16", "--max-answer-tokens", "16"]


def _strict(line: bytes) -> dict:
    """Parse one JSON line as JSON is defined: NaN and Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def _write(path: Path, records: list[dict]) -> None:
    w = RecordWriter(path, "jsonl")
    for r in records:
        w.write(r)
    w.close()


def _journal(tmp_path: Path, n: int = 3) -> Path:
    out = tmp_path / "results.jsonl"
    _write(out, [{"path": f"img{i}.jpg", "status": "ok", "lat": 10.0 + i, "lon": 20.0} for i in range(n)])
    return out


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """The real command in its own process (a FIFO that is opened would block it, not the tests)."""
    cmd = [sys.executable, "-c", "from clue2geo_sdk.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# -- one writer per results file --------------------------------------------------------------------

HOLDER = """
import sys
from pathlib import Path
from clue2geo_sdk.runs.journal import RecordWriter
w = RecordWriter(Path(sys.argv[1]), "jsonl")
w.write({"path": "held.jpg", "status": "error", "error": "X", "message": "held"})
print("holding", flush=True)
sys.stdin.readline()
w.close()
"""


@pytest.fixture
def held(tmp_path: Path):
    """Another process writing ``held.jsonl`` (it holds the journal's lock until the test ends)."""
    out = tmp_path / "held.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    yield out
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def test_a_second_writer_is_refused_while_another_process_writes(held: Path) -> None:
    before = held.read_bytes()
    with pytest.raises(ResultsInUseError, match="is being written by another clue2geo run") as info:
        RecordWriter(held, "jsonl")
    assert str(held) in str(info.value)
    assert held.read_bytes() == before  # nothing was appended or cut


def test_two_writers_in_one_process_conflict_too(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    first = RecordWriter(out, "jsonl")
    with pytest.raises(ResultsInUseError):
        RecordWriter(out, "jsonl")
    first.write({"path": "a.jpg", "status": "error"})
    first.close()
    second = RecordWriter(out, "jsonl")  # the lock goes with the first writer
    second.write({"path": "b.jpg", "status": "error"})
    second.close()
    assert verify_journal(out).ok and len(read_journal(out).records) == 2


def test_locate_is_refused_in_one_line_while_another_run_writes_its_out(
    held: Path, demo_bundle: Path, photo: Path
) -> None:
    before = held.read_bytes()
    res = CliRunner().invoke(main, ["locate", str(photo), "--bundle", str(demo_bundle), "--out", str(held), "--resume"])
    assert res.exit_code == 1, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "is being written by another clue2geo run" in errors[0] and str(held) in errors[0]
    assert "Traceback" not in res.output and held.read_bytes() == before


def test_a_cluster_run_folder_takes_one_driver(tmp_path: Path, demo_bundle: Path, photo: Path) -> None:
    import fcntl

    from clue2geo_sdk.cluster import locate_on_ray

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)  # another driver's hold on the folder
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(ResultsInUseError, match="being written by another clue2geo run"):
            shards.lock_run(out)
        with pytest.raises(ResultsInUseError):  # before any cluster is started or a shard opened
            locate_on_ray([photo], demo_bundle, out, address="local")
        assert not shards.shard_dir(out).exists()
    finally:
        os.close(fd)
    os.close(shards.lock_run(out))  # free again once the other driver is done


# -- export never writes onto its own input ------------------------------------------------------------


def test_export_and_report_refuse_to_write_onto_their_input(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    before = journal.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(journal)
    os.link(journal, tmp_path / "hard.jsonl")
    run = CliRunner().invoke
    for dest in (journal, tmp_path / "link.jsonl", tmp_path / "hard.jsonl"):
        res = run(main, ["export", str(journal), "--to", str(dest)])
        assert res.exit_code == 1 and "is the results being read" in res.output, res.output
    res = run(main, ["export", str(tmp_path / "link.jsonl"), "--to", str(journal)])
    assert res.exit_code == 1 and "is the results being read" in res.output
    res = run(main, ["report", str(journal), "--out", str(tmp_path / "hard.jsonl")])
    assert res.exit_code == 1 and "is the results being read" in res.output
    assert journal.read_bytes() == before and verify_journal(journal).ok
    res = run(main, ["export", str(journal), "--to", str(tmp_path / "copy.jsonl")])  # another file: fine
    assert res.exit_code == 0 and "3 records" in res.output


def test_export_refuses_to_write_onto_a_shard_of_the_run_it_reads(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    w = shards.ShardWriter(run_dir, parquet=False)
    w.write([{"path": "a.jpg", "status": "ok", "lat": 1.0, "lon": 2.0}])
    w.close()
    (shard,) = shards.shard_files(run_dir)
    before = shard.read_bytes()
    res = CliRunner().invoke(main, ["export", str(run_dir), "--to", str(shard)])
    assert res.exit_code == 1 and "is the results being read" in res.output
    assert shard.read_bytes() == before


# -- NaN and Infinity never reach JSON -----------------------------------------------------------------


def test_no_nan_or_infinity_is_ever_written(tmp_path: Path) -> None:
    rec = {
        "path": "a.jpg",
        "status": "ok",
        "lat": 1.0,
        "lon": 2.0,
        "region": {"kind": "circle", "radius_km": math.inf},
        "confidence": -math.inf,
        "metadata": {"position": {"lat": 1.0, "lon": 2.0, "altitude_m": math.nan}, "problems": ["GPS x: odd"]},
    }
    out = tmp_path / "r.jsonl"
    _write(out, [rec])
    (written,) = [_strict(line) for line in out.read_bytes().splitlines()]
    assert "altitude_m" not in written["metadata"]["position"]
    assert written["metadata"]["problems"] == [
        "GPS x: odd",
        "metadata.position.altitude_m: NaN is not a number; dropped",
    ]
    assert written["region"]["radius_km"] is None and written["confidence"] is None
    assert sorted(written["nonfinite"]) == [
        "confidence: -Infinity is not a number; written as null",
        "region.radius_km: Infinity is not a number; written as null",
    ]
    assert verify_journal(out).ok
    # the cluster's shards and the merged file too
    run_dir = tmp_path / "run"
    w = shards.ShardWriter(run_dir, parquet=False)
    w.write([rec])
    w.close()
    for path in [*shards.shard_files(run_dir), shards.write_merged(run_dir)[0]]:
        assert [_strict(line)["region"]["radius_km"] for line in path.read_bytes().splitlines()] == [None]
    # a journal written before (NaN in it) exports as valid JSON
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text('{"path": "b.jpg", "status": "ok", "lat": 3.0, "lon": 4.0, "spread_km": NaN}\n')
    for suffix in ("geojson", "jsonl"):
        res = CliRunner().invoke(main, ["export", str(legacy), "--to", str(tmp_path / f"x.{suffix}")])
        assert res.exit_code == 0, res.output
        text = (tmp_path / f"x.{suffix}").read_bytes()
        assert b"NaN" not in text and all(_strict(line) for line in text.splitlines())


# -- a full disk ----------------------------------------------------------------------------------------


def test_a_failed_write_is_cut_back_off_and_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that fills in the middle of a record: the part written is cut off again, the error names
    the file and the reason, and the journal holds whole records that verify."""
    out = _journal(tmp_path, 2)
    w = RecordWriter(out, "jsonl")
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if len(data) > 20:
            real_write(fd, bytes(data[: len(data) // 2]))  # part of the line reaches the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("clue2geo_sdk.runs.journal.os.write", half_then_full)
    with pytest.raises(ResultsWriteError) as info:
        w.write({"path": "c.jpg", "status": "error", "message": "y" * 500})
    monkeypatch.undo()
    w.close()
    assert str(info.value) == f"cannot write results to {out}: No space left on device"
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert out.read_bytes().endswith(b"\n") and verify_journal(out).ok and len(read_journal(out).records) == 2


FILL = """
import resource, signal, sys
from pathlib import Path
from clue2geo_sdk.runs.journal import RecordWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG instead
out = Path(sys.argv[1])
limit = out.stat().st_size + 700
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
w = RecordWriter(out, "jsonl")
try:
    for i in range(10):
        w.write({"path": f"new{i}.jpg", "status": "error", "message": "z" * 300})
except OSError as exc:  # (a ResultsWriteError)
    print(exc)
w.close()
"""


def test_a_real_file_size_limit_leaves_whole_records(tmp_path: Path) -> None:
    """A real write that stops part-way (RLIMIT_FSIZE: the file cannot grow, as on a full disk)."""
    out = _journal(tmp_path, 2)
    res = subprocess.run([sys.executable, "-c", FILL, str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"cannot write results to {out}: File too large"
    recs = read_journal(out).records
    assert [r["path"] for r in recs] == ["img0.jpg", "img1.jpg", "new0.jpg"]  # the one that fitted, whole
    assert out.read_bytes().endswith(b"\n") and verify_journal(out).ok


# -- cluster shards: order and resume ---------------------------------------------------------------


def _empty_newest_shard(run_dir: Path) -> None:
    """What a driver killed after opening its shard, before the first flush, leaves."""
    w = shards.ShardWriter(run_dir, parquet=False)
    w._open()
    w._fh.close()
    assert shards.shard_files(run_dir)[-1].stat().st_size == 0


def test_shards_resume_the_chain_after_an_empty_newest_shard(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    w = shards.ShardWriter(run_dir, parquet=False)
    w.write([{"path": f"a{i}.jpg", "status": "error"} for i in range(3)])
    w.close()
    _empty_newest_shard(run_dir)
    w = shards.ShardWriter(run_dir, parquet=False)
    w.write([{"path": "b.jpg", "status": "error"}])
    w.close()
    res = shards.verify_run(run_dir)
    assert res.ok and res.records == 4, res.message()


def test_shards_are_ordered_by_sequence_not_by_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime as dt

    run_dir = tmp_path / "run"
    w = shards.ShardWriter(run_dir, parquet=False)
    w.write([{"path": f"a{i}.jpg", "status": "error"} for i in range(3)])
    w.close()

    class Earlier(dt.datetime):  # the next run's clock is behind the first's (NTP, another host's clock)
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:
            return dt.datetime(2001, 1, 1, tzinfo=tz)

    monkeypatch.setattr(shards, "datetime", Earlier)
    w = shards.ShardWriter(run_dir, parquet=False)
    w.write([{"path": "b.jpg", "status": "error"}])
    w.close()
    res = shards.verify_run(run_dir)
    assert res.ok and res.records == 4, res.message()
    assert [r["path"] for r in shards.read_shards(run_dir).records] == ["a0.jpg", "a1.jpg", "a2.jpg", "b.jpg"]
    assert [shards.shard_seq(s) for s in shards.shard_files(run_dir)] == [0, 1]


def test_shards_named_by_an_earlier_version_are_read_first(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    w = shards.ShardWriter(run_dir, parquet=False)
    w.write([{"path": "old.jpg", "status": "error"}])
    w.close()
    (shard,) = shards.shard_files(run_dir)
    shard.rename(shard.with_name("part-20240101T000000000000Z-42-00000.jsonl"))  # the clock-named form
    w = shards.ShardWriter(run_dir, parquet=False)
    w.write([{"path": "new.jpg", "status": "error"}])
    w.close()
    assert [s.name[:14] for s in shards.shard_files(run_dir)] == ["part-20240101T", "part-00000000-"]
    assert shards.verify_run(run_dir).ok


# -- trust display --------------------------------------------------------------------------------------


def test_audit_verify_without_a_trusted_key_never_says_ok(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    lab_priv, lab_pub, lab_id = generate_keypair(tmp_path / "lab.key")
    forger_priv, _, forger_id = generate_keypair(tmp_path / "forger.key")
    run = CliRunner().invoke

    res = run(main, ["audit", "verify", str(journal)])
    assert res.exit_code == 0 and "ok" not in res.output.split() and not res.output.startswith("ok")
    assert "hash chain intact" in res.output and "unsigned" in res.output and "--trusted-key" in res.output

    # a forger writes a whole new valid chain and signs it with a key of their own
    recs = [
        {k: v for k, v in r.items() if k not in ("prev_hash", "record_hash")} for r in read_journal(journal).records
    ]
    recs[1]["lat"] = 48.8584
    journal.unlink()
    _write(journal, recs)
    sign_journal(journal, forger_priv, examiner="Forger")
    res = run(main, ["audit", "verify", str(journal)])
    assert res.exit_code == 0, res.output
    assert not any(line.startswith("ok") for line in res.output.splitlines())
    assert f"signature by key {forger_id}" in res.output
    assert "is self-consistent but NOT checked against a key you trust" in res.output
    res = run(main, ["audit", "verify", str(journal), "--trusted-key", str(lab_pub)])
    assert res.exit_code == 1 and "none of them trusted" in res.output

    # the lab signs, then the journal is edited into a new chain: the stored signature no longer holds
    sign_journal(journal, lab_priv, examiner="Lab")
    res = run(main, ["audit", "verify", str(journal), "--trusted-key", str(lab_pub)])
    assert res.exit_code == 0 and f"ok: {journal} signed by trusted key {lab_id}" in res.output
    recs[1]["lat"] = 0.0
    journal.unlink()
    _write(journal, recs)
    res = run(main, ["audit", "verify", str(journal)])
    assert res.exit_code == 1 and "the results changed after signing" in res.output, res.output


def test_report_takes_trusted_keys(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    priv, pub, kid = generate_keypair(tmp_path / "lab.key")
    sign_journal(journal, priv, examiner="Lab")
    res = CliRunner().invoke(
        main, ["report", str(journal), "--out", str(tmp_path / "r.html"), "--trusted-key", str(pub)]
    )
    assert res.exit_code == 0, res.output
    assert f"checked against your trusted key {kid}" in (tmp_path / "r.html").read_text()


def test_fifos_are_refused_not_waited_on(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for args in (
        ["audit", "verify", str(fifo)],
        ["audit", "verify", str(journal), "--trusted-key", str(fifo)],
        ["audit", "sign", str(journal), "--key", str(fifo)],
        ["report", str(journal), "--out", str(tmp_path / "r.html"), "--trusted-key", str(fifo)],
        ["export", str(fifo), "--to", str(tmp_path / "x.csv")],
        ["bundle", "verify", str(tmp_path), "--trusted-key", str(fifo)],
    ):
        res = _cli(*args)
        assert res.returncode == 1, (args, res.stderr)
        assert "named pipe (FIFO)" in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)


# -- records of the wrong type ----------------------------------------------------------------------


def test_export_skips_wrong_typed_records_and_names_their_lines(tmp_path: Path) -> None:
    good = {"path": "good.jpg", "status": "ok", "lat": 1.0, "lon": 2.0, "metadata": {"position": None, "problems": []}}
    bad = [
        {**good, "path": "meta-list.jpg", "metadata": ["not", "an", "object"]},
        {**good, "path": "lat-text.jpg", "lat": "north"},
        {**good, "path": "problems-numbers.jpg", "metadata": {"problems": [1, 2]}},
        {**good, "path": 7},
        {**good, "path": "lon-range.jpg", "lon": 500.0},
    ]
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [good, *bad, {**good, "path": "last.jpg"}]))
    for suffix in ("csv", "geojson", "jsonl"):
        res = CliRunner().invoke(main, ["export", str(src), "--to", str(tmp_path / f"x.{suffix}")])
        assert res.exit_code == 0 and "2 records" in res.output, res.output
        for line in range(2, 7):
            assert f"r.jsonl:{line}: record skipped" in res.stderr, res.stderr
    assert [f["properties"]["path"] for f in json.loads((tmp_path / "x.geojson").read_text())["features"]] == [
        "good.jpg",
        "last.jpg",
    ]


# -- locate: --out, resume identity, a full disk -------------------------------------------------------


def test_out_a_folder_is_one_line_error(demo_bundle: Path, photo: Path, tmp_path: Path) -> None:
    folder = tmp_path / "results"
    folder.mkdir()
    for extra in ([], ["--resume"]):
        res = CliRunner().invoke(
            main, ["locate", str(photo), "--bundle", str(demo_bundle), "--out", str(folder), *extra]
        )
        assert res.exit_code == 1, res.output
        assert res.stderr.strip().splitlines() == [
            f"error: --out {folder} is a folder; pass a results file such as {folder / 'results.jsonl'} "
            "(a folder is for a --ray run)"
        ]
    assert list(folder.iterdir()) == []


def test_run_batch_refuses_a_folder_as_out(geo: Geolocator, tmp_path: Path) -> None:
    with pytest.raises(ResultsPathError, match="is a folder; results go to a file"):
        run_batch(geo, [tmp_path / "x.jpg"], tmp_path)
    assert list(tmp_path.iterdir()) == []


def _crop(photo: Path, dest: Path, i: int) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    Image.open(photo).convert("RGB").crop((i * 30, 0, 320 + i * 30, 240)).save(dest, quality=90)
    return dest


def test_resume_tells_images_apart_by_their_bytes(
    geo: Geolocator, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "case.jsonl"
    a, b = tmp_path / "A", tmp_path / "B"
    _crop(photo, a / "img" / "x.jpg", 0)
    _crop(photo, b / "img" / "x.jpg", 1)  # same relative path, another image
    notes: list[str] = []
    monkeypatch.chdir(a)
    s = run_batch(geo, [Path("img/x.jpg")], out, on_notice=notes.append)
    assert (s.ok, s.skipped) == (1, 0)
    monkeypatch.chdir(b)  # resumed from another working folder: B's x.jpg is another image
    s = run_batch(geo, [Path("img/x.jpg")], out, resume=True, on_notice=notes.append)
    assert (s.ok, s.skipped, s.rerun) == (1, 0, 0)
    assert len(notes) == 1 and "the record under this path is of another image" in notes[0]
    # the same images named by absolute path: both already done, nothing runs twice
    s = run_batch(geo, [a / "img" / "x.jpg", b / "img" / "x.jpg"], out, resume=True, on_notice=notes.append)
    assert (s.ok, s.skipped) == (0, 2)
    rows = latest(read_journal(out).records)
    assert len(rows) == 2 and {r["abs_path"] for r in rows.values()} == {str(a / "img/x.jpg"), str(b / "img/x.jpg")}
    res = CliRunner().invoke(main, ["export", str(out), "--to", str(tmp_path / "x.csv")])
    assert res.exit_code == 0 and "2 records" in res.output
    # A's file now holds other bytes: said, run again, and its new record supersedes the old one
    _crop(photo, a / "img" / "x.jpg", 2)
    notes.clear()
    monkeypatch.chdir(a)
    s = run_batch(geo, [Path("img/x.jpg")], out, resume=True, on_notice=notes.append)
    assert (s.ok, s.rerun) == (1, 1)
    assert len(notes) == 1 and "img/x.jpg: the file now holds other bytes than when it was recorded" in notes[0]
    assert len(latest(read_journal(out).records)) == 2 and verify_journal(out).ok


FULL_LOCATE = """
import resource, signal, sys
from clue2geo_sdk.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = ["clue2geo", *sys.argv[2:]]
main()
"""


def test_locate_on_a_full_disk_ends_in_one_line_and_resumes(demo_bundle: Path, photo: Path, tmp_path: Path) -> None:
    images = [_crop(photo, tmp_path / "in" / f"{i}.jpg", i) for i in range(3)]
    out = tmp_path / "r.jsonl"
    args = ["locate", str(images[0]), "--bundle", str(demo_bundle), "--out", str(out), *QUICK]
    assert CliRunner().invoke(main, args).exit_code == 0
    size = out.stat().st_size  # one record; then the file can grow by 10 bytes only: part of the next line
    cmd = [sys.executable, "-c", FULL_LOCATE, str(size + 10), "locate", *map(str, images)]
    cmd += ["--bundle", str(demo_bundle), "--out", str(out), "--resume", *QUICK]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert f"error: cannot write results to {out}: File too large" in res.stderr.splitlines()
    assert out.stat().st_size == size and verify_journal(out).ok  # the torn part was cut off
    again = ["locate", *map(str, images), "--bundle", str(demo_bundle), "--out", str(out), "--resume", *QUICK]
    res = CliRunner().invoke(main, again)
    assert res.exit_code == 0 and "2 located, 0 failed, 1 skipped" in res.output, res.output
    assert verify_journal(out).ok and len(latest(read_journal(out).records)) == 3


def test_two_copies_of_one_photo_stay_two_images_when_one_is_edited(tmp_path) -> None:
    """Byte-identical copies a/p.jpg and b/p.jpg, each named "p.jpg" from its own folder: while both
    files exist they are two images, so editing one never supersedes the other's row."""
    from clue2geo_sdk.runs.resume import latest

    a, b = tmp_path / "a" / "p.jpg", tmp_path / "b" / "p.jpg"
    for f in (a, b):
        f.parent.mkdir()
        f.write_bytes(b"same bytes")
    recs = [
        {"path": "p.jpg", "abs_path": str(a), "image_sha256": "1" * 64, "status": "ok"},
        {"path": "p.jpg", "abs_path": str(b), "image_sha256": "1" * 64, "status": "ok"},
        {"path": "p.jpg", "abs_path": str(b), "image_sha256": "2" * 64, "status": "ok"},  # b edited
    ]
    rows = latest(recs)
    assert sorted(r["abs_path"] for r in rows.values()) == [str(a), str(b)]
    assert {r["image_sha256"] for r in rows.values()} == {"1" * 64, "2" * 64}
    # a case folder moved (the old file gone): the same bytes under the same name are the same image
    moved = [{**recs[0], "abs_path": str(tmp_path / "gone" / "p.jpg")}, recs[1]]
    assert len(latest(moved)) == 1


def test_results_errors_are_sdk_errors_and_travel_between_processes(tmp_path, geo) -> None:
    import errno
    import pickle

    from clue2geo_sdk import Clue2GeoError, ResultsExistError, ResultsWriteError
    from clue2geo_sdk.runs.batch import run_batch

    err = ResultsWriteError(tmp_path / "r.jsonl", OSError(errno.ENOSPC, "No space left on device"))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ResultsWriteError and str(back) == str(err) and back.errno == errno.ENOSPC
    out = tmp_path / "r.jsonl"
    out.write_text('{"path": "x.jpg", "status": "ok"}\n')
    with pytest.raises(ResultsExistError, match="already holds results") as info:
        run_batch(geo, [], out)
    assert isinstance(info.value, Clue2GeoError) and isinstance(info.value, FileExistsError)
