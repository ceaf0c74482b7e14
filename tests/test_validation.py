"""`clue2geo validate`: bootstrap intervals against scipy and by hand, the error quantiles, the group
threshold, the eval set's digest and forms; end to end on the demo bundle with a generated geotagged
set, then `bundle attach-validation` on a copy of the bundle, `bundle verify` and the one-line headline."""

from __future__ import annotations

import csv
import hashlib
import html
import json
import os
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from scipy import stats

from clue2geo_sdk.bundle.manifest import Bundle
from clue2geo_sdk.bundle.validation import NO_VALIDATION, VALIDATION_FORMAT, headline, load_report, summary_line
from clue2geo_sdk.cli import main
from clue2geo_sdk.cli.common import EXIT_SOME_FAILED
from clue2geo_sdk.errors import InvalidArgumentError
from clue2geo_sdk.evaluation.evalset import read_evalset
from clue2geo_sdk.evaluation.validation_stats import group, summarize
from clue2geo_sdk.geo.countries import countries
from clue2geo_sdk.inputs.metadata.photo import read_metadata

KMS = ["1", "25", "200", "750", "2500"]
# (name, lat, lon, continent) of the generated set; cut.jpg is geotagged but its pixels are truncated
PLACES = [
    ("paris.jpg", 48.8584, 2.2945, "Europe"),
    ("beijing.jpg", 39.9999, 116.2755, "Asia"),
    ("sydney.jpg", -33.8568, 151.2153, "Oceania"),
    ("newyork.jpg", 40.6892, -74.0445, "North America"),
    ("tokyo.jpg", 35.6586, 139.7454, "Asia"),
    ("sub/rio.jpg", -22.9519, -43.2105, "South America"),
]
CUT = ("cut.jpg", -1.2921, 36.8219, "Africa")


def dms(value: float) -> tuple[Fraction, Fraction, Fraction]:
    """Degrees, minutes, seconds (hundredths) as EXIF rationals, the way phones write them."""
    v = abs(value)
    d = int(v)
    m = int((v - d) * 60)
    return Fraction(d), Fraction(m), Fraction(round((v - d - m / 60) * 3600 * 100), 100)


def geotagged(path: Path, lat: float, lon: float, seed: int, size: tuple[int, int] = (160, 120)) -> Path:
    ex = Image.Exif()
    ex[0x8825] = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
    small = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(path, "JPEG", quality=92, exif=ex.tobytes())
    return path


# --- statistics -----------------------------------------------------------------------------------


def test_intervals_match_scipy_percentile_bootstrap() -> None:
    rng = np.random.default_rng(7)
    d = rng.lognormal(5.0, 2.0, size=150)
    d[rng.choice(150, 12, replace=False)] = np.nan  # failures: misses, left out of the quantiles
    ours = summarize([None if np.isnan(x) else float(x) for x in d], resamples=4000, seed=1)

    def ref(fn):  # scipy's percentile bootstrap of the same statistic, its own resamples
        res = stats.bootstrap((d,), fn, method="percentile", n_resamples=4000, random_state=3, vectorized=True)
        return res.confidence_interval

    for t in (25.0, 200.0, 2500.0):
        ci = ref(lambda x, axis, t=t: np.mean(x < t, axis=axis))
        iv = ours.accuracy[f"{t:g}"]
        assert iv.value == pytest.approx(np.mean(d < t))
        assert iv.low == pytest.approx(ci.low, abs=0.025) and iv.high == pytest.approx(ci.high, abs=0.025)
    for key, fn in (("median", np.nanmedian), ("p90", lambda x, axis: np.nanquantile(x, 0.9, axis=axis))):
        ci = ref(lambda x, axis, fn=fn: fn(x, axis=axis))
        iv = ours.error_km[key]
        assert iv.low == pytest.approx(ci.low, rel=0.1) and iv.high == pytest.approx(ci.high, rel=0.1)
    assert ours.error_km["median"].value == pytest.approx(np.nanmedian(d))
    assert ours.error_km["p90"].value == pytest.approx(np.nanquantile(d, 0.9))
    assert ours.n == 150 and ours.n_located == 138
    # fixed seed: the same numbers again
    assert summarize(list(np.nan_to_num(d, nan=1e9)), seed=1) == summarize(list(np.nan_to_num(d, nan=1e9)), seed=1)


