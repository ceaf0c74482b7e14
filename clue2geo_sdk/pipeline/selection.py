"""Candidate selection (G3): score every candidate by the GPSCLIP cosine of its location embedding
against the image embedding; the highest wins. Also the similarity and spread reported with it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..geo.reverse import haversine_km


def select(image_emb: np.ndarray, location_emb: np.ndarray) -> tuple[int, np.ndarray]:
    """Index of the best candidate and every candidate's cosine (inputs are unit rows)."""
    scores = np.asarray(location_emb, dtype=np.float64) @ np.asarray(image_emb, dtype=np.float64).reshape(-1)
    # Ties go to the earlier candidate (the direct prediction comes first).
    return int(np.argmax(scores)), scores


def similarity(score: float) -> float:
    """Cosine in [-1, 1] mapped to [0, 1]."""
    return float(np.clip((score + 1.0) / 2.0, 0.0, 1.0))


def spread_km(lat: float, lon: float, others: Sequence[tuple[float, float]]) -> float | None:
    """Median distance from the winner to the other candidates; None when it stands alone."""
    if not others:
        return None
    arr = np.asarray(others, dtype=np.float64)
    return float(np.median(haversine_km(lat, lon, arr[:, 0], arr[:, 1])))


def format_references(points: Sequence[tuple[float, float]]) -> str:
    """Reference coordinates for the RAG prompt: '[(48.8584, 2.2945), ...]'."""
    return "[" + ", ".join(f"({lat:.4f}, {lon:.4f})" for lat, lon in points) + "]"
