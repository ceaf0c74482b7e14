"""The reliability table against hand-computed bins, ECE and Brier; the confidence read from a record
either way (its ``answers`` or its ``candidates``); `clue2geo eval --calibration` end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import EXAMPLE_IMAGES, FAST
from geopy.distance import great_circle
from PIL import Image

from clue2geo_sdk.cli import main
from clue2geo_sdk.evaluation.calibration import (
    answer_confidences,
    fit_logit_scale,
    markdown_table,
    reliability,
    winner_not_most_confident,
)
from clue2geo_sdk.pipeline.answers import GEOCLIP_LOGIT_SCALE
from clue2geo_sdk.results import Candidate

R = 6371.0088

# five images: confidence of the winner, distance to the truth (km)
CONF = [0.05, 0.15, 0.95, 0.95, 0.55]
DIST = [10.0, 30.0, 5.0, 100.0, 20.0]  # within 25 km: 1, 0, 1, 0, 1


def test_bins_ece_brier_by_hand() -> None:
    cal = reliability(CONF, DIST, n_excluded=2)
    assert cal.n == 5 and cal.n_excluded == 2 and len(cal.bins) == 10
    counts = [b.count for b in cal.bins]
    assert counts == [1, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    top = cal.bins[9]
    assert (top.lo, top.hi, top.mean_confidence) == (0.9, 1.0, pytest.approx(0.95))
    assert top.accuracy == {"1": 0.0, "25": 0.5, "200": 1.0, "750": 1.0, "2500": 1.0}
    assert cal.bins[1].accuracy["25"] == 0.0 and cal.bins[1].accuracy["200"] == 1.0
    assert cal.bins[3].mean_confidence is None and cal.bins[3].accuracy["25"] is None
    # |1 - .05|, |0 - .15|, |1 - .55|, 2 x |.5 - .95|  over 5
    assert cal.ece == pytest.approx((0.95 + 0.15 + 0.45 + 2 * 0.45) / 5) == pytest.approx(0.49)
    assert cal.mce == pytest.approx(0.95)
    assert cal.brier == pytest.approx((0.95**2 + 0.15**2 + 0.05**2 + 0.95**2 + 0.45**2) / 5)
    assert cal.brier == pytest.approx(0.4065)
    assert cal.mean_confidence == pytest.approx(0.53) and cal.accuracy["25"] == pytest.approx(0.6)
    d = cal.to_dict()
    assert d["bins"][9]["count"] == 2 and json.loads(json.dumps(d))["ece"] == pytest.approx(0.49)


def test_bin_edges_and_other_thresholds() -> None:
    # lower edges belong to their bin, 1.0 to the last one; 4 bins
    cal = reliability([0.0, 0.25, 0.5, 1.0], [0.5, 0.5, 0.5, 0.5], n_bins=4, ece_threshold_km=1.0)
    assert [b.count for b in cal.bins] == [1, 1, 1, 1]
    assert [b.lo for b in cal.bins] == [0.0, 0.25, 0.5, 0.75]
    assert cal.ece == pytest.approx((1.0 + 0.75 + 0.5 + 0.0) / 4)  # every image within 1 km
    # a threshold outside THRESHOLDS_KM is added to the accuracies
    cal = reliability([0.5], [40.0], ece_threshold_km=50.0)
    assert cal.bins[5].accuracy["50"] == 1.0 and cal.ece == pytest.approx(0.5)
    empty = reliability([], [])
    assert empty.n == 0 and empty.ece is None and empty.brier is None and sum(b.count for b in empty.bins) == 0


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"confidences at \[1\]"):
        reliability([0.5, 1.5], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"distances at \[0\]"):
        reliability([0.5], [float("nan")])
    with pytest.raises(ValueError, match="2 confidences but 1 distances"):
        reliability([0.5, 0.5], [1.0])
    with pytest.raises(ValueError, match="n_bins"):
        reliability([0.5], [1.0], n_bins=0)


def test_confidence_from_a_record_either_way() -> None:
    cands = [
        {"source": "direct", "lat": 48.8566, "lon": 2.3522, "score": 0.30, "sample": 0},
        {"source": "rag5", "lat": 48.8049, "lon": 2.1204, "score": 0.25, "sample": 0},  # 17.9 km away
        {"source": "rag10", "lat": 51.5074, "lon": -0.1278, "score": 0.28, "sample": 0, "future_field": 1},
    ]
    w = [math.exp(GEOCLIP_LOGIT_SCALE * c["score"]) for c in cands]
    got = answer_confidences({"candidates": cands})
    assert got == pytest.approx(((w[0] + w[1]) / sum(w), w[2] / sum(w)))
    assert answer_confidences({"candidates": cands}, logit_scale=10.0)[0] == pytest.approx(0.6624155, abs=1e-7)
    # a record that carries its answers is read as it is
    assert answer_confidences({"candidates": cands, "answers": [{"confidence": 0.7}, {"confidence": 0.3}]}) == (
        0.7,
        0.3,
    )
    assert answer_confidences({"status": "error"}) == ()
    assert winner_not_most_confident([(0.7, 0.3), (0.4, 0.6), (1.0,), ()]) == 1


def two(top: float, other: float) -> list[Candidate]:
    """The winner in Paris, a weaker candidate in London (two answers)."""
    return [
        Candidate(source="direct", lat=48.8566, lon=2.3522, score=top),
        Candidate(source="rag5", lat=51.5074, lon=-0.1278, score=other),
    ]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_fit_logit_scale_by_hand() -> None:
    # first answer's confidence is sigmoid(s * gap): image 1 (gap .1) is right, image 2 (gap .2) wrong.
    # Brier(s) = ((1 - σ(.1 s))² + σ(.2 s)²) / 2 rises from s = 0 (its slope there is (-.025 + .05)/2 > 0)
    sets, dist = [two(0.3, 0.2), two(0.3, 0.1)], [3.0, 900.0]
    fit = fit_logit_scale(sets, dist)
    assert fit is not None and fit.n == 2 and fit.logit_scale == 0.0 and fit.brier == pytest.approx(0.25)
    s = GEOCLIP_LOGIT_SCALE
    assert fit.default_brier == pytest.approx(((1 - sigmoid(0.1 * s)) ** 2 + sigmoid(0.2 * s) ** 2) / 2)
    # both right: the sharpest scale on the grid wins
    fit = fit_logit_scale(sets, [3.0, 3.0], grid=(1.0, 10.0, 100.0))
    assert fit is not None and fit.logit_scale == 100.0
    assert fit.brier == pytest.approx(((1 - sigmoid(10.0)) ** 2 + (1 - sigmoid(20.0)) ** 2) / 2)
    # ECE at the fitted scale: 10 bins, both in the top bin with accuracy 1
    assert fit.ece == pytest.approx(1 - (sigmoid(10.0) + sigmoid(20.0)) / 2)
    assert fit_logit_scale([[]], [1.0]) is None
    with pytest.raises(ValueError, match="1 candidate sets but 2 distances"):
        fit_logit_scale(sets[:1], dist)


def test_markdown_table() -> None:
    md = markdown_table(reliability(CONF, DIST), "set: Clue2Geo")
    lines = md.splitlines()
    assert lines[0] == "### set: Clue2Geo"
    assert "| [0.90, 1.00] | 2 | 0.950 | 0.0 | 50.0 | 100.0 | 100.0 | 100.0 | -0.450 |" in lines
    assert "| [0.30, 0.40) | 0 | — | — | — | — | — | — | — |" in lines
    assert "ECE 0.490" in md and "Brier 0.407" in md
    fit = fit_logit_scale([two(0.3, 0.2), two(0.3, 0.1)], [3.0, 900.0])
    assert "logit scale 0 gives Brier 0.250" in markdown_table(reliability(CONF, DIST), "x", fit)


def test_eval_calibration_end_to_end(demo_bundle: Path, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    # the demo's random VLM gives four valid candidates for the first photo and none for the second
    # (then the nearest gallery point answers alone), at these token budgets
    rows = [("summer_palace_beijing.jpg", 39.9999, 116.2755), ("flower.jpg", 48.85, 2.35)]
    for name, _, _ in rows:
        Image.open(EXAMPLE_IMAGES / name).convert("RGB").save(images / name)
    meta = tmp_path / "small.csv"
    with open(meta, "w", newline="") as fh:
        csv.writer(fh).writerows([("IMG_ID", "LAT", "LON"), *rows])
    out = tmp_path / "out"
    args = ["eval", "--dataset", str(meta), "--images", str(images), "--bundle", str(demo_bundle)]
    args += ["--out", str(out), "--max-cue-tokens", str(FAST["max_cue_tokens"])]
    args += ["--max-answer-tokens", str(FAST["max_answer_tokens"]), "--no-verify"]
    args += ["--device", "cpu", "--calibration", "--calibration-bins", "5"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "Gap @25km" in res.output and "calibration.json" in res.output
    cal = json.loads((out / "calibration.json").read_text())["variants"]["full"]["calibration"]
    assert cal["n"] == 2 and cal["n_excluded"] == 0 and len(cal["bins"]) == 5
    fit = json.loads((out / "calibration.json").read_text())["variants"]["full"]["logit_scale_fit"]
    assert fit["n"] == 2 and fit["default_logit_scale"] == GEOCLIP_LOGIT_SCALE and 0 <= fit["brier"] <= 1
    per = list(csv.DictReader((out / "per-image-full.csv").open()))
    recs = {Path(r["path"]).name: r for r in map(json.loads, (out / "predictions-full.jsonl").read_text().splitlines())}
    hits, n_cands = [], []
    for row in per:
        rec = recs[row["img_id"]]
        # independently: the winner's answer holds every candidate within 25 km of it (geopy), softmax-weighted
        # and every retrieved reference within 25 km of it; the other references' weight is mass elsewhere
        taken = {(c["lat"], c["lon"]) for c in rec["candidates"]}
        refs = [h for h in rec["references"]["similar"] if (h["lat"], h["lon"]) not in taken]
        points = rec["candidates"] + refs
        w = [math.exp(GEOCLIP_LOGIT_SCALE * p.get("score", p.get("cosine"))) for p in points]
        near = [great_circle((rec["lat"], rec["lon"]), (p["lat"], p["lon"]), radius=R).km < 25 for p in points]
        expect = sum(x for x, n in zip(w, near, strict=True) if n) / sum(w)
        assert float(row["confidence"]) == pytest.approx(expect, abs=1e-6)
        assert 1 <= int(row["answers"]) <= len(rec["candidates"])
        n_cands.append(len(rec["candidates"]))
        hits.append((float(row["confidence"]), float(row["distance_km"]) < 25))
    assert max(n_cands) > 1  # at least one image had several candidates to weigh
    bins: dict[int, list[tuple[float, bool]]] = {}
    for c, h in hits:
        bins.setdefault(min(int(c * 5), 4), []).append((c, h))
    for b, members in bins.items():
        assert cal["bins"][b]["count"] == len(members)
        assert cal["bins"][b]["accuracy"]["25"] == pytest.approx(sum(h for _, h in members) / len(members))
    ece = sum(len(m) * abs(sum(h for _, h in m) / len(m) - sum(c for c, _ in m) / len(m)) for m in bins.values()) / 2
    assert cal["ece"] == pytest.approx(ece, abs=1e-6)  # the CSV rounds confidences to 6 places
    assert (out / "calibration.md").read_text().startswith("### small: Clue2Geo")
