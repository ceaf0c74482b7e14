"""What kind of opinion the report gives, and each image's investigative lead with its ranked alternatives.

ISO 21043-4 asks an examiner to say what kind of opinion a result is. A clue2geo result is an
*investigative* one: a ranked list of places to look (the record's ``answers``: rank 1 is the lead, the
rest its alternatives), made by machine-learning models, to direct an inquiry. It is not an evaluative
opinion (it weighs no propositions and gives no likelihood ratio) and not a conclusion about where a
photo was taken; its error rates are the bundle's validation, stated at the top of the page.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from ...evaluation.metrics import distance_km
from ...runs.records import Record
from .style import esc, finite, km, list_field, num

#: How many alternatives (after the lead) each image's table shows; the record holds them all.
ALTERNATIVES_SHOWN = 10

OPINION = (
    '<div class="opinion" id="opinion"><h2>What these results are</h2><p>Each result below is an '
    "<b>investigative lead</b> with its ranked alternatives, not a conclusion. In the terms of ISO 21043-4 it is "
    "an <i>investigative</i> opinion: a ranked list of places to look, proposed by machine-learning models "
    "(a vision-language model's answers weighed by an image-to-location embedding), to direct further "
    "inquiry. It is not an <i>evaluative</i> opinion: it weighs no competing propositions, states no "
    "likelihood ratio, and does not say where the photo was taken. Its confidences are the models' scores, "
    "not probabilities; the known error rates are the bundle's validation stated above. A lead needs "
    "corroboration (other evidence, a visit, the examiner's own analysis) before anything rests on it.</p></div>"
)


def _row(a: Mapping[str, Any], lead: Mapping[str, Any]) -> str:
    """One ranked answer; an alternative's distance from the lead when both positions are finite."""
    role = "lead" if a is lead else "alternative"
    apart = (
        distance_km(lead["lat"], lead["lon"], a["lat"], a["lon"])
        if a is not lead and finite(lead.get("lat"), lead.get("lon"), a.get("lat"), a.get("lon"))
        else None
    )
    return (
        f'<tr class="{role}"><td>{esc(a.get("rank"))}</td><td>{role}</td><td>{num(a.get("lat"))}, {num(a.get("lon"))}'
        f"</td><td>{km(apart)}</td><td>{num(a.get('confidence'), '.3f')}</td><td>{num(a.get('score'), '.3f')}</td>"
        f'<td class="text">{esc(", ".join(map(str, a.get("sources") or [])))}</td><td>{km(a.get("extent_km"))}</td></tr>'
    )


def _notes(rec: Record) -> str:
    """What the confidence is, and the record's particular cases (no confidence, a region anchor)."""
    refs = rec.references
    photos = isinstance(refs, Mapping) and refs.get("gallery") == "photos"
    over = "candidates'" if photos else "candidates' and the nearest gallery points'"
    note = (
        "There was nothing to weigh the lead against (a lone fallback point): it has no confidence. "
        if rec.confidence is None
        else ""
    )
    candidates = list_field(rec.candidates, "candidates")
    if any(str(c.get("source")) == "region_anchor" for c in candidates if isinstance(c, Mapping)):
        note += "region_anchor is a point inside the region chosen because nothing else was in it, not a model answer. "
    return (
        f"<p><small>{html.escape(note)}Confidence: the share of a softmax over the {esc(over)} GPSCLIP cosines "
        "that falls on the answer; read it against a reliability table (<code>clue2geo eval --calibration</code>) "
        "and the bundle's validation, not as a probability.</small></p>"
    )


def leads_html(rec: Record) -> str:
    """The record's investigative lead (answers[0]) and its top alternatives (candidates merged within
    25 km), with each one's distance from the lead, confidence and score."""
    answers = [a for a in list_field(rec.answers, "answers") if isinstance(a, Mapping)]
    if not answers:
        return "<p>No ranked answers in this record: no lead or alternatives to show.</p>"
    lead, rest = answers[0], rec.alternatives()  # the same alternatives as the KML and CASE exports
    shown = rest[:ALTERNATIVES_SHOWN]
    more = (
        f"<p><small>{len(rest) - len(shown)} further alternative(s) are in the record (its answers).</small></p>"
        if len(rest) > len(shown)
        else ""
    )
    alts = f"its {len(rest)} ranked alternative(s)" if rest else "no alternative (every candidate merged into it)"
    intro = (
        f'<p class="lead-note">An investigative lead, not a conclusion: the lead (rank 1) and {alts}, each a '
        "place to check, in the order the models' scores put them.</p>"
    )
    return (
        f'{intro}<table class="answers"><thead><tr><th>#</th><th>role</th><th>lat, lon</th><th>from the lead</th>'
        '<th>confidence</th><th>best score</th><th class="text">merged candidates</th><th>extent</th></tr></thead>'
        f"<tbody>{''.join(_row(a, lead) for a in [lead, *shown])}</tbody></table>{more}{_notes(rec)}"
    )
