"""``clue2geo validate``: a bundle's known error rates on an eval set, as ``validation.json``.

The pipeline runs over the set through the evaluation run's machinery (:mod:`clue2geo_sdk.evaluation.run`:
the batch runner, durable and resumable, into ``predictions.jsonl``; the per-image scoring), so an
interrupted validation resumes and gives the same numbers. The report (format
:data:`~clue2geo_sdk.bundle.validation.VALIDATION_FORMAT`, read back by :mod:`clue2geo_sdk.bundle.validation`)
holds accuracy at 1/25/200/750/2500 km and the median / 90th-percentile error with 95 % bootstrap
intervals (:mod:`clue2geo_sdk.evaluation.validation_stats`), the same per continent and country of the
true position (Natural Earth borders) where a group is large enough, the calibration of the confidence
per band with top-k coverage, limitations written from the numbers and the fixed ones, and what
another examiner needs to reproduce it (digests of the set, the bundle, its models and the options;
SDK, engine, device, date).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from .._version import __version__
from ..bundle.validation import VALIDATION_FORMAT
from ..files import atomic_write
from ..geo.countries import Countries
from ..geolocator import Geolocator
from ..runs.records import Record
from .calibration import reliability, winner_not_most_confident
from .evalset import EvalSet
from .metrics import CONVENTIONS, distance_km
from .run import Scored, Truth, predict, score, truth_of, write_per_image
from .validation_stats import DEFAULT_MIN_GROUP, DEFAULT_RESAMPLES, DEFAULT_SEED, group, method, summarize

#: The thresholds the calibration reads, and the top-k answers whose coverage of the truth it counts.
CALIBRATION_KM: tuple[float, ...] = (25.0, 200.0, 750.0)
TOPK: tuple[int, ...] = (1, 3, 5)
AT_SEA = "no country (at sea)"
LEAD_NOTE = (
    "A clue2geo result is an investigative lead, not a conclusion: a ranked list of places to check, with "
    "the alternatives beside the first answer. These rates describe photos like the eval set's, under the "
    "settings recorded here; they do not say that any one result is right."
)
CONFIDENCE_NOTE = (
    "first answer's confidence (softmax of the candidates' GPSCLIP scores, summed over what lies within "
    "25 km of it; see docs/evaluation.md), in equal-width bands; 'within' is d < t km from the first answer; "
    "top-k: any of the first k ranked answers within 25 km of the truth"
)


@attrs.frozen(kw_only=True)
class ValidationSettings:
    """How the numbers are made (bootstrap, group size, bands) and how the pipeline ran (as loaded)."""

    resamples: int = DEFAULT_RESAMPLES
    seed: int = DEFAULT_SEED
    min_group: int = DEFAULT_MIN_GROUP
    bands: int = 5
    engine: str = "batched"
    device: str = "auto"
    in_flight: int | None = None


def run_validation(
    geo: Geolocator,
    evalset: EvalSet,
    out: Path,
    *,
    settings: ValidationSettings = ValidationSettings(),  # noqa: B008 - frozen, shared safely
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the pipeline over ``evalset`` (resumed from ``out/predictions.jsonl``), write
    ``per-image.csv`` and ``validation.json`` in ``out``; returns the report."""
    if not evalset.items:
        raise ValueError(f"{evalset.source}: no photo with a known position to validate on")
    out.mkdir(parents=True, exist_ok=True)
    samples = evalset.samples
    paths = [i.path.absolute() for i in evalset.items]
    truth = truth_of(geo, samples)
    recs = predict(geo, paths, out / "predictions.jsonl", geo.options, on_record, on_notice)
    scored = score(geo, samples, paths, recs, truth, on_notice)
    write_per_image(out / "per-image.csv", scored.rows)
    report = build_report(geo, evalset, scored, truth, settings)
    report["evalset"]["changed_since_read"] = changed = _changed(evalset, paths, recs)
    for rel in changed if on_notice else ():
        on_notice(f"{rel}: its bytes are not those the eval set's digest covers (changed while validating?)")
    atomic_write(out / "validation.json", json.dumps(report, indent=2, allow_nan=False).encode())
    return report


def _changed(evalset: EvalSet, paths: list[Path], recs: Mapping[str, Record]) -> list[str]:
    """The photos whose record was made from other bytes than the eval set's digest covers."""
    out = []
    for item, path in zip(evalset.items, paths, strict=True):
        rec = recs.get(str(path))
        if rec is not None and rec.image_sha256 and rec.image_sha256 != item.sha256:
            out.append(item.rel)
    return out


def _regions(countries: Countries, truth: Truth) -> tuple[list[str], list[str], dict[str, str]]:
    """Each image's true continent and country (by borders), and the countries' names."""
    conts, codes, names = [], [], {AT_SEA: AT_SEA}
    for code in truth.borders:
        if not code:
            conts.append(AT_SEA)
            codes.append(AT_SEA)
            continue
        c = countries.get(code)
        conts.append(c.continent or "unknown")
        codes.append(code)
        names[code] = c.name or code
    return conts, codes, names


