"""Reliability of the winner's confidence on an eval set (``clue2geo eval --calibration``).

The winner's confidence (the first answer's, :mod:`clue2geo_sdk.pipeline.answers`) is binned into
``n_bins`` equal-width bins over [0, 1] (bin i is ``[i/n, (i+1)/n)``, the last one also holds 1.0);
per bin: how many images, their mean confidence, and the fraction whose truth lies within each
threshold of the prediction (``d < t`` as in :mod:`clue2geo_sdk.evaluation.metrics`). A calibrated confidence
has accuracy ≈ mean confidence in every bin at the threshold it claims: we compare at 25 km, the
radius answers are merged within, so an answer's confidence is read as "the truth is in this
city-sized cluster". ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b| at that threshold;
Brier = mean (confidence − hit)². Failed images have no confidence: they are counted, not binned.

:func:`fit_logit_scale` is temperature scaling (Guo et al. 2017) for this confidence: the logit
scale on a grid that minimises the Brier score on an eval set, reported beside GeoCLIP's — a
suggestion to check on another set, never applied by itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import numpy as np

from ..pipeline.answers import GEOCLIP_LOGIT_SCALE, MERGE_KM, rank_answers
from ..results import Candidate
from ..runs.records import Record
from .metrics import THRESHOLD_NAMES, THRESHOLDS_KM

ECE_THRESHOLD_KM = 25.0
#: Scales tried by :func:`fit_logit_scale`: 0 (a vote count) and 1 … 400 geometrically.
SCALE_GRID: tuple[float, ...] = (0.0, *np.geomspace(1.0, 400.0, 61).tolist())


@attrs.frozen(kw_only=True)
class ReliabilityBin:
    """One confidence bin ``[lo, hi)``; ``None`` where the bin is empty."""

    lo: float
    hi: float
    count: int
    mean_confidence: float | None
    accuracy: dict[str, float | None]  # threshold km (as str) -> fraction of the bin within it

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class Calibration:
    """The reliability table and its summary at ``ece_threshold_km`` (``None`` when nothing was binned).

    ``winner_not_most_confident`` counts images whose first answer (the pipeline's winner, best
    GPSCLIP score) holds less confidence than another answer (None when not computed)."""

    n: int
    n_excluded: int
    binning: str
    bins: tuple[ReliabilityBin, ...]
    ece_threshold_km: float
    ece: float | None
    mce: float | None
    brier: float | None
    mean_confidence: float | None
    accuracy: dict[str, float | None]
    winner_not_most_confident: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=False)
        d["bins"] = [b.to_dict() for b in self.bins]
        d["accuracy"] = dict(self.accuracy)
        return d


def _key(t: float) -> str:
    return f"{t:g}"


def reliability(
    confidences: Sequence[float],
    distances_km: Sequence[float],
    *,
    n_bins: int = 10,
    thresholds: Sequence[float] = THRESHOLDS_KM,
    ece_threshold_km: float = ECE_THRESHOLD_KM,
    n_excluded: int = 0,
) -> Calibration:
    """The reliability table of ``confidences`` (one per image, in [0, 1]) against the distances
    from each prediction to its truth (km)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if len(confidences) != len(distances_km):
        raise ValueError(f"{len(confidences)} confidences but {len(distances_km)} distances")
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    dist = np.asarray(distances_km, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(conf) | (conf < 0) | (conf > 1))
    if bad.size:
        raise ValueError(f"confidences at {bad.tolist()} are not numbers in [0, 1]")
    bad = np.flatnonzero(~np.isfinite(dist) | (dist < 0))
    if bad.size:
        raise ValueError(f"distances at {bad.tolist()} are not finite numbers >= 0")
    ts = [*thresholds, *([ece_threshold_km] if ece_threshold_km not in thresholds else [])]
    idx = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    bins, gaps = [], []
    hit_ece = dist < ece_threshold_km
    for b in range(n_bins):
        sel = idx == b
        k = int(sel.sum())
        mean = float(conf[sel].mean()) if k else None
        acc = {_key(t): (float(np.mean(dist[sel] < t)) if k else None) for t in ts}
        bins.append(ReliabilityBin(lo=b / n_bins, hi=(b + 1) / n_bins, count=k, mean_confidence=mean, accuracy=acc))
        if mean is not None:
            gaps.append((k, abs(float(np.mean(hit_ece[sel])) - mean)))
    n = len(conf)
    return Calibration(
        n=n,
        n_excluded=n_excluded,
        binning=f"{n_bins} equal-width bins over [0, 1]: [i/{n_bins}, (i+1)/{n_bins}), the last one closed",
        bins=tuple(bins),
        ece_threshold_km=ece_threshold_km,
        ece=float(sum(k * g for k, g in gaps) / n) if n else None,
        mce=max(g for _, g in gaps) if gaps else None,
        brier=float(np.mean((conf - hit_ece) ** 2)) if n else None,
        mean_confidence=float(conf.mean()) if n else None,
        accuracy={_key(t): (float(np.mean(dist < t)) if n else None) for t in ts},
    )


