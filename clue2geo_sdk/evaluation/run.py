"""``clue2geo eval``: the pipeline over a dataset, per variant (full and ablations), then the paper's table.

Predictions go through the batch runner (durable, resumable) into ``predictions-<variant>.jsonl``;
metrics are computed from those records, so a resumed run gives the same numbers as an unbroken one.
With ``calibration=True`` the winner's confidence is also checked against the truth per confidence
bin (:mod:`clue2geo_sdk.evaluation.calibration`): ``calibration.json`` and ``calibration.md``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from .._version import __version__
from ..geolocator import Geolocator
from ..options import Options
from ..pipeline.answers import rank_answers
from ..results import Candidate
from ..runs.batch import run_batch
from ..runs.journal import journal_path, read_journal
from ..runs.records import Record
from ..runs.resume import latest_records
from ..sanitize import csv_cell
from .calibration import (
    Calibration,
    ScaleFit,
    answer_confidences,
    fit_logit_scale,
    reliability,
    winner_not_most_confident,
)
from .calibration import markdown_table as calibration_table
from .metrics import (
    CONVENTIONS,
    THRESHOLD_NAMES,
    THRESHOLDS_KM,
    Metrics,
    Sample,
    compute_metrics,
    distance_km,
    geoscore,
    read_dataset,
)

#: What an image of the dataset with no record counts as: failed, "NotRun".
NOT_RUN = Record(status="error", error="NotRun")

ABLATIONS = {
    "cluemap": ("wo_cm", "Clue2Geo w/o CM", {"use_cluemap": False}),
    "refinement": ("wo_cr", "Clue2Geo w/o CR", {"use_refinement": False}),
}
PER_IMAGE_FIELDS = (
    "img_id",
    "true_lat",
    "true_lon",
    "status",
    "pred_lat",
    "pred_lon",
    "distance_km",
    "geoscore",
    "country_true",
    "country_pred",
    "border_true",
    "border_pred",
    "source",
    "confidence",
    "answers",
    "error",
)


def variants(ablate: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    unknown = [a for a in ablate if a not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {', '.join(unknown)}; choose from {', '.join(ABLATIONS)}")
    return [("full", "Clue2Geo", {}), *(ABLATIONS[a] for a in ablate)]


def markdown_table(rows: Sequence[tuple[str, Metrics]], dataset: str) -> str:
    head = [
        "Dataset",
        "Method",
        *(f"{THRESHOLD_NAMES[t]}({t:g}km)" for t in THRESHOLDS_KM),
        "Median km",
        "GeoScore",
        "Country acc.",
        "Country acc. (borders)",
        "Failed",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m in rows:
        acc = [f"{100 * m.accuracy[f'{t:g}']:.2f}" for t in THRESHOLDS_KM]
        med = f"{m.median_km:.1f}" if m.median_km is not None else "—"
        country = [f"{100 * c:.2f}" if c is not None else "—" for c in (m.country_accuracy, m.country_accuracy_borders)]
        lines.append(
            "| " + " | ".join([dataset, label, *acc, med, f"{m.geoscore:.0f}", *country, f"{m.n_failed}/{m.n}"]) + " |"
        )
    return "\n".join(lines) + "\n\nAccuracy in % within each distance (d < t); see metrics.json for the conventions.\n"


def run_eval(
    geo: Geolocator,
    dataset: Path,
    images: Path,
    out: Path,
    *,
    ablate: Sequence[str] = (),
    limit: int | None = None,
    seed: int = 0,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
    calibration: bool = False,
    calibration_bins: int = 10,
) -> dict[str, Any]:
    """Each variant runs under its own Options passed per call: ``geo.options`` is never changed, so
    a geolocator shared with other threads keeps its settings. ``calibration`` adds the reliability
    table of the winner's confidence (``calibration_bins`` equal-width bins) per variant."""
    samples, problems = read_dataset(dataset, limit=limit, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    base = geo.options
    report = _report_header(geo, dataset, images, samples, problems, limit=limit, seed=seed)
    paths = [images / s.img_id for s in samples]
    truth = truth_of(geo, samples)  # the same for every variant
    table_rows: list[tuple[str, Metrics]] = []
    calibrations: list[tuple[str, str, Calibration, ScaleFit | None]] = []
    for slug, label, overrides in variants(ablate):
        opts = attrs.evolve(base, **overrides)
        recs = predict(geo, paths, out / f"predictions-{slug}.jsonl", opts, on_record, on_notice)
        scored = score(geo, samples, paths, recs, truth, on_notice)
        write_per_image(out / f"per-image-{slug}.csv", scored.rows)
        m = compute_metrics(
            scored.dists,
            country_true=truth.countries,
            country_pred=scored.c_pred,
            border_true=truth.borders,
            border_pred=scored.b_pred,
        )
        table_rows.append((label, m))
        report["variants"][slug] = {
            "label": label,
            "options": overrides,
            "options_digest": opts.digest(),
            "metrics": m.to_dict(),
            "failed": [r["img_id"] for r in scored.rows if r["status"] != "ok"],
        }
        if calibration:
            calibrations.append((slug, label, *_calibrate(scored, len(samples), calibration_bins)))
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(markdown_table(table_rows, dataset.stem))
    if calibration:
        _write_calibration(out, report, calibrations, dataset.stem)
    return report


def _report_header(
    geo: Geolocator,
    dataset: Path,
    images: Path,
    samples: Sequence[Sample],
    problems: list[str],
    *,
    limit: int | None,
    seed: int,
) -> dict[str, Any]:
    """metrics.json before its variants: what was run (SDK, bundle), on what (dataset), by which rules."""
    return {
        "sdk_version": __version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "bundle": {
            "name": geo.bundle.name,
            "digest": geo.bundle.digest,
            "path": str(geo.bundle.root),
            "demo": geo.bundle.demo,
        },
        "dataset": {
            "metadata": str(dataset),
            "images": str(images),
            "n": len(samples),
            "limit": limit,
            "seed": seed,
            "skipped_rows": problems,
        },
        "conventions": CONVENTIONS,
        "variants": {},
    }


@attrs.frozen
class Truth:
    """Each sample's true country: the nearest GeoNames place's code, and the border polygon's (None: none)."""

    countries: list[str | None]
    borders: list[str | None]


def truth_of(geo: Geolocator, samples: Sequence[Sample]) -> Truth:
    countries = [geo.geocoder.lookup(s.lat, s.lon).country_code for s in samples]
    lat, lon = np.array([s.lat for s in samples]), np.array([s.lon for s in samples])
    borders = [c or None for c in geo.countries.codes_at(lat, lon)] if samples else []
    return Truth(countries=countries, borders=borders)


def predict(
    geo: Geolocator,
    paths: list[Path],
    pred_path: Path,
    opts: Options,
    on_record: Callable[[dict[str, Any]], None] | None,
    on_notice: Callable[[str], None] | None,
) -> dict[str, Record]:
    """One variant's predictions through the batch runner (resumed), read back as the latest record
    per image, so a resumed run gives the same numbers as an unbroken one."""
    run_batch(geo, paths, pred_path, fmt="jsonl", resume=True, options=opts, on_record=on_record, on_notice=on_notice)
    return latest_records(read_journal(journal_path(pred_path, "jsonl")).records)


@attrs.define
class Scored:
    """One variant's per-image rows, and per image located (in order) what the metrics and the
    calibration read: distance, predicted countries, answer confidences, candidates, answer positions."""

    rows: list[dict[str, Any]] = attrs.Factory(list)
    dists: list[float | None] = attrs.Factory(list)
    c_pred: list[str | None] = attrs.Factory(list)
    b_pred: list[str | None] = attrs.Factory(list)
    confs: list[tuple[float, ...]] = attrs.Factory(list)
    cand_sets: list[list[Candidate]] = attrs.Factory(list)
    points: list[list[tuple[float, float]]] = attrs.Factory(list)  # the answers' positions, first answer first


def score(
    geo: Geolocator,
    samples: Sequence[Sample],
    paths: list[Path],
    recs: Mapping[str, Record],
    truth: Truth,
    on_notice: Callable[[str], None] | None,
) -> Scored:
    """Each sample's record against its truth (an image with no record counts as failed: NotRun)."""
    scored = Scored()
    for s, p, ct, bt in zip(samples, paths, truth.countries, truth.borders, strict=True):
        rec = recs.get(str(p), NOT_RUN)
        row: dict[str, Any] = {
            "img_id": s.img_id,
            "true_lat": s.lat,
            "true_lon": s.lon,
            "status": rec.status,
            "country_true": ct,
            "border_true": bt,
            "error": rec.error or "",
        }
        if rec.ok:
            _score_located(geo, s, rec, row, scored, on_notice)
        else:
            scored.dists.append(None)
            scored.c_pred.append(None)
            scored.b_pred.append(None)
        scored.rows.append(row)
    return scored


def _score_located(
    geo: Geolocator,
    s: Sample,
    rec: Record,
    row: dict[str, Any],
    scored: Scored,
    on_notice: Callable[[str], None] | None,
) -> None:
    """A located image: its distance, GeoScore, predicted countries and answer confidences."""
    d = distance_km(s.lat, s.lon, rec.lat, rec.lon)
    cp = geo.geocoder.lookup(rec.lat, rec.lon).country_code
    bp = geo.countries.code_at(rec.lat, rec.lon)
    row.update(
        pred_lat=rec.lat,
        pred_lon=rec.lon,
        distance_km=round(d, 4),
        geoscore=round(float(geoscore(d)), 2),
        country_pred=cp,
        border_pred=bp,
        source=rec.source,
    )
    scored.dists.append(d)
    scored.c_pred.append(cp)
    scored.b_pred.append(bp)
    try:
        conf = answer_confidences(rec)
        cands = rec.candidate_objects()
        rank_answers(cands)  # the scale fit below needs valid candidates
        points = answer_points(rec, cands)
    except (ValueError, TypeError, KeyError) as exc:  # a damaged record: no confidence, said once
        conf, cands, points = (), [], [(rec.lat, rec.lon)]
        if on_notice:
            on_notice(f"{s.img_id}: no confidence from its record ({exc})")
    scored.confs.append(conf)
    scored.cand_sets.append(cands)
    scored.points.append(points)
    if conf:
        row.update(confidence=round(conf[0], 6), answers=len(conf))


def answer_points(rec: Record, cands: Sequence[Candidate]) -> list[tuple[float, float]]:
    """A located record's ranked answers as (lat, lon), first answer first: its ``answers`` when it has
    them, else ranked from its candidates, else its prediction alone (what top-k coverage reads)."""
    if rec.answers:
        return [(float(a["lat"]), float(a["lon"])) for a in rec.answers]
    ranked = [(a.lat, a.lon) for a in rank_answers(cands)]
    return ranked or [(float(rec.lat), float(rec.lon))]  # type: ignore[arg-type]


def write_per_image(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=PER_IMAGE_FIELDS)
        w.writeheader()
        w.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)