def build_report(
    geo: Geolocator, evalset: EvalSet, scored: Scored, truth: Truth, settings: ValidationSettings
) -> dict[str, Any]:
    """The validation report's dict (see the module docstring)."""
    kw = {"resamples": settings.resamples, "seed": settings.seed}
    overall = summarize(scored.dists, **kw)
    conts, codes, names = _regions(geo.countries, truth)
    by_continent = group(conts, scored.dists, by="continent", min_n=settings.min_group, **kw)
    by_country = group(codes, scored.dists, by="country", min_n=settings.min_group, names=names, **kw)
    failed = [{"path": r["img_id"], "error": r["error"]} for r in scored.rows if r["status"] != "ok"]
    report: dict[str, Any] = {
        "format": VALIDATION_FORMAT,
        "note": LEAD_NOTE,
        "evalset": evalset.to_dict(),
        "bundle": _bundle_section(geo),
        "n": overall.n,
        "n_located": overall.n_located,
        "n_failed": len(failed),
        "failed": failed,
        "accuracy": overall.to_dict()["accuracy"],
        "error_km": overall.to_dict()["error_km"],
        "by_continent": by_continent.to_dict(),
        "by_country": by_country.to_dict(),
        "continents_without_images": [c for c in geo.countries.continents if c not in set(conts)],
        "calibration": calibration_section(scored, settings.bands),
        "method": {"intervals": method(settings.resamples, settings.seed), "conventions": CONVENTIONS},
        "reproducibility": _reproducibility(geo, evalset, settings),
    }
    report["limitations"] = limitations(report)
    return report


def _bundle_section(geo: Geolocator) -> dict[str, Any]:
    b = geo.bundle
    return {
        "name": b.name,
        "path": str(b.root),
        "digest": b.digest,
        "models_digest": b.models_digest,
        "demo": b.demo,
        "random_weights": sorted(r for r, c in b.components.items() if c.random_weights),
    }


def _reproducibility(geo: Geolocator, evalset: EvalSet, settings: ValidationSettings) -> dict[str, Any]:
    """What another examiner needs to make the same measurement."""
    photos = geo.gallery.kind == "photos"
    return {
        "evalset_digest": evalset.digest,
        "bundle_digest": geo.bundle.digest,
        "models_digest": geo.bundle.models_digest,
        "sdk_version": __version__,
        "options_digest": geo.options.digest(),
        "options": geo.options.to_dict(),
        "gallery": f"photo gallery {geo.gallery.digest}" if photos else "the bundle's coordinate gallery",
        "engine": settings.engine,
        "device": settings.device,
        "in_flight": settings.in_flight,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "bootstrap": {"resamples": settings.resamples, "seed": settings.seed},
        "min_group": settings.min_group,
        "calibration_bands": settings.bands,
    }


def _covered(truth: tuple[float, float], points: Sequence[tuple[float, float]], k: int, km: float) -> bool:
    return any(distance_km(truth[0], truth[1], lat, lon) < km for lat, lon in points[:k])


def calibration_section(scored: Scored, bands: int) -> dict[str, Any]:
    """Per confidence band: images, mean confidence, how often the first answer was within 25/200/750 km,
    and how often the top-k answers covered the truth (within 25 km); overall top-k coverage over all
    images at each threshold (a failure covers nothing)."""
    located = [r for r in scored.rows if r["status"] == "ok"]
    truths = [(r["true_lat"], r["true_lon"]) for r in located]
    ok_dists = [d for d in scored.dists if d is not None]
    with_conf = [i for i, c in enumerate(scored.confs) if c]
    n = len(scored.rows)
    cal = reliability(
        [scored.confs[i][0] for i in with_conf],
        [ok_dists[i] for i in with_conf],
        n_bins=bands,
        thresholds=CALIBRATION_KM,
        n_excluded=n - len(with_conf),
    )
    band_of = np.minimum((np.array([scored.confs[i][0] for i in with_conf]) * bands).astype(int), bands - 1)
    rows = []
    for b, rb in enumerate(cal.bins):
        members = [i for i, bi in zip(with_conf, band_of, strict=True) if bi == b]
        topk = {
            str(k): (
                float(np.mean([_covered(truths[i], scored.points[i], k, 25.0) for i in members])) if members else None
            )
            for k in TOPK
        }
        rows.append({**rb.to_dict(), "topk_within_25km": topk})
    overall = {
        str(k): {
            f"{t:g}": (
                sum(_covered(tr, p, k, t) for tr, p in zip(truths, scored.points, strict=True)) / n if n else None
            )
            for t in CALIBRATION_KM
        }
        for k in TOPK
    }
    return {
        "confidence": CONFIDENCE_NOTE,
        "n_binned": cal.n,
        "n_without_confidence": cal.n_excluded,
        "bands": rows,
        "ece_at_25km": cal.ece,
        "brier_at_25km": cal.brier,
        "winner_not_most_confident": winner_not_most_confident(scored.confs),
        "topk_coverage": overall,
    }


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def _size_limits(report: dict[str, Any]) -> list[str]:
    """Sample size, the interval's width, failures and photos left out."""
    n, acc = report["n"], report["accuracy"]["25"]
    width = (acc["high"] or 0.0) - (acc["low"] or 0.0)
    out = [
        f"Sample size: n = {n} images; the 95 % interval at 25 km is {_pct(acc['low'])}–{_pct(acc['high'])} "
        f"({100 * width:.0f} percentage points wide)."
        + (" A set this small gives only rough rates." if n < 100 else "")
        + (" A zero-width interval means every image agreed, not that the rate is certain." if not width else "")
    ]
    if report["n_failed"]:
        out.append(f"{report['n_failed']} of {n} images failed in the pipeline; they count as misses (listed).")
    ev = report["evalset"]
    if ev["n_excluded"] or ev["skipped_rows"]:
        out.append(
            f"{ev['n_excluded']} photos (no position in their metadata, or unreadable) and "
            f"{len(ev['skipped_rows'])} CSV rows were left out of the set (listed)."
        )
    return out