@attrs.frozen(kw_only=True)
class ScaleFit:
    """The grid's logit scale with the lowest Brier score at ``threshold_km``, and GeoCLIP's for
    comparison (confidences recomputed from the candidates alone, without gallery references)."""

    n: int
    threshold_km: float
    logit_scale: float
    brier: float
    ece: float
    default_logit_scale: float
    default_brier: float
    default_ece: float

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def fit_logit_scale(
    candidate_sets: Sequence[Sequence[Candidate]],
    distances_km: Sequence[float],
    *,
    merge_km: float = MERGE_KM,
    threshold_km: float = ECE_THRESHOLD_KM,
    n_bins: int = 10,
    grid: Sequence[float] = SCALE_GRID,
) -> ScaleFit | None:
    """Temperature scaling of the first answer's confidence: one image per candidate set, with the
    distance from its winner to the truth. None when there is no image. The grouping does not depend
    on the scale, so each image's first-answer members are found once and the grid is one product."""
    if len(candidate_sets) != len(distances_km):
        raise ValueError(f"{len(candidate_sets)} candidate sets but {len(distances_km)} distances")
    sets = [(cs, d) for cs, d in zip(candidate_sets, distances_km, strict=True) if cs]
    if not sets:
        return None
    scales = np.asarray(sorted({*grid, GEOCLIP_LOGIT_SCALE}), dtype=np.float64)
    conf = np.empty((len(scales), len(sets)))
    for j, (cs, _) in enumerate(sets):
        first = rank_answers(cs, merge_km=merge_km)[0].members
        x = np.array([c.score for c in cs], dtype=np.float64)
        z = scales[:, None] * (x - x.max())[None, :]
        w = np.exp(z)
        conf[:, j] = w[:, list(first)].sum(axis=1) / w.sum(axis=1)
    dist = np.array([d for _, d in sets], dtype=np.float64)
    hit = dist < threshold_km
    brier = np.mean((conf - hit) ** 2, axis=1)
    best = int(np.argmin(brier))
    default = int(np.flatnonzero(scales == GEOCLIP_LOGIT_SCALE)[0])

    def ece(i: int) -> float:
        e = reliability(conf[i].clip(0.0, 1.0), dist, n_bins=n_bins, ece_threshold_km=threshold_km).ece
        return float(e) if e is not None else 0.0

    return ScaleFit(
        n=len(sets),
        threshold_km=threshold_km,
        logit_scale=float(scales[best]),
        brier=float(brier[best]),
        ece=ece(best),
        default_logit_scale=GEOCLIP_LOGIT_SCALE,
        default_brier=float(brier[default]),
        default_ece=ece(default),
    )


def answer_confidences(
    record: Record | Mapping[str, Any], *, merge_km: float = MERGE_KM, logit_scale: float = GEOCLIP_LOGIT_SCALE
) -> tuple[float, ...]:
    """The answers' confidences of one result record, first answer first: its ``answers`` when it
    has them, else computed from its ``candidates`` with :func:`~clue2geo_sdk.pipeline.answers.rank_answers`.
    Empty when the record has neither (a failure) or says it has no confidence (a null ``confidence``:
    a lone fallback point, nothing was weighed), so such images are left out of the table, not binned."""
    rec = Record.of(record)
    if "confidence" in rec.keys and rec.confidence is None:
        return ()
    if rec.answers:
        return tuple(float(a["confidence"]) for a in rec.answers)
    cands = rec.candidate_objects()
    return tuple(a.confidence for a in rank_answers(cands, merge_km=merge_km, logit_scale=logit_scale))


def winner_not_most_confident(confidences: Sequence[Sequence[float]]) -> int:
    """How many images' first answer holds less confidence than one of their other answers."""
    return sum(1 for c in confidences if len(c) > 1 and max(c[1:]) > c[0])


def markdown_table(cal: Calibration, title: str, fit: ScaleFit | None = None) -> str:
    """The reliability table as markdown: one row per bin (empty bins shown), then the summary."""
    ts = list(THRESHOLDS_KM)
    head = ["Confidence", "Images", "Mean conf.", *(f"{THRESHOLD_NAMES[t]}({t:g}km)" for t in ts)]
    head.append(f"Gap @{cal.ece_threshold_km:g}km")
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in cal.bins:
        hi = "]" if b.hi >= 1.0 else ")"
        cells = [f"[{b.lo:.2f}, {b.hi:.2f}{hi}", str(b.count)]
        if b.mean_confidence is not None:
            acc = [f"{100 * (b.accuracy[_key(t)] or 0.0):.1f}" for t in ts]
            gap = (b.accuracy[_key(cal.ece_threshold_km)] or 0.0) - b.mean_confidence
            cells += [f"{b.mean_confidence:.3f}", *acc, f"{gap:+.3f}"]
        else:
            cells += ["—"] * (len(head) - 2)
        lines.append("| " + " | ".join(cells) + " |")

    def fmt(x: float | None) -> str:
        return "—" if x is None or not math.isfinite(x) else f"{x:.3f}"

    lines += [
        "",
        f"{cal.n} images binned, {cal.n_excluded} without a confidence (failed) left out. "
        f"Accuracy in % within each distance (d < t); gap = accuracy − mean confidence at "
        f"{cal.ece_threshold_km:g} km. ECE {fmt(cal.ece)}, MCE {fmt(cal.mce)}, Brier {fmt(cal.brier)} "
        f"(at {cal.ece_threshold_km:g} km).",
    ]
    if cal.winner_not_most_confident is not None:
        lines.append(f"First answer (the winner) not the most confident: {cal.winner_not_most_confident}.")
    if fit is not None:
        lines.append(
            f"Temperature scaling on this set ({fit.n} images, candidates only): logit scale {fit.logit_scale:.3g} "
            f"gives Brier {fit.brier:.3f}, ECE {fit.ece:.3f}; GeoCLIP's {fit.default_logit_scale:.4g} gives "
            f"Brier {fit.default_brier:.3f}, ECE {fit.default_ece:.3f} (check a fitted scale on another set)."
        )
    return "\n".join(lines) + "\n"
