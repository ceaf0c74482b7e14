"""Metrics against an independent implementation (geopy) and hand-made cases at the thresholds' edges;
`clue2geo eval` end to end on a small generated dataset."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from geopy.distance import great_circle
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from clue2geo_sdk.cli import main
from clue2geo_sdk.cli.common import EXIT_SOME_FAILED
from clue2geo_sdk.evaluation.metrics import compute_metrics, distance_km, geoscore, read_dataset
from clue2geo_sdk.geo.countries import countries

R = 6371.0088
KM_PER_DEG = math.pi * R / 180  # along a meridian


@given(st.floats(-90, 90), st.floats(-180, 180), st.floats(-90, 90), st.floats(-180, 180))
def test_distance_matches_geopy(lat1: float, lon1: float, lat2: float, lon2: float) -> None:
    ref = great_circle((lat1, lon1), (lat2, lon2), radius=R).km
    assert distance_km(lat1, lon1, lat2, lon2) == pytest.approx(ref, abs=1e-6, rel=1e-9)


def test_known_distances() -> None:
    assert distance_km(0, 0, 0, 180) == pytest.approx(math.pi * R)
    assert distance_km(90, 0, -90, 0) == pytest.approx(math.pi * R)
    assert distance_km(10, 20, 10, 20) == 0.0
    assert distance_km(0, 179.5, 0, -179.5) == pytest.approx(KM_PER_DEG)  # across the antimeridian


def test_thresholds_are_strict_less_than() -> None:
    # distances exactly on each threshold do not count; a hair below does
    on = [1.0, 25.0, 200.0, 750.0, 2500.0]
    m = compute_metrics(on)
    assert m.accuracy == {"1": 0.0, "25": 0.2, "200": 0.4, "750": 0.6, "2500": 0.8}
    below = compute_metrics([t - 1e-9 for t in on])
    assert below.accuracy == {"1": 0.2, "25": 0.4, "200": 0.6, "750": 0.8, "2500": 1.0}


def test_failures_are_misses_and_geoscore() -> None:
    m = compute_metrics(
        [0.5, None, 3000.0, None], country_true=["FR", "US", "JP", None], country_pred=["FR", None, "CN", None]
    )
    assert m.n == 4 and m.n_failed == 2
    assert m.accuracy["1"] == 0.25 and m.accuracy["2500"] == 0.25
    assert m.median_km == pytest.approx(1500.25) and m.mean_km == pytest.approx(1500.25)
    assert m.geoscore == pytest.approx((5000 * math.exp(-0.5 / 1492.7) + 5000 * math.exp(-3000 / 1492.7)) / 4)
    assert m.country_accuracy == 0.25 and m.country_accuracy_borders is None
    borders = compute_metrics([1.0, 2.0, 3.0], border_true=["CA", None, "FR"], border_pred=["CA", None, "BE"])
    assert borders.country_accuracy_borders == pytest.approx(1 / 3)  # at sea is a miss, not a match
    assert geoscore(0.0) == 5000.0
    empty = compute_metrics([])
    assert empty.n == 0 and empty.median_km is None


def test_read_dataset(tmp_path: Path) -> None:
    meta = tmp_path / "m.csv"
    meta.write_text("IMG_ID,LAT,LON\na.jpg,1,2\nb.jpg,x,2\nc.jpg,95,0\nd.jpg,-3,4\ne.jpg,5,6\n")
    samples, problems = read_dataset(meta)
    assert [s.img_id for s in samples] == ["a.jpg", "d.jpg", "e.jpg"] and len(problems) == 2
    pick1, _ = read_dataset(meta, limit=2, seed=3)
    pick2, _ = read_dataset(meta, limit=2, seed=3)
    assert pick1 == pick2 and len(pick1) == 2
    (tmp_path / "bad.csv").write_text("ID,LAT\n")
    with pytest.raises(ValueError, match="IMG_ID"):
        read_dataset(tmp_path / "bad.csv")


def test_eval_command_end_to_end(demo_bundle: Path, photo: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    img = Image.open(photo).convert("RGB")
    # 1.jpg: Windsor City Hall, Ontario, 2 km across the river from Detroit's GeoNames point, the nearest
    rows = [("0.jpg", 39.9999, 116.2755), ("1.jpg", 42.3163, -83.0372)]
    for name, _, _ in rows:
        img.resize((200 + len(name), 150)).save(images / name)
    meta = tmp_path / "im2gps_small.csv"
    with open(meta, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["IMG_ID", "LAT", "LON"])
        w.writerows([*rows, ("missing.jpg", 1.0, 1.0)])
    out = tmp_path / "out"
    args = [
        "eval",
        "--dataset",
        str(meta),
        "--images",
        str(images),
        "--bundle",
        str(demo_bundle),
        "--out",
        str(out),
        "--ablate",
        "cluemap,refinement",
        "--max-cue-tokens",
        "16",
        "--max-answer-tokens",
        "16",
        "--no-verify",
        "--device",
        "cpu",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == EXIT_SOME_FAILED, res.output  # missing.jpg failed
    assert res.stderr.count("meaningless") == 1
    assert "no validation on record for this bundle" in res.stderr  # the run states the bundle's validation
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["variants"]) == {"full", "wo_cm", "wo_cr"}
    assert report["bundle"]["name"] == "demo" and len(report["bundle"]["digest"]) == 64
    assert report["conventions"]["within"] == "d < t km"
    for v in report["variants"].values():
        assert v["metrics"]["n"] == 3 and v["failed"] == ["missing.jpg"]
    per = list(csv.DictReader((out / "per-image-full.csv").open()))
    ok = [r for r in per if r["status"] == "ok"]
    for r in ok:  # the per-image distance is the great-circle distance of the recorded prediction
        ref = great_circle(
            (float(r["true_lat"]), float(r["true_lon"])), (float(r["pred_lat"]), float(r["pred_lon"])), radius=R
        ).km
        assert float(r["distance_km"]) == pytest.approx(ref, abs=1e-3)
    by_id = {r["img_id"]: r for r in per}
    assert (by_id["1.jpg"]["country_true"], by_id["1.jpg"]["border_true"]) == ("US", "CA")
    assert (by_id["0.jpg"]["country_true"], by_id["0.jpg"]["border_true"]) == ("CN", "CN")
    for r in ok:
        assert r["border_pred"] == (countries().code_at(float(r["pred_lat"]), float(r["pred_lon"])) or "")
    full = report["variants"]["full"]["metrics"]
    hits = sum(1 for r in ok if r["border_pred"] and r["border_pred"] == r["border_true"])
    assert full["country_accuracy_borders"] == pytest.approx(hits / 3)
    table = (out / "table.md").read_text()
    assert "Street(1km)" in table and "Clue2Geo w/o CM" in table and "Clue2Geo w/o CR" in table
    assert "| Country acc. | Country acc. (borders) |" in table
    # resuming does not redo anything and yields the same metrics
    lines = (out / "predictions-full.jsonl").read_bytes().count(b"\n")
    res2 = CliRunner().invoke(main, args)
    assert res2.exit_code == EXIT_SOME_FAILED and "another" not in res2.stderr
    assert (out / "predictions-full.jsonl").read_bytes().count(b"\n") == lines
    again = json.loads((out / "metrics.json").read_text())
    assert again["variants"] == report["variants"]
    # other options: said in one line, and every image runs again
    res3 = CliRunner().invoke(main, [*args, "--max-answer-tokens", "17"])
    assert res3.exit_code == EXIT_SOME_FAILED
    assert res3.stderr.count("another options") == 3  # one line per variant's journal
    assert (out / "predictions-full.jsonl").read_bytes().count(b"\n") == 2 * lines


def test_eval_never_changes_the_geolocators_options(
    geo, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clue2geo_sdk.evaluation.run import run_eval
    from clue2geo_sdk.geolocator import Geolocator

    def refuse(self: Geolocator, value: object) -> None:
        raise AssertionError("eval must pass options per call, not change the shared geolocator's")

    monkeypatch.setattr(Geolocator, "options", property(lambda self: self.__dict__["options"], refuse), raising=False)
    (tmp_path / "imgs").mkdir()
    Image.open(photo).convert("RGB").resize((160, 120)).save(tmp_path / "imgs" / "0.jpg")
    (tmp_path / "m.csv").write_text("IMG_ID,LAT,LON\n0.jpg,40.0,116.3\n")
    report = run_eval(geo, tmp_path / "m.csv", tmp_path / "imgs", tmp_path / "out", ablate=["cluemap"])
    assert report["variants"]["wo_cm"]["metrics"]["n"] == 1 and report["variants"]["wo_cm"]["failed"] == []
    recs = [json.loads(x) for x in (tmp_path / "out" / "predictions-wo_cm.jsonl").read_text().splitlines()]
    assert recs[0]["options"]["use_cluemap"] is False and recs[0]["options_digest"] != geo.options.digest()
