"""The typed journal record (runs.records.Record): read from real journal lines and back, unchanged.

A record written by a real ``clue2geo locate`` run on the demo bundle (an ok one, one with the photo's
own GPS position, a failure, and one with NaN / Infinity nulled by the chain) is read into a Record
and given back as a dict equal to the line, key order included, so its ``record_hash`` still holds.
A malformed record is refused by the strict reading with record_problem's words, kept as read by the
lenient one; the keys (identity, CSV columns, the kinds) are Record's fields, declared once.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import attrs
import pytest
from click.testing import CliRunner
from conftest import EXAMPLE_IMAGES, FAST
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from clue2geo_sdk import Options, Prediction
from clue2geo_sdk.cli import main
from clue2geo_sdk.errors import RecordFormatError
from clue2geo_sdk.results import Candidate, Failure
from clue2geo_sdk.runs.chain import CHAIN_FIELDS, NONFINITE, canonical, record_hash, verify_journal
from clue2geo_sdk.runs.formats import CSV_FIELDS, METADATA_COLUMNS
from clue2geo_sdk.runs.journal import RecordWriter, read_journal
from clue2geo_sdk.runs.records import (
    FIELDS_OF_KIND,
    IDENTITY_FIELDS,
    RECORD_KEYS,
    Record,
    identity_of,
    record_keys,
    record_of,
    record_problem,
)

QUICK = ["--no-verify", "--device", "cpu", *(f"--{k.replace('_', '-')}={v}" for k, v in FAST.items())]
EIFFEL = (48.858266666666665, 2.2945)  # written into gps.jpg's EXIF


def _with_gps(src: Path, dest: Path) -> Path:
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x8825] = {
        1: "N",
        2: (IFDRational(48, 1), IFDRational(51496, 1000), IFDRational(0, 1)),
        3: "E",
        4: (IFDRational(2, 1), IFDRational(17670, 1000), IFDRational(0, 1)),
    }
    Image.open(src).save(dest, exif=exif)
    return dest


@pytest.fixture(scope="module")
def journal(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run: a photo, a photo with its own GPS position, a file that is no image; then a record
    with NaN and Infinity appended through the writer (the chain nulls them and says so)."""
    folder = tmp_path_factory.mktemp("record") / "img"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((EXAMPLE_IMAGES / "summer_palace_beijing.jpg").read_bytes())
    _with_gps(EXAMPLE_IMAGES / "flower.jpg", folder / "gps.jpg")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = folder.parent / "run.jsonl"
    res = CliRunner().invoke(main, ["locate", str(folder), "--bundle", str(demo_bundle), "--out", str(out), *QUICK])
    assert res.exit_code == 3, res.output  # one failed
    first = read_journal(out).records[0]
    nan = {k: v for k, v in first.items() if k not in CHAIN_FIELDS}
    nan |= {"path": "nan.jpg", "confidence": math.nan, "spread_km": math.inf}
    nan["metadata"] = {"position": {"lat": 1.0, "lon": 2.0, "altitude_m": math.nan, "source": "exif"}, "problems": []}
    writer = RecordWriter(out, "jsonl")
    writer.write(nan)
    writer.close()
    return out


def _by_name(out: Path) -> dict[str, dict[str, Any]]:
    return {Path(r["path"]).name: r for r in read_journal(out).records}


def test_real_records_round_trip_unchanged(journal: Path) -> None:
    assert verify_journal(journal).ok
    recs = _by_name(journal)
    assert set(recs) == {"a.jpg", "gps.jpg", "broken.jpg", "nan.jpg"}
    assert recs["broken.jpg"]["status"] == "error" and recs["gps.jpg"]["metadata"]["position"]
    assert recs["nan.jpg"][NONFINITE] and recs["nan.jpg"]["confidence"] is None
    for name, raw in recs.items():
        rec = Record.from_dict(raw)  # every record the SDK writes is well-formed
        back = rec.to_dict()
        assert back == raw and list(back) == list(raw), name  # same keys, same order, same values
        assert canonical(back) == canonical(raw) and record_hash(back) == raw["record_hash"], name
        assert not rec.extra and rec.keys == tuple(raw)
        assert Record.from_dict(raw, strict=False) == rec
        assert pickle.loads(pickle.dumps(rec)) == rec


