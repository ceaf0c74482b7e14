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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from .._version import __version__
from ..geolocator import Geolocator
from ..pipeline.answers import rank_answers
from ..results import Candidate
from ..runs.batch import journal_path, latest, read_journal, run_batch
from ..sanitize import csv_cell
from .calibration import (
    Calibration,
    ScaleFit,
    answer_confidences,
    fit_logit_scale,
    record_candidates,
    reliability,
    winner_not_most_confident,
)
from .calibration import markdown_table as calibration_table
from .metrics import (
    CONVENTIONS,
    THRESHOLD_NAMES,
    THRESHOLDS_KM,
    Metrics,
    compute_metrics,
    distance_km,
    geoscore,
    read_dataset,
)

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
    table_rows: list[tuple[str, Metrics]] = []
    calibrations: list[tuple[str, str, Calibration, ScaleFit | None]] = []
    report: dict[str, Any] = {
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
    paths = [images / s.img_id for s in samples]
    c_true = [geo.geocoder.lookup(s.lat, s.lon).country_code for s in samples]  # same for every variant
    lat, lon = np.array([s.lat for s in samples]), np.array([s.lon for s in samples])
    b_true = [c or None for c in geo.countries.codes_at(lat, lon)] if samples else []
    for slug, label, overrides in variants(ablate):
        opts = attrs.evolve(base, **overrides)
        pred_path = out / f"predictions-{slug}.jsonl"
        run_batch(
            geo, paths, pred_path, fmt="jsonl", resume=True, options=opts, on_record=on_record, on_notice=on_notice
        )
        # records are read back (latest per image) so a resumed run gives the same numbers
        recs = latest(read_journal(journal_path(pred_path, "jsonl")).records)
        rows, dists, c_pred, b_pred = [], [], [], []
        confs: list[tuple[float, ...]] = []
        cand_sets: list[list[Candidate]] = []
        for s, p, ct, bt in zip(samples, paths, c_true, b_true, strict=True):
            rec = recs.get(str(p), {"status": "error", "error": "NotRun"})
            row: dict[str, Any] = {
                "img_id": s.img_id,
                "true_lat": s.lat,
                "true_lon": s.lon,
                "status": rec["status"],
                "country_true": ct,
                "border_true": bt,
                "error": rec.get("error") or "",
            }
            if rec["status"] == "ok":
                d = distance_km(s.lat, s.lon, rec["lat"], rec["lon"])
                cp = geo.geocoder.lookup(rec["lat"], rec["lon"]).country_code
                bp = geo.countries.code_at(rec["lat"], rec["lon"])
                row.update(
                    pred_lat=rec["lat"],
                    pred_lon=rec["lon"],
                    distance_km=round(d, 4),
                    geoscore=round(float(geoscore(d)), 2),
                    country_pred=cp,
                    border_pred=bp,
                    source=rec.get("source"),
                )
                dists.append(d)
                c_pred.append(cp)
                b_pred.append(bp)
                try:
                    conf = answer_confidences(rec)
                    cands = record_candidates(rec)
                    rank_answers(cands)  # the scale fit below needs valid candidates
                except (ValueError, TypeError, KeyError) as exc:  # a damaged record: no confidence, said once
                    conf, cands = (), []
                    if on_notice:
                        on_notice(f"{s.img_id}: no confidence from its record ({exc})")
                confs.append(conf)
                cand_sets.append(cands)
                if conf:
                    row.update(confidence=round(conf[0], 6), answers=len(conf))
            else:
                dists.append(None)
                c_pred.append(None)
                b_pred.append(None)
            rows.append(row)
        with open(out / f"per-image-{slug}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=PER_IMAGE_FIELDS)
            w.writeheader()
            w.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)
        m = compute_metrics(dists, country_true=c_true, country_pred=c_pred, border_true=b_true, border_pred=b_pred)
        table_rows.append((label, m))
        report["variants"][slug] = {
            "label": label,
            "options": overrides,
            "options_digest": opts.digest(),
            "metrics": m.to_dict(),
            "failed": [r["img_id"] for r in rows if r["status"] != "ok"],
        }
        if calibration:
            ok_dists = [x for x in dists if x is not None]
            scored = [(c[0], d) for c, d in zip(confs, ok_dists, strict=True) if c]
            cal = reliability(
                [c for c, _ in scored],
                [d for _, d in scored],
                n_bins=calibration_bins,
                n_excluded=len(samples) - len(scored),
            )
            cal = attrs.evolve(cal, winner_not_most_confident=winner_not_most_confident(confs))
            fit = fit_logit_scale(cand_sets, ok_dists, n_bins=calibration_bins)
            calibrations.append((slug, label, cal, fit))
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "table.md").write_text(markdown_table(table_rows, dataset.stem))
    if calibration:
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
        md = "".join(calibration_table(c, f"{dataset.stem}: {lb}", f) + "\n" for _, lb, c, f in calibrations)
        (out / "calibration.md").write_text(md)
    return report
