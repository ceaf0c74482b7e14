"""Evaluation metrics with our pinned conventions (DESIGN §6), and the dataset reader.

- distance: great-circle (haversine) on a sphere of radius 6371.0088 km, (lat, lon) order;
- "within t km" is ``d < t`` for t in 1, 25, 200, 750, 2500;
- GeoScore = 5000 * exp(-d / 1492.7);
- country accuracy: the offline reverse geocoder's country code of truth vs prediction (the published
  convention: the nearest GeoNames place's country), and beside it by real borders (Natural Earth);
- an image that fails counts as a miss at every threshold, scores GeoScore 0, and is listed;
  median / mean km are over the images that produced a prediction.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..geo.countries import BORDER_TOLERANCE_DEG
from ..geo.distance import EARTH_RADIUS_KM, haversine_km

THRESHOLDS_KM: tuple[float, ...] = (1.0, 25.0, 200.0, 750.0, 2500.0)
THRESHOLD_NAMES = {1.0: "Street", 25.0: "City", 200.0: "Region", 750.0: "Country", 2500.0: "Continent"}
GEOSCORE_SCALE_KM = 1492.7

CONVENTIONS = {
    "distance": f"haversine, sphere radius {EARTH_RADIUS_KM} km, (lat, lon) degrees",
    "within": "d < t km",
    "thresholds_km": list(THRESHOLDS_KM),
    "geoscore": f"5000 * exp(-d / {GEOSCORE_SCALE_KM})",
    "country": "country code of the nearest GeoNames place (offline) for truth and prediction",
    "country_borders": "ISO code of the Natural Earth 1:10m admin-0 polygon containing the point (or within "
    f"{BORDER_TOLERANCE_DEG} deg of it) for truth and prediction; a point with none (at sea) is a miss",
    "failures": "count as misses at every threshold and GeoScore 0; median/mean km over predictions only",
}


def geoscore(d_km: np.ndarray | float) -> np.ndarray:
    return 5000.0 * np.exp(-np.asarray(d_km, dtype=np.float64) / GEOSCORE_SCALE_KM)


@attrs.frozen(kw_only=True)
class Metrics:
    n: int
    n_failed: int
    accuracy: dict[str, float]  # threshold km (as str) -> fraction of all n
    median_km: float | None
    mean_km: float | None
    geoscore: float
    country_accuracy: float | None
    country_accuracy_borders: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def compute_metrics(
    distances_km: Sequence[float | None],
    *,
    country_true: Sequence[str | None] | None = None,
    country_pred: Sequence[str | None] | None = None,
    border_true: Sequence[str | None] | None = None,
    border_pred: Sequence[str | None] | None = None,
    thresholds: Sequence[float] = THRESHOLDS_KM,
) -> Metrics:
    """Metrics over n images; ``None`` distances are failures (misses). ``country_*`` are the
    nearest GeoNames place's codes, ``border_*`` the Natural Earth polygon's (None: none)."""
    n = len(distances_km)
    ok = np.array([d for d in distances_km if d is not None and math.isfinite(d)], dtype=np.float64)
    failed = n - len(ok)
    acc = {f"{t:g}": (float(np.sum(ok < t)) / n if n else 0.0) for t in thresholds}
    return Metrics(
        n=n,
        n_failed=failed,
        accuracy=acc,
        median_km=float(np.median(ok)) if len(ok) else None,
        mean_km=float(np.mean(ok)) if len(ok) else None,
        geoscore=float(np.sum(geoscore(ok)) / n) if n else 0.0,
        country_accuracy=_agreement(country_true, country_pred, n),
        country_accuracy_borders=_agreement(border_true, border_pred, n),
    )


def _agreement(true: Sequence[str | None] | None, pred: Sequence[str | None] | None, n: int) -> float | None:
    """The fraction of all n images whose predicted code is their true one (no code is a miss)."""
    if true is None or pred is None or not n:
        return None
    return sum(1 for t, p in zip(true, pred, strict=True) if t and p and t == p) / n


@attrs.frozen(kw_only=True)
class Sample:
    img_id: str
    lat: float
    lon: float


def read_dataset(meta_csv: str | Path, *, limit: int | None = None, seed: int = 0) -> tuple[list[Sample], list[str]]:
    """Im2GPS3k / YFCC4k metadata (IMG_ID, LAT, LON; other columns ignored). Returns samples and
    the problems of rows that were skipped. ``limit`` takes a deterministic random sample."""
    path = Path(meta_csv)
    samples, problems = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = {c.strip().upper(): c for c in reader.fieldnames or []}
        missing = [c for c in ("IMG_ID", "LAT", "LON") if c not in cols]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; found {reader.fieldnames}")
        for i, row in enumerate(reader, start=2):
            img = (row[cols["IMG_ID"]] or "").strip()
            try:
                lat, lon = float(row[cols["LAT"]]), float(row[cols["LON"]])
            except (TypeError, ValueError):
                problems.append(f"line {i}: LAT/LON not numbers")
                continue
            if not img or not (-90 <= lat <= 90 and -180 <= lon <= 180):
                problems.append(f"line {i}: empty IMG_ID or coordinate out of range")
                continue
            samples.append(Sample(img_id=img, lat=lat, lon=lon))
    if limit is not None and limit < len(samples):
        samples = sorted(random.Random(seed).sample(samples, limit), key=lambda s: s.img_id)
    return samples, problems


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    return float(haversine_km(lat1, lon1, lat2, lon2))