def _region_limits(report: dict[str, Any]) -> list[str]:
    """Continents with no or few images, and how few countries are measured."""
    out = []
    if report["continents_without_images"]:
        out.append("No images from: " + ", ".join(report["continents_without_images"]) + ".")
    bc, by = report["by_continent"], report["by_country"]
    few = [f"{g['name']} ({g['n']})" for g in bc["too_few_to_report"]]
    if few:
        out.append(
            f"Continents with fewer than {bc['min_n']} images, not reported on their own: " + ", ".join(few) + "."
        )
    k, m = len(by["groups"]), len(by["too_few_to_report"])
    out.append(
        f"Per-country rates are given for {k} countries with at least {by['min_n']} images; {m} countries have "
        "fewer (listed); every other country has none: no rate can be claimed for it."
    )
    return out


def _kind_limits(report: dict[str, Any]) -> list[str]:
    """What kinds of photo the set holds, as far as can be told from the files."""
    kinds = report["evalset"]["kinds"]
    out = []
    formats = kinds["formats"]
    if len(formats) == 1:
        out.append(
            f"Every photo is {next(iter(formats))}: other formats (PNG, HEIC, TIFF, WebP, ...) are not measured."
        )
    if kinds["n_sized"] and kinds["distinct_sizes"] == 1:
        out.append("Every photo has the same pixel size: other sizes and crops are not measured.")
    elif kinds["max_pixels"] is not None and kinds["max_pixels"] < 1_000_000:
        out.append("Every photo is under one megapixel: full-size camera photos are not measured.")
    out.append(
        "Scene kinds (indoor / outdoor, day / night, landmark / ordinary street, screenshots) are not labelled "
        "in the set, so no rate per kind can be given; an indoor or featureless photo may fare worse."
    )
    return out


def _fixed_limits(report: dict[str, Any]) -> list[str]:
    """What holds whatever the numbers: random weights, the engine and settings, the set's truth."""
    b, rep = report["bundle"], report["reproducibility"]
    out = []
    if b["demo"] or b["random_weights"]:
        roles = ", ".join(b["random_weights"]) or "all"
        out.append(
            f"This bundle carries random-weight models ({roles}; demo={b['demo']}): every rate here is "
            "meaningless and shows the procedure only; nothing about a real bundle's accuracy follows from it."
        )
    out.append(
        f"Measured with the {rep['engine']} VLM engine on device {rep['device']} under options "
        f"{rep['options_digest'][:12]}…, "
        f"with {rep['gallery']}; another engine, device, gallery or option may give other answers."
    )
    out.append(
        "The rates hold for these models only (models_digest "
        f"{b['models_digest'][:12]}…); a bundle with other weights must be validated on its own set."
    )
    if report["evalset"]["kind"] == "folder":
        out.append(
            "The truth is each photo's own metadata position, which can be wrong or edited; "
            "the pipeline never reads it."
        )
    cal = report["calibration"]
    thin = [f"[{x['lo']:.1f}, {x['hi']:.1f})" for x in cal["bands"] if 0 < x["count"] < report["by_country"]["min_n"]]
    if thin:
        out.append("Confidence bands with few images (their rates are rough): " + ", ".join(thin) + ".")
    return out


def limitations(report: dict[str, Any]) -> list[str]:
    """The report's limitations, written from its numbers and from what holds whatever they are."""
    return [*_size_limits(report), *_region_limits(report), *_kind_limits(report), *_fixed_limits(report)]