def _calibrate(scored: Scored, n_samples: int, n_bins: int) -> tuple[Calibration, ScaleFit | None]:
    """The reliability table of the winners' confidences (images without one are counted, not binned)
    and the logit-scale fit over the candidates."""
    ok_dists = [x for x in scored.dists if x is not None]
    pairs = [(c[0], d) for c, d in zip(scored.confs, ok_dists, strict=True) if c]
    cal = reliability(
        [c for c, _ in pairs],
        [d for _, d in pairs],
        n_bins=n_bins,
        n_excluded=n_samples - len(pairs),
    )
    cal = attrs.evolve(cal, winner_not_most_confident=winner_not_most_confident(scored.confs))
    return cal, fit_logit_scale(scored.cand_sets, ok_dists, n_bins=n_bins)


def _write_calibration(
    out: Path,
    report: Mapping[str, Any],
    calibrations: list[tuple[str, str, Calibration, ScaleFit | None]],
    stem: str,
) -> None:
    """calibration.json (per variant: the table and the scale fit) and calibration.md."""
    cal_report = {
        "bundle": report["bundle"],
        "dataset": report["dataset"],
        "confidence": "first answer's confidence: softmax of the candidates' (and, where the records' answers "
        "used them, the retrieved gallery points') GPSCLIP cosines times GeoCLIP's logit scale, summed over "
        "what lies within 25 km of it; checked against truth within 25 km. See docs/evaluation.md",
        "variants": {
            s: {"label": lb, "calibration": c.to_dict(), "logit_scale_fit": f.to_dict() if f else None}
            for s, lb, c, f in calibrations
        },
    }
    (out / "calibration.json").write_text(json.dumps(cal_report, indent=2))
    md = "".join(calibration_table(c, f"{stem}: {lb}", f) + "\n" for _, lb, c, f in calibrations)
    (out / "calibration.md").write_text(md)
