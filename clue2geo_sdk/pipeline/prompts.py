"""Default prompt templates, from the paper's appendix (figures 2-5) and G3's RAG prompt.

A bundle's manifest carries the templates its model was trained with (``vlm.params.prompts``);
these defaults fill any that are missing. Placeholders use ``str.format`` names.
"""

from __future__ import annotations

from collections.abc import Mapping

CUES = """Extract and list all visually identifiable cues from the image that may be related to its geographic location:
1) Landmark buildings or distinctive structures — describe their detailed characteristics and quantify them when possible;
2) Natural landscape features (e.g., mountains, coastlines, specific vegetation);
3) Scene type (e.g., urban street view, rural field, indoor);
4) Any recognizable text in the image (e.g., road signs, shop signs, billboards — attempt to transcribe the text content);
5) Types or characteristics of vehicles (e.g., distinctive taxis or buses);
6) Typical clothing or activities of people;
7) Overall environmental atmosphere and style (e.g., weather, lighting).
The above types are for reference only — do not limit yourself to these categories. Each cue should be described in as much detail as possible.
Output format: a JSON list of objects {{"cue": "...", "description": "..."}}.
Example:
[{{"cue": "Tower structure", "description": "A tall tower with a complex metal framework, rectangular base tapering upwards with a pointed top, symmetrical geometric design resembling the Eiffel Tower"}}]
Extract as many cues as possible — there is no upper limit, but provide at least five.
Even subtle cues that might aid geographic inference should be included.
Output only the cues; do not include control characters or any prediction of the geographic location."""

_LOCATE_HEAD = """Based on the content of the image, infer the country where the scene appears and provide the most likely answer. Then, follow these steps for multi-step reasoning using the extracted clues to identify the most probable city and its landmark:
1. Consider only the most important clue set 1, and determine a few candidate cities and landmarks it may point to.
2. Incorporate the second important clue set 2, and output the candidate cities and landmarks based on combined reasoning from sets 1 and 2.
3. Introduce the third clue set 3, integrate all three clue sets, and output the single city and landmark most likely.
For the predicted location, output the corresponding GPS coordinates.
Notes:
- If the city or landmark cannot be determined, fill in null.
- Coordinates must be in decimal degrees (DD) format, not degrees-minutes-seconds (DMS) or any other format, and retain at least four decimal places.
- If there is no city or landmark, return the center coordinates of the next higher-level region.
Input clues in order of importance:
{cluemap}
"""

# Stage 3 (OL) output format: figure 5.
LOCATE = _LOCATE_HEAD + ('Output only JSON: {{"country": "", "city": "", "landmark": "", "lat": "", "lon": ""}}')
# Stage 2 (RL) output format: figure 4, with the reasoning.
LOCATE_REASON = _LOCATE_HEAD + (
    'Output only JSON: {{"country": "", "city": "", "landmark": "", "lat": "", "lon": "", "Reasons": ""}}'
)
# Ablation "w/o CM": the image alone.
LOCATE_NO_CLUEMAP = """Based on the content of the image, infer the country, city and landmark where the scene appears and output the corresponding GPS coordinates in decimal degrees with at least four decimal places. If the city or landmark cannot be determined, fill in null.
Output only JSON: {{"country": "", "city": "", "landmark": "", "lat": "", "lon": ""}}"""
# Stage 1 (RC): figure 3.
CITY_REASON = """According to the content of the picture, please deduce which country the picture appears in. Please give the most likely answer and reasons, output in JSON format, e.g. {{"country": "", "city": "", "Reasons": ""}}."""
# G3-style retrieval-augmented prompt (Jia et al., 2024), used with 5, 10 and 15 references.
RAG = """Suppose you are an expert in geo-localization. Analyze this image and give your best guess of where it was taken, down to the coordinates.
For your reference, these are the coordinates of places that look similar to this image: {similar}.
And these are the coordinates of places that look dissimilar to this image: {dissimilar}.
Output only JSON: {{"country": "", "city": "", "landmark": "", "lat": "", "lon": ""}}"""

DEFAULT_PROMPTS: dict[str, str] = {
    "cues": CUES,
    "locate": LOCATE,
    "locate_reason": LOCATE_REASON,
    "locate_no_cluemap": LOCATE_NO_CLUEMAP,
    "city_reason": CITY_REASON,
    "rag": RAG,
}


def resolve(overrides: Mapping[str, str] | None) -> dict[str, str]:
    """The bundle's templates over the defaults."""
    return {**DEFAULT_PROMPTS, **dict(overrides or {})}