def test_typed_fields_of_real_records(journal: Path, demo_bundle: Path) -> None:
    recs = {name: Record.from_dict(raw) for name, raw in _by_name(journal).items()}
    ok, gps, failed, nan = recs["a.jpg"], recs["gps.jpg"], recs["broken.jpg"], recs["nan.jpg"]
    assert ok.ok and ok.status == "ok" and isinstance(ok.lat, float) and isinstance(ok.candidates, list)
    assert ok.demo is True and ok.identity == {k: getattr(ok, k) for k in IDENTITY_FIELDS}
    assert ok.prediction() == Prediction.from_dict(ok.to_dict())
    assert all(isinstance(c, Candidate) for c in ok.candidate_objects()) and ok.candidate_objects()
    pos = gps.metadata_position
    assert pos is not None and (pos["lat"], pos["lon"]) == pytest.approx(EIFFEL)
    assert ok.metadata_position is None
    assert not failed.ok and failed.error and failed.message and failed.lat is None
    assert "lat" not in failed.keys  # absent stays absent (to_dict would not add it)
    with pytest.raises(RecordFormatError, match="not 'ok'"):
        failed.prediction()
    assert nan.confidence is None and nan.nonfinite == [
        "confidence: NaN is not a number; written as null",
        "spread_km: Infinity is not a number; written as null",
    ]
    assert nan.metadata is not None and nan.metadata["problems"] == [
        "metadata.position.altitude_m: NaN is not a number; dropped"
    ]


MALFORMED: list[dict[str, Any]] = [
    {"path": "lat.jpg", "status": "ok", "lat": "x", "lon": 2.0},
    {"path": "lat.jpg", "status": "ok", "lon": 2.0},
    {"path": "lon.jpg", "status": "ok", "lat": 1.0, "lon": 200.0},
    {"path": "c.jpg", "status": "ok", "lat": 1.0, "lon": 2.0, "candidates": 5},
    {"path": "c.jpg", "status": "ok", "lat": 1.0, "lon": 2.0, "cues": {"a": 1}, "country": 5},
    {"path": "m.jpg", "status": "ok", "lat": 1.0, "lon": 2.0, "metadata": []},
    {"path": "m.jpg", "status": "error", "metadata": {"position": {"lat": "a"}}},
    {"path": "m.jpg", "status": "error", "metadata": {"problems": "x"}},
    {"path": "t.jpg", "status": "error", "timings": "slow", "outside_region": "many", "fallback": 1},
    {"path": "n.jpg", "status": "error", "confidence": math.nan},
    {"path": 5, "status": "ok"},
    {"status": "error"},
    {"path": "s.jpg", "status": "skipped"},
]


@pytest.mark.parametrize("raw", MALFORMED, ids=lambda r: str(r.get("path")))
def test_a_malformed_record_is_refused_strictly_and_kept_leniently(raw: dict[str, Any]) -> None:
    why = record_problem(raw)
    assert why is not None
    with pytest.raises(RecordFormatError) as caught:
        Record.from_dict(raw)
    assert str(caught.value) == why  # record_problem's words, as valid_records reports them
    rec = Record.from_dict(raw, strict=False)
    assert rec.to_dict() == raw and list(rec.to_dict()) == list(raw)  # (the same NaN object: equal)


@pytest.mark.parametrize("value", [5, ["x"], "text", None])
def test_what_is_no_object_is_no_record(value: Any) -> None:
    for strict in (True, False):
        with pytest.raises(RecordFormatError, match=f"a {type(value).__name__}, not a record"):
            Record.from_dict(value, strict)


def test_unknown_keys_and_nulls_are_kept_as_read() -> None:
    raw = {"zz_newer": {"x": [1, 2]}, "path": "a.jpg", "status": "error", "lat": None, "keys": 1, "extra": 2}
    rec = Record.from_dict(raw)
    assert rec.extra == {"zz_newer": {"x": [1, 2]}, "keys": 1, "extra": 2}
    assert rec.keys == ("zz_newer", "path", "status", "lat", "keys", "extra")
    assert rec.to_dict() == raw and list(rec.to_dict()) == list(raw)
    built = Record(path="b.jpg", status="ok", lat=1.0, lon=2.0)
    assert built.to_dict() == {"path": "b.jpg", "status": "ok", "lat": 1.0, "lon": 2.0}