def test_intervals_by_hand_on_two_images() -> None:
    # resamples are {5, 5}, {5, 500}, {500, 500}: accuracy at 25 km 1, 1/2, 0; median 5, 252.5, 500
    s = summarize([5.0, 500.0])
    assert s.accuracy["25"].to_dict() == {"value": 0.5, "low": 0.0, "high": 1.0}
    assert s.accuracy["1"].to_dict() == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert s.accuracy["750"].to_dict() == {"value": 1.0, "low": 1.0, "high": 1.0}
    assert s.error_km["median"].to_dict() == {"value": 252.5, "low": 5.0, "high": 500.0}
    assert s.error_km["p90"].value == pytest.approx(5 + 0.9 * 495)
    # a failure is a miss; the quantiles are over the one located image
    f = summarize([None, 10.0])
    assert f.accuracy["25"].value == 0.5 and f.n_located == 1
    assert f.error_km["median"].to_dict() == {"value": 10.0, "low": 10.0, "high": 10.0}
    nothing = summarize([None, None])
    assert nothing.accuracy["2500"].high == 0.0 and nothing.error_km["median"].value is None


def test_groups_below_the_minimum_are_listed_with_their_size() -> None:
    labels = ["FR", "FR", "FR", "JP", "JP", "BR"]
    g = group(labels, [1.0, 30.0, None, 5.0, 900.0, 3.0], by="country", min_n=3, names={"FR": "France"}, resamples=200)
    assert list(g.reported) == ["FR"]  # exactly min_n is reported
    assert g.reported["FR"].accuracy["25"].value == pytest.approx(1 / 3) and g.reported["FR"].n_located == 2
    assert g.too_few == {"JP": 2, "BR": 1}  # largest first
    d = g.to_dict()
    assert d["groups"][0]["name"] == "France" and d["groups"][0]["n"] == 3
    assert d["too_few_to_report"] == [{"key": "JP", "name": "JP", "n": 2}, {"key": "BR", "name": "BR", "n": 1}]


def test_countries_carry_their_continent() -> None:
    c = countries()
    assert (c.get("FR").continent, c.get("BR").continent, c.get("AU").continent) == (
        "Europe",
        "South America",
        "Oceania",
    )
    assert "Seven seas (open ocean)" not in c.continents and "Africa" in c.continents


# --- the eval set ---------------------------------------------------------------------------------


