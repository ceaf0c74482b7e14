"""Top-k distinct answers from a prediction's candidates, each with a confidence.

Candidates that land within ``merge_km`` of each other are one answer: the candidates are taken
best GPSCLIP score first, and the best remaining one absorbs every remaining candidate closer than
``merge_km`` to it (great-circle, ``d < merge_km``). The outcome depends only on the candidates, not
on their order (ties in score are broken by :data:`~clue2geo_sdk.results.SOURCES` order, then
sample, then coordinate, which is also the order in which the pipeline lists them, so the pipeline's
winner — the first highest score, G3's rule — always seeds the first answer).

``confidence`` is the softmax of the candidates' GPSCLIP cosines times the model's logit scale
(GeoCLIP's trained ``exp(logit_scale)``, the same scale its contrastive loss used), summed over an
answer's members: agreeing candidates add up. Without ``references`` the answers' confidences sum
to 1 and a lone candidate gets 1.0. With ``references`` (the gallery points most similar to the
image, as retrieved for the RAG prompts) those points join the softmax too — GeoCLIP's own
prediction is a softmax over its gallery — so the image looking like places no candidate is near
leaves mass ``elsewhere`` (1 − Σ confidence); a reference within ``merge_km`` of an answer adds to
it (the first such answer), and never opens one. Either way it is the model's relative preference
among the points it was given, not a probability that the answer is right until a reliability
table (``clue2geo eval --calibration``) says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..geo.distance import haversine_km
from ..results import SOURCES, Answer, Candidate

#: ``exp`` of GeoCLIP's released ``logit_scale`` parameter (3.681035): the inverse temperature its
#: image–GPS contrastive loss was trained with (CLIP's initial value was 1 / 0.07 = 14.3).
GEOCLIP_LOGIT_SCALE = 39.687441529941275
#: The merge radius: the "City" accuracy threshold, so one answer is one city-level guess.
MERGE_KM = 25.0


class Reference(Protocol):
    """A scored gallery point (:class:`clue2geo_sdk.retrieval.search.GalleryHit` is one). Its ``cosine``
    must be on the candidates' scale: GPSCLIP image embedding against a *location* embedding (the
    coordinate gallery); image-to-image similarities from a photo gallery are another scale."""

    @property
    def lat(self) -> float: ...
    @property
    def lon(self) -> float: ...
    @property
    def cosine(self) -> float: ...


def softmax_weights(scores: Sequence[float], logit_scale: float = GEOCLIP_LOGIT_SCALE) -> np.ndarray:
    """``exp(s·scale) / Σ exp(s·scale)`` computed stably (max subtracted first)."""
    z = np.asarray(scores, dtype=np.float64) * logit_scale
    if z.size == 0:
        return z
    w = np.exp(z - z.max())
    return w / w.sum()


def _order_key(c: Candidate) -> tuple[float, int, str, int, float, float]:
    rank = SOURCES.index(c.source) if c.source in SOURCES else len(SOURCES)
    return (-c.score, rank, c.source, c.sample, c.lat, c.lon)


def rank_answers(
    candidates: Sequence[Candidate],
    *,
    merge_km: float = MERGE_KM,
    logit_scale: float = GEOCLIP_LOGIT_SCALE,
    references: Sequence[Reference] = (),
) -> tuple[Answer, ...]:
    """The distinct answers, best score first (the first one holds the pipeline's winner).

    Answers are ranked by their best member's score, not by confidence: a later answer can hold
    more confidence than the first when several weaker candidates agree on it. A reference at
    exactly a candidate's coordinate (the ``gallery_nearest`` candidate is the top hit) is skipped,
    so it is not counted twice.
    """
    _check_arguments(candidates, merge_km, logit_scale)
    if not candidates:
        return ()
    taken = {(c.lat, c.lon) for c in candidates}
    refs = [r for r in references if (r.lat, r.lon) not in taken]
    bad = [i for i, r in enumerate(refs) if not all(map(math.isfinite, (r.lat, r.lon, r.cosine)))]
    if bad:
        raise ValueError(f"references {bad}: lat, lon and cosine must be finite numbers")
    weights = softmax_weights([c.score for c in candidates] + [r.cosine for r in refs], logit_scale)
    return _merge(candidates, refs, weights, merge_km)


def _check_arguments(candidates: Sequence[Candidate], merge_km: float, logit_scale: float) -> None:
    if not merge_km > 0 or not math.isfinite(merge_km):
        raise ValueError(f"merge_km must be a positive number of km, got {merge_km!r}")
    if not logit_scale >= 0 or not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be a finite number >= 0, got {logit_scale!r}")
    bad = [i for i, c in enumerate(candidates) if not all(map(math.isfinite, (c.lat, c.lon, c.score)))]
    if bad:
        raise ValueError(f"candidates {bad}: lat, lon and score must be finite numbers")


def _merge(
    candidates: Sequence[Candidate], refs: Sequence[Reference], weights: np.ndarray, merge_km: float
) -> tuple[Answer, ...]:
    """Seed an answer with the best remaining candidate; it takes every remaining candidate, and
    every remaining reference, closer than ``merge_km``; its confidence is their weights' sum."""
    ref_w = weights[len(candidates) :]
    order = sorted(range(len(candidates)), key=lambda i: _order_key(candidates[i]))
    lat = np.array([c.lat for c in candidates], dtype=np.float64)
    lon = np.array([c.lon for c in candidates], dtype=np.float64)
    left = set(order)
    ref_lat = np.array([r.lat for r in refs], dtype=np.float64)
    ref_lon = np.array([r.lon for r in refs], dtype=np.float64)
    ref_left = np.ones(len(refs), dtype=bool)
    answers: list[Answer] = []
    for seed in order:
        if seed not in left:
            continue
        d = haversine_km(lat[seed], lon[seed], lat, lon)
        members = tuple(i for i in order if i in left and d[i] < merge_km)
        left.difference_update(members)
        near = ref_left & (haversine_km(lat[seed], lon[seed], ref_lat, ref_lon) < merge_km)
        ref_left &= ~near
        best = candidates[seed]
        answers.append(
            Answer(
                rank=len(answers) + 1,
                lat=best.lat,
                lon=best.lon,
                score=best.score,
                confidence=float(sum(weights[i] for i in members) + ref_w[near].sum()),
                members=members,
                sources=tuple(candidates[i].source for i in members),
                extent_km=float(max(d[i] for i in members)),
                country=best.country,
                city=best.city,
                references=int(near.sum()),
            )
        )
    return tuple(answers)