def test_the_keys_are_declared_once() -> None:
    for cls in (Prediction, Failure):
        assert {f.name for f in attrs.fields(cls)} <= set(RECORD_KEYS), cls
    ident = identity_of(_bundle(), Options())
    assert tuple(ident) == IDENTITY_FIELDS
    rec = record_of(Failure(image="x.jpg", error="E", message="m"), "x.jpg", 0.5, ident)
    assert set(rec) <= set(RECORD_KEYS) and set(CHAIN_FIELDS) | {NONFINITE} <= set(RECORD_KEYS)
    assert set(CSV_FIELDS) - set(METADATA_COLUMNS) <= set(RECORD_KEYS)
    kinds = [k for keys in FIELDS_OF_KIND.values() for k in keys]
    assert len(kinds) == len(set(kinds)) and set(kinds) <= set(RECORD_KEYS)
    assert set(RECORD_KEYS) - set(kinds) == {"path", "status", "lat", "lon", NONFINITE}  # checked on their own
    with pytest.raises(ValueError, match="not record keys: latt"):
        record_keys("lat", "latt")


def _bundle() -> Any:
    @attrs.frozen
    class _Bundle:  # identity_of reads these two only
        digest: str = "b" * 64
        demo: bool = True

    return _Bundle()


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_KEY = st.sampled_from(RECORD_KEYS) | st.text(max_size=10)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEY, _JSON, max_size=12))
def test_any_json_object_round_trips(raw: dict[str, Any]) -> None:
    rec = Record.from_dict(raw, strict=False)
    assert rec.to_dict() == raw and list(rec.to_dict()) == list(raw)
    assert canonical(rec.to_dict()) == canonical(raw)
    assert pickle.loads(pickle.dumps(rec)).to_dict() == raw
    why = record_problem(raw)
    if why is None:
        assert Record.from_dict(raw).to_dict() == raw
    else:
        with pytest.raises(RecordFormatError) as caught:
            Record.from_dict(raw)
        assert str(caught.value) == why


# -- further digests of the input (locate --hash sha3-512) --------------------------------------


def test_input_digests_are_hashlib_digests_of_the_bytes() -> None:
    import hashlib

    from clue2geo_sdk.runs.records import EXTRA_HASHES, input_digests

    data = (EXAMPLE_IMAGES / "summer_palace_beijing.jpg").read_bytes()
    want = hashlib.sha3_512(data).hexdigest()
    assert input_digests(data, ["sha3-512"]) == {"image_sha3_512": want} and len(want) == 128
    assert input_digests(data, ["sha256"]) == {} and input_digests(data, ()) == {}  # sha256 is always recorded
    assert input_digests(None, ["sha3-512"]) == {}  # unreadable: no digest, as for the sha256
    assert set(EXTRA_HASHES.values()) <= set(FIELDS_OF_KIND["text"])
    with pytest.raises(ValueError, match="unknown hash.*md5"):
        input_digests(data, ["md5"])
    rec = record_of(Failure(image="x.jpg", error="E", message="m"), "x.jpg", 0.5, identity_of(_bundle(), Options()),
                    digests={"image_sha3_512": want})  # fmt: skip
    assert rec["image_sha3_512"] == want and list(rec).index("image_sha3_512") > list(rec).index("image_sha256")


def test_a_record_without_the_sha3_field_still_reads_and_its_chain_holds(tmp_path: Path) -> None:
    """Journals written before the field existed: read strictly, given back equal, chain intact; a
    malformed value of the new field is named like any other."""
    out = tmp_path / "old.jsonl"
    w = RecordWriter(out, "jsonl")
    w.write({"path": "a.jpg", "status": "ok", "lat": 1.0, "lon": 2.0, "image_sha256": "ab" * 32})
    w.write({"path": "b.jpg", "status": "ok", "lat": 1.0, "lon": 2.0, "image_sha3_512": "cd" * 64})
    w.close()
    lines = read_journal(out).records
    old, new = (Record.from_dict(r) for r in lines)
    assert old.image_sha3_512 is None and "image_sha3_512" not in old.to_dict() and old.to_dict() == lines[0]
    assert new.image_sha3_512 == "cd" * 64 and new.extra == {}
    assert all(record_hash(r) == r["record_hash"] for r in lines) and verify_journal(out).ok
    with pytest.raises(RecordFormatError, match="'image_sha3_512' is int"):
        Record.from_dict({"path": "c.jpg", "status": "error", "image_sha3_512": 5})
