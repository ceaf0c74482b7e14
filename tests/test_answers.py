"""Distinct answers: the merge against hand-made layouts and geopy's great circle at the radius edge,
confidences against hand-computed softmax sums, and the winner staying first (hypothesis)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from geopy.distance import great_circle
from hypothesis import given, settings
from hypothesis import strategies as st

from clue2geo_sdk.geo.distance import haversine_km
from clue2geo_sdk.pipeline.answers import GEOCLIP_LOGIT_SCALE, rank_answers, softmax_weights
from clue2geo_sdk.pipeline.selection import best_by_cosine as select
from clue2geo_sdk.results import SOURCES, Answer, Candidate
from clue2geo_sdk.retrieval.search import GalleryHit

R = 6371.0088
PARIS = (48.8566, 2.3522)
VERSAILLES = (48.8049, 2.1204)  # 17.9 km from Paris (geopy)
LONDON = (51.5074, -0.1278)  # 343.6 km from Paris


def cand(source: str, pos: tuple[float, float], score: float, sample: int = 0, city: str | None = None) -> Candidate:
    return Candidate(source=source, lat=pos[0], lon=pos[1], score=score, sample=sample, city=city)


THREE = [
    cand("direct", PARIS, 0.30, city="Paris"),
    cand("rag5", VERSAILLES, 0.25, city="Versailles"),
    cand("rag10", LONDON, 0.28, city="London"),
]


def test_three_candidates_by_hand() -> None:
    assert great_circle(PARIS, VERSAILLES, radius=R).km == pytest.approx(17.9148, abs=1e-3)
    answers = rank_answers(THREE, logit_scale=10.0)
    # scale 10: weights ∝ e^3.0, e^2.5, e^2.8; Paris + Versailles merge (17.9 km < 25), London alone
    total = math.exp(3.0) + math.exp(2.5) + math.exp(2.8)
    assert [a.members for a in answers] == [(0, 1), (2,)]
    assert [a.sources for a in answers] == [("direct", "rag5"), ("rag10",)]
    assert answers[0].confidence == pytest.approx((math.exp(3.0) + math.exp(2.5)) / total)
    assert answers[0].confidence == pytest.approx(0.6624155, abs=1e-7)
    assert answers[1].confidence == pytest.approx(0.3375845, abs=1e-7)
    a = answers[0]
    assert (a.rank, a.lat, a.lon, a.score, a.city) == (1, *PARIS, 0.30, "Paris")  # the best member's position
    assert a.extent_km == pytest.approx(great_circle(PARIS, VERSAILLES, radius=R).km, abs=1e-6)
    assert answers[1].extent_km == 0.0 and answers[1].rank == 2
    d = a.to_dict()
    assert d["members"] == [0, 1] and d["sources"] == ["direct", "rag5"] and d["confidence"] == a.confidence
    assert set(d) == {
        "rank", "lat", "lon", "score", "confidence", "members", "sources", "extent_km", "country", "city",
        "references",
    }  # fmt: skip
    assert Answer(**json.loads(json.dumps(d))) == a  # round trip through JSON
    # a radius below 17.9 km keeps Versailles apart
    apart = rank_answers(THREE, logit_scale=10.0, merge_km=17.0)
    assert [x.sources for x in apart] == [("direct",), ("rag10",), ("rag5",)]
    assert apart[2].confidence == pytest.approx(math.exp(2.5) / total)


def test_references_join_the_softmax() -> None:
    near_paris = great_circle(kilometers=5.0, radius=R).destination(PARIS, bearing=90.0)
    refs = [
        GalleryHit(key=1, lat=near_paris.latitude, lon=near_paris.longitude, cosine=0.29),  # into Paris's answer
        GalleryHit(key=2, lat=52.52, lon=13.405, cosine=0.27),  # Berlin: near no answer, "elsewhere"
        GalleryHit(key=3, lat=LONDON[0], lon=LONDON[1], cosine=0.9),  # exactly a candidate: not counted twice
    ]
    answers = rank_answers(THREE, logit_scale=10.0, references=refs)
    total = sum(math.exp(x) for x in (3.0, 2.5, 2.8, 2.9, 2.7))
    assert [a.sources for a in answers] == [("direct", "rag5"), ("rag10",)]  # references open no answer
    assert answers[0].confidence == pytest.approx((math.exp(3.0) + math.exp(2.5) + math.exp(2.9)) / total)
    assert answers[1].confidence == pytest.approx(math.exp(2.8) / total)
    assert [a.references for a in answers] == [1, 0]
    elsewhere = 1 - sum(a.confidence for a in answers)
    assert elsewhere == pytest.approx(math.exp(2.7) / total) == pytest.approx(0.1820, abs=1e-4)  # 14.880 / 81.766
    # a lone fallback candidate no longer gets 1.0 when the gallery disagrees with it
    lone = rank_answers([cand("gallery_nearest", PARIS, 0.30)], logit_scale=10.0, references=refs[1:2])
    assert lone[0].confidence == pytest.approx(1 / (1 + math.exp(-0.3)))
    with pytest.raises(ValueError, match=r"references \[0\]"):
        rank_answers(THREE, references=[GalleryHit(key=0, lat=float("inf"), lon=0.0, cosine=0.1)])


def test_default_scale_is_geoclips() -> None:
    assert GEOCLIP_LOGIT_SCALE == pytest.approx(math.exp(3.681034803390503))
    answers = rank_answers(THREE)
    w = [math.exp(GEOCLIP_LOGIT_SCALE * s) for s in (0.30, 0.25, 0.28)]
    assert answers[0].confidence == pytest.approx((w[0] + w[1]) / sum(w))
    assert softmax_weights([1000.0, 1000.0]) == pytest.approx([0.5, 0.5])  # stable at large logits
    assert softmax_weights([0.1, 0.9], 0.0) == pytest.approx([0.5, 0.5])  # scale 0: a vote count


def test_order_independent() -> None:
    ref = rank_answers(THREE)
    for perm in itertools.permutations(THREE):
        got = rank_answers(list(perm))
        assert [(a.lat, a.lon, a.sources, a.score) for a in got] == [(a.lat, a.lon, a.sources, a.score) for a in ref]
        assert [a.confidence for a in got] == pytest.approx([a.confidence for a in ref], abs=1e-12)


def test_later_answer_can_hold_more_confidence() -> None:
    # the winner alone at 0.30; two agreeing candidates at 0.29 elsewhere: 1 / (1 + 2 e^-0.1) = 0.3559
    cands = [cand("direct", PARIS, 0.30), cand("rag5", LONDON, 0.29), cand("rag10", (51.51, -0.12), 0.29)]
    answers = rank_answers(cands, logit_scale=10.0)
    assert answers[0].sources == ("direct",)  # ranked by best score: the pipeline's winner stays first
    assert answers[0].confidence == pytest.approx(0.3559131, abs=1e-7)
    assert answers[1].confidence == pytest.approx(1 - 0.3559131, abs=1e-7)


def test_greedy_merge_is_not_transitive() -> None:
    # 0 -- 20 km -- 1 -- 20 km -- 2 on the equator: the best absorbs only what lies within 25 km of it
    deg = 20.0 / (math.pi * R / 180)
    cands = [cand("direct", (0.0, 0.0), 0.3), cand("rag5", (0.0, deg), 0.2), cand("rag10", (0.0, 2 * deg), 0.1)]
    assert [a.members for a in rank_answers(cands)] == [(0, 1), (2,)]
    # when the middle one is best, it takes both
    mid = [cand("direct", (0.0, 0.0), 0.2), cand("rag5", (0.0, deg), 0.3), cand("rag10", (0.0, 2 * deg), 0.1)]
    answers = rank_answers(mid)
    assert len(answers) == 1 and answers[0].members == (1, 0, 2) and answers[0].confidence == pytest.approx(1.0)


@pytest.mark.parametrize(("km", "merged"), [(24.99, True), (25.01, False)])
def test_radius_edge_against_geopy(km: float, merged: bool) -> None:
    start = (40.0, 116.3)
    p = great_circle(kilometers=km, radius=R).destination(start, bearing=37.0)
    cands = [cand("direct", start, 0.3), cand("rag5", (p.latitude, p.longitude), 0.2)]
    assert len(rank_answers(cands, merge_km=25.0)) == (1 if merged else 2)


def test_ties_follow_the_pipelines_order() -> None:
    # equal scores: select() takes the first (the direct answer); rank_answers seeds with it whatever the order
    cands = [cand("direct", PARIS, 0.3), cand("rag5", LONDON, 0.3)]
    for order in (cands, cands[::-1]):
        assert rank_answers(order)[0].sources == ("direct",)
    nearest = cand("gallery_nearest", LONDON, 0.3)
    assert rank_answers([nearest, cand("rag15", PARIS, 0.3, sample=1)])[0].sources == ("rag15",)


def test_bad_input_is_named() -> None:
    assert rank_answers([]) == ()
    with pytest.raises(ValueError, match="merge_km"):
        rank_answers(THREE, merge_km=0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        rank_answers(THREE, logit_scale=float("nan"))
    with pytest.raises(ValueError, match=r"candidates \[1\]"):
        rank_answers([THREE[0], cand("rag5", PARIS, float("nan"))])
    one = rank_answers([THREE[2]])
    assert len(one) == 1 and one[0].confidence == 1.0  # a lone candidate: certain among itself


coords = st.tuples(st.floats(-60, 60), st.floats(-30, 30))
cands_st = st.lists(
    st.tuples(st.sampled_from(["direct", "rag5", "rag10", "rag15"]), coords, st.floats(-1, 1)), min_size=1, max_size=9
)


refs_st = st.lists(st.tuples(coords, st.floats(-1, 1)), max_size=6)


@settings(max_examples=200, deadline=None)
@given(cands_st, st.floats(1.0, 3000.0), refs_st)
def test_properties(raw: list, merge_km: float, raw_refs: list) -> None:
    # in the pipeline's order (direct, rag5, rag10, rag15, each by sample), where select() breaks ties
    raw = sorted(raw, key=lambda r: SOURCES.index(r[0]))
    cands = [cand(s, p, sc, sample=i) for i, (s, p, sc) in enumerate(raw)]
    answers = rank_answers(cands, merge_km=merge_km)
    best, _ = select(np.array([1.0]), np.array([[c.score] for c in cands]))  # G3's argmax, first on ties
    assert best in answers[0].members and answers[0].score == max(c.score for c in cands)
    assert sorted(i for a in answers for i in a.members) == list(range(len(cands)))
    assert sum(a.confidence for a in answers) == pytest.approx(1.0)
    refs = [GalleryHit(key=i, lat=p[0], lon=p[1], cosine=c) for i, (p, c) in enumerate(raw_refs)]
    with_refs = rank_answers(cands, merge_km=merge_km, references=refs)
    assert [a.members for a in with_refs] == [a.members for a in answers]  # references change no grouping
    assert all(w.confidence >= 0 for w in with_refs) and sum(w.confidence for w in with_refs) <= 1 + 1e-9
    for a in answers:
        d = haversine_km(a.lat, a.lon, [cands[i].lat for i in a.members], [cands[i].lon for i in a.members])
        assert np.all(d < merge_km) and a.extent_km == pytest.approx(float(d.max()))
    for x, y in itertools.combinations(answers, 2):  # a later answer's seed lay outside every earlier radius
        assert float(haversine_km(x.lat, x.lon, y.lat, y.lon)) >= merge_km
        assert x.score >= y.score
