# ruff: noqa: E501  (prompt text reads best unwrapped, like clue2geo_sdk/pipeline/prompts.py)
"""The teacher's prompts for reasoning chains (paper §3.2): the true location is stated and the model
explains which visual cues support it, so the chain argues for the label it is trained with rather
than for the teacher's own guess. Chains are then reviewed and replaced through a reasons file."""

from __future__ import annotations

# Stage RC: simple cue reasoning at country / city level (paper fig. 3).
REASON_CITY = """This photo was taken in {place}. This location is known to be correct; do not propose another one.
Explain briefly which visual cues in the image (text and language, architecture, vegetation, vehicles, road markings, landmarks) show that it is in {place}.
Output only the reasoning as plain text, in one short paragraph, without JSON."""

# Stage RL: step-by-step reasoning over the cluemap at landmark level (paper fig. 4).
REASON_LANDMARK = """This photo was taken in {place}, at latitude {lat}, longitude {lon}. This location is known to be correct; do not propose another one.
Clues extracted from the image, in order of importance:
{cluemap}
Explain step by step how these clues and what you see in the image lead to this location: first the country, then the city, then the landmark or exact place.
Output only the reasoning as plain text, without JSON."""

REASON_TEMPLATES = {"rc": REASON_CITY, "rl": REASON_LANDMARK}


def place_text(country: str | None, city: str | None, landmark: str | None = None) -> str:
    """The known place as one phrase, most specific first (``Eiffel Tower, Paris, France``)."""
    return ", ".join(p for p in (landmark, city, country) if p) or "an unknown place"