def test_digest_follows_photos_and_coordinates(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    for i, (name, lat, lon, _) in enumerate(PLACES[:3]):
        geotagged(folder / name, lat, lon, seed=i)
    first = read_evalset(folder)
    assert first.digest == read_evalset(folder).digest and len(first.items) == 3
    # the documented method, recomputed: sorted path, file sha256, the metadata's coordinates
    lines = []
    for p in sorted(folder.rglob("*.jpg"), key=lambda p: p.relative_to(folder).as_posix()):
        pos = read_metadata(p.read_bytes()).position
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        lines.append(f"{p.relative_to(folder).as_posix()}\t{sha}\t{pos.lat!r}\t{pos.lon!r}\n")
    assert first.digest == hashlib.sha256("".join(lines).encode()).hexdigest()
    geotagged(folder / PLACES[0][0], PLACES[0][1], PLACES[0][2], seed=99)  # other pixels, same place
    pixels = read_evalset(folder).digest
    assert pixels != first.digest
    geotagged(folder / PLACES[0][0], PLACES[0][1] + 0.01, PLACES[0][2], seed=99)  # same pixels, other place
    assert read_evalset(folder).digest not in (first.digest, pixels)
    # a CSV: a coordinate changed changes it, the rows' order does not
    rows = [(name, lat, lon) for name, lat, lon, _ in PLACES[:3]]
    table = folder / "set.csv"
    table.write_text("path,lat,lon\n" + "".join(f"{n},{a},{o}\n" for n, a, o in rows))
    a = read_evalset(table).digest
    table.write_text("path,lat,lon\n" + "".join(f"{n},{a},{o}\n" for n, a, o in reversed(rows)))
    assert read_evalset(table).digest == a
    table.write_text("path,lat,lon\n" + "".join(f"{n},{a},{o + 0.5}\n" for n, a, o in rows))
    assert read_evalset(table).digest != a


def test_a_csv_digest_does_not_depend_on_how_paths_are_written(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    rows = [(name, lat, lon) for name, lat, lon, _ in PLACES[:2]]
    for i, (name, lat, lon) in enumerate(rows):
        geotagged(folder / "sub" / name, lat, lon, seed=i)
    table = folder / "set.csv"
    table.write_text("path,lat,lon\n" + "".join(f"sub/{n},{a},{o}\n" for n, a, o in rows))
    plain = read_evalset(table)
    forms = [f"./sub/{rows[0][0]}", f"sub\\{rows[1][0]}"]  # './' and a Windows separator
    table.write_text(
        "\ufeffpath,lat,lon\n" + "".join(f"{f},{a},{o}\n" for f, (_, a, o) in zip(forms, rows, strict=True))
    )
    table.write_bytes(table.read_text().encode("utf-8"))  # with a byte-order mark, as a spreadsheet saves it
    assert read_evalset(table).digest == plain.digest
    absolute = [str(folder / "sub" / n) for n, _, _ in rows]
    table.write_text("path,lat,lon\n" + "".join(f"{f},{a},{o}\n" for f, (_, a, o) in zip(absolute, rows, strict=True)))
    assert read_evalset(table).digest == plain.digest and [i.rel for i in plain.items] == [
        f"sub/{rows[0][0]}",
        f"sub/{rows[1][0]}",
    ]
    os.mkfifo(folder / "pipe.jpg")  # would block a hash for ever: an unreadable row instead
    table.write_text("path,lat,lon\npipe.jpg,1,2\n")
    [item] = read_evalset(table).items
    assert item.sha256 == "unreadable"


def test_eval_set_forms_and_what_is_left_out(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    geotagged(folder / "a.jpg", 10.0, 20.0, seed=1)
    geotagged(folder / "deep" / "b.jpg", -10.0, -20.0, seed=2, size=(200, 100))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    Image.new("RGB", (64, 64)).save(folder / "nogps.png")
    es = read_evalset(folder, name="mine")
    assert [i.rel for i in es.items] == ["a.jpg", "deep/b.jpg"] and es.name == "mine"
    assert (es.items[1].lat, es.items[1].lon) == pytest.approx((-10.0, -20.0))
    assert {p for p, _ in es.excluded} == {"broken.jpg", "nogps.png"}
    assert all("no position" in why for _, why in es.excluded)
    assert es.kinds() == {
        "formats": {"JPEG": 2},
        "n_sized": 2,
        "distinct_sizes": 2,
        "min_pixels": 19200,
        "max_pixels": 20000,
    }
    # the eval form: IMG_ID,LAT,LON with an images folder; bad rows skipped and named
    table = tmp_path / "meta.csv"
    table.write_text("IMG_ID,LAT,LON\na.jpg,1.5,2.5\nmissing.jpg,3,4\nx.jpg,abc,1\ny.jpg,91,0\n")
    es2 = read_evalset(table, images=folder)
    assert [(i.rel, i.lat) for i in es2.items] == [("a.jpg", 1.5), ("missing.jpg", 3.0)]
    assert es2.items[1].sha256 == "unreadable" and len(es2.skipped_rows) == 2
    (tmp_path / "bad.csv").write_text("file,latitude\n")
    with pytest.raises(InvalidArgumentError, match="path,lat,lon"):
        read_evalset(tmp_path / "bad.csv")
    with pytest.raises(InvalidArgumentError, match="no such eval set"):
        read_evalset(tmp_path / "nope")


# --- end to end -----------------------------------------------------------------------------------


def test_validate_attach_verify_headline(demo_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "geoset"
    for i, (name, lat, lon, _) in enumerate(PLACES):
        geotagged(folder / name, lat, lon, seed=i)
    whole = geotagged(tmp_path / "whole.jpg", CUT[1], CUT[2], seed=7).read_bytes()
    (folder / CUT[0]).write_bytes(whole[: len(whole) // 2])  # its position reads, its pixels do not
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # unreadable: left out, listed
    out = tmp_path / "report"
    args = [
        "validate", str(demo_bundle), str(folder), "--out", str(out), "--name", "geoset", "--min-group", "2",
        "--bootstrap", "500", "--max-cue-tokens", "16", "--max-answer-tokens", "16", "--no-verify", "--device", "cpu",
    ]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == EXIT_SOME_FAILED, res.output  # cut.jpg failed in the pipeline
    data = json.loads((out / "validation.json").read_text())
    line = summary_line(data)
    assert line in res.output and str(out / "validation.html") in res.output
    assert load_report(out / "validation.json")["format"] == VALIDATION_FORMAT
    assert data["evalset"]["n"] == 7 and data["n_failed"] == 1 and data["failed"][0]["path"] == "cut.jpg"
    assert [e["path"] for e in data["evalset"]["excluded"]] == ["broken.jpg"]
    assert data["bundle"]["models_digest"] == Bundle.open(demo_bundle, verify=False).models_digest
    assert data["reproducibility"]["evalset_digest"] == read_evalset(folder).digest
    assert data["evalset"]["changed_since_read"] == []  # each record made from the bytes the digest covers
    assert data["reproducibility"]["options_digest"] and data["reproducibility"]["engine"] == "batched"
    per = list(csv.DictReader((out / "per-image.csv").open()))
    dists = [float(r["distance_km"]) if r["status"] == "ok" else np.inf for r in per]
    for km in KMS:  # each rate is the per-image table's, failures as misses, inside its interval
        a = data["accuracy"][km]
        assert a["value"] == pytest.approx(np.mean(np.array(dists) < float(km)))
        assert a["low"] <= a["value"] <= a["high"]
    assert data["error_km"]["median"]["value"] == pytest.approx(np.median([d for d in dists if np.isfinite(d)]))
    continents = {g["name"]: g["n"] for g in data["by_continent"]["groups"]}
    few = {g["name"]: g["n"] for g in data["by_continent"]["too_few_to_report"]}
    assert continents == {"Asia": 2} and few == {
        "Africa": 1,
        "Europe": 1,
        "North America": 1,
        "Oceania": 1,
        "South America": 1,
    }
    assert data["continents_without_images"] == ["Antarctica"]
    assert sum(b["count"] for b in data["calibration"]["bands"]) + data["calibration"]["n_without_confidence"] == 7
    limits = " ".join(data["limitations"])
    assert (
        "random-weight" in limits and "n = 7" in limits and "Antarctica" in limits and "Every photo is JPEG" in limits
    )
    page = (out / "validation.html").read_text()
    assert html.escape(line) in page and "investigative lead" in page and "Content-Security-Policy" in page
    assert "http://" not in page and "https://" not in page and 'id="demo-warning"' in page
    # resumed: nothing runs again, the same numbers
    n_lines = (out / "predictions.jsonl").read_bytes().count(b"\n")
    again = CliRunner().invoke(main, args)
    assert again.exit_code == EXIT_SOME_FAILED and (out / "predictions.jsonl").read_bytes().count(b"\n") == n_lines
    assert json.loads((out / "validation.json").read_text())["accuracy"] == data["accuracy"]
    # attached to a copy of the bundle: verified with it, and its headline is the report's line
    copy = tmp_path / "bundle"
    shutil.copytree(demo_bundle, copy)
    assert headline(Bundle.open(copy, verify=False)) == NO_VALIDATION
    res = CliRunner().invoke(main, ["bundle", "attach-validation", str(copy), str(out)])
    assert res.exit_code == 0, res.output
    assert CliRunner().invoke(main, ["bundle", "verify", str(copy)]).exit_code == 0
    assert headline(Bundle.open(copy)) == line and line.startswith("validated on geoset (n = 7)")
