"""Candidate selection (G3): every usable location answer, and the nearest gallery point, scored by
the GPSCLIP cosine of its location embedding against the image embedding; the highest wins. Also
the similarity and spread reported with the winner."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np

from ..engines.ask import usable
from ..engines.encoders import GpsClipEncoder
from ..geo.distance import haversine_km
from ..geo.region import Region
from ..results import Candidate
from ..retrieval.search import GalleryHit
from ..sanitize import clean_text
from .stages import Proposal


@attrs.frozen(kw_only=True)
class Selection:
    """Scored candidates, the winner's index, and how many proposals were invalid."""

    candidates: tuple[Candidate, ...]
    best: int
    invalid: int
    fallback: bool
    outside_region: int = 0


def best_by_cosine(image_emb: np.ndarray, location_emb: np.ndarray) -> tuple[int, np.ndarray]:
    """Index of the best candidate and every candidate's cosine (inputs are unit rows)."""
    scores = np.asarray(location_emb, dtype=np.float64) @ np.asarray(image_emb, dtype=np.float64).reshape(-1)
    # Ties go to the earlier candidate (the direct prediction comes first).
    return int(np.argmax(scores)), scores


def choose(
    proposals: Sequence[Proposal],
    image_emb: np.ndarray,
    gpsclip: GpsClipEncoder,
    nearest: GalleryHit,
    *,
    add_nearest: bool,
    region: Region | None = None,
) -> Selection:
    """G3's selection: the candidate whose GPSCLIP location embedding is closest to the image wins.
    Invalid coordinates are dropped and counted, and so are candidates outside ``region``; with none
    left the nearest (in-region) gallery point answers."""
    valid = [p for p in proposals if usable(p.answer)]
    outside = 0
    if region is not None and valid:
        inside = region.contains([p.answer.lat for p in valid], [p.answer.lon for p in valid])
        outside = int(len(valid) - inside.sum())
        valid = [p for p, ok in zip(valid, inside, strict=True) if ok]
    points = [(p.answer.lat, p.answer.lon) for p in valid]
    use_nearest = add_nearest or not valid
    if use_nearest:
        points.append((nearest.lat, nearest.lon))
    best, scores = best_by_cosine(image_emb, gpsclip.encode_locations(np.asarray(points, dtype=np.float32)))
    candidates = [_candidate(p, float(scores[i])) for i, p in enumerate(valid)]
    if use_nearest:
        candidates.append(
            Candidate(
                source=nearest_source(nearest),
                lat=nearest.lat,
                lon=nearest.lon,
                score=float(scores[-1]),
                country=nearest.country or None,
                city=nearest.city or None,
            )
        )
    invalid = sum(not usable(p.answer) for p in proposals)
    return Selection(
        candidates=tuple(candidates), best=best, invalid=invalid, fallback=not valid, outside_region=outside
    )


def _candidate(p: Proposal, score: float) -> Candidate:
    """A usable model answer as a candidate, its names cleaned for the record."""
    return Candidate(
        source=p.source,
        lat=float(p.answer.lat),  # type: ignore[arg-type]
        lon=float(p.answer.lon),  # type: ignore[arg-type]
        score=score,
        country=clean_text(p.answer.country),
        city=clean_text(p.answer.city),
        landmark=clean_text(p.answer.landmark),
        sample=p.sample,
    )


def region_anchor(region: Region) -> GalleryHit:
    """Stands in for the nearest gallery point when the gallery has none inside the region."""
    lat, lon = region.anchor()
    return GalleryHit(key=-1, lat=lat, lon=lon, cosine=float("nan"))


def nearest_source(hit: GalleryHit) -> str:
    return "region_anchor" if hit.key < 0 else "gallery_nearest"


def similarity(score: float) -> float:
    """Cosine in [-1, 1] mapped to [0, 1]."""
    return float(np.clip((score + 1.0) / 2.0, 0.0, 1.0))


def spread_km(lat: float, lon: float, others: Sequence[tuple[float, float]]) -> float | None:
    """Median distance from the winner to the other candidates; None when it stands alone."""
    if not others:
        return None
    arr = np.asarray(others, dtype=np.float64)
    return float(np.median(haversine_km(lat, lon, arr[:, 0], arr[:, 1])))
