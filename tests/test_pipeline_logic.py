"""The logic around the VLM, with a scripted fake VLM standing in for the model (unit tests only).
Encoders, gallery and geocoder are the demo bundle's real ones."""

from __future__ import annotations

import json
import re
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from clue2geo_sdk import Bundle, Geolocator, Options
from clue2geo_sdk.engines import Generation
from clue2geo_sdk.geo.distance import haversine_km
from clue2geo_sdk.inputs.image import load_image

PARIS = (48.8584, 2.2945)
SYDNEY = (-33.8568, 151.2153)
CUES = [
    {"cue": "Tower", "description": "a tall iron lattice tower"},
    {"cue": "Sign", "description": "French street sign"},
    {"cue": "Sky", "description": "overcast sky"},
    {"cue": "Cars", "description": "small European hatchbacks"},
]


def loc(lat: float, lon: float, **kw: str) -> str:
    return json.dumps(
        {
            "country": kw.get("country", ""),
            "city": kw.get("city", ""),
            "landmark": kw.get("landmark"),
            "lat": f"{lat:.4f}",
            "lon": f"{lon:.4f}",
        }
    )


class FakeVLM:
    """Answers by prompt kind: cues, direct, rag{k}; free vs schema-constrained answers can differ."""

    def __init__(
        self, answers: dict[str, str], constrained: dict[str, str] | None = None, truncated: frozenset = frozenset()
    ) -> None:
        self.answers, self.constrained, self.truncated = answers, constrained or {}, truncated
        self.calls: list[dict] = []

    name = "fake"

    def open(self, image, *, image_tokens=0):  # noqa: ANN001
        vlm = self

        class Session:
            def submit(self, prompt, *, schema, max_tokens, seed=None, temperature=None):  # noqa: ANN001
                kind = vlm.kind(prompt)
                vlm.calls.append(
                    {
                        "kind": kind,
                        "prompt": prompt,
                        "schema": schema is not None,
                        "seed": seed,
                        "temperature": temperature,
                    }
                )
                table = vlm.constrained if schema is not None and kind in vlm.constrained else vlm.answers
                fut = Future()
                fut.set_result(
                    Generation(
                        text=table.get(kind, "I cannot tell."),
                        constrained=schema is not None,
                        tokens=5,
                        seconds=0.0,
                        truncated=kind in vlm.truncated,
                    )
                )
                return fut

            def ask(self, prompt, **kwargs):  # noqa: ANN001, ANN003
                return self.submit(prompt, **kwargs).result()

            def close(self) -> None:
                pass

            def __enter__(self):  # noqa: ANN204
                return self

            def __exit__(self, *exc) -> None:  # noqa: ANN002
                pass

        return Session()

    @staticmethod
    def kind(prompt: str) -> str:
        if prompt.startswith("Extract"):
            return "cues"
        if prompt.startswith("Suppose"):
            similar = prompt.split("look similar to this image:")[1].split("And these")[0]
            return f"rag{len(re.findall(r'[(]', similar))}"
        return "direct"

    def close(self) -> None:
        pass


def make(bundle: Path, vlm: FakeVLM, **opts) -> Geolocator:  # noqa: ANN003
    return Geolocator(Bundle.open(bundle, verify=False), vlm, device="cpu", options=Options(**opts))


def test_selection_picks_highest_gpsclip_cosine_and_drops_invalid(demo_bundle: Path, photo: Path) -> None:
    vlm = FakeVLM(
        {
            "cues": json.dumps(CUES),
            "direct": loc(*PARIS, country="France", city="Paris", landmark="Eiffel Tower"),
            "rag5": loc(*SYDNEY),
            "rag10": '{"lat": "123.0", "lon": "10.0"}',
            "rag15": "no coordinates here",
        }
    )
    geo = make(demo_bundle, vlm)
    pred = geo.locate(photo)
    assert pred.invalid_candidates == 2 and not pred.fallback
    assert [c.source for c in pred.candidates] == ["direct", "rag5"]
    # Independent scoring: cosine of unit GPSCLIP embeddings.
    img = geo.gpsclip.encode_images([load_image(photo).image])[0]
    locs = geo.gpsclip.encode_locations(np.array([PARIS, SYDNEY]))
    want = locs @ img
    assert [c.score for c in pred.candidates] == pytest.approx(want.tolist(), abs=1e-5)
    winner = [PARIS, SYDNEY][int(np.argmax(want))]
    assert (pred.lat, pred.lon) == pytest.approx(winner)
    assert pred.similarity == pytest.approx((max(want) + 1) / 2, abs=1e-5)
    assert pred.answers[0].members == (int(np.argmax(want)),) and pred.confidence == pred.answers[0].confidence
    assert pred.spread_km == pytest.approx(float(haversine_km(*PARIS, *SYDNEY)), rel=1e-4)
    assert pred.country  # from the model or the offline geocoder
    assert len(pred.cues) == 4 and all(-1 <= c.s_l <= 1 and -1 <= c.s_s <= 1 for c in pred.cues)
    assert pred.cluemap is not None and "Clue Set 1" in pred.cluemap["text"]
    direct_prompt = next(c["prompt"] for c in vlm.calls if c["kind"] == "direct")
    assert pred.cluemap["text"] in direct_prompt
    assert set(pred.timings) >= {
        "gpsclip_image",
        "cues",
        "cluemap",
        "direct",
        "retrieval",
        "rag",
        "selection",
        "total",
    }


def test_rag_prompts_carry_5_10_15_similar_and_dissimilar(demo_bundle: Path, photo: Path) -> None:
    vlm = FakeVLM({"direct": loc(*PARIS)})
    make(demo_bundle, vlm, use_cluemap=False).locate(photo)
    rag = [c for c in vlm.calls if c["kind"].startswith("rag")]
    assert list(dict.fromkeys(c["kind"] for c in rag)) == ["rag5", "rag10", "rag15"]
    for c in rag:
        dissimilar = c["prompt"].split("look dissimilar to this image:")[1]
        assert len(re.findall(r"[(]", dissimilar)) == int(c["kind"][3:])


def test_all_invalid_falls_back_to_nearest_gallery_coordinate(demo_bundle: Path, photo: Path) -> None:
    geo = make(demo_bundle, FakeVLM({}))
    pred = geo.locate(photo)
    assert pred.fallback and pred.source == "gallery_nearest"
    assert pred.invalid_candidates == 4  # direct + 3 RAG, each asked under the schema and still unusable
    img = geo.gpsclip.encode_images([load_image(photo).image])[0]
    nearest = geo.gallery.most_similar(img, 1)[0]
    assert (pred.lat, pred.lon) == (nearest.lat, nearest.lon)
    assert (pred.lat, pred.lon) != (0.0, 0.0)


def test_ablations(demo_bundle: Path, photo: Path) -> None:
    vlm = FakeVLM({"direct": loc(*PARIS), "cues": json.dumps(CUES)})
    pred = make(demo_bundle, vlm, use_cluemap=False, use_refinement=False).locate(photo)
    assert [c["kind"] for c in vlm.calls] == ["direct"]
    assert "Clue Set" not in vlm.calls[0]["prompt"]
    assert pred.cues == () and pred.cluemap is None and [c.source for c in pred.candidates] == ["direct"]


def test_constrained_decoding_only_on_rejection(demo_bundle: Path, photo: Path) -> None:
    vlm = FakeVLM({"direct": "Paris, probably."}, constrained={"direct": loc(*PARIS)})
    pred = make(demo_bundle, vlm, use_cluemap=False, use_refinement=False, constrain="fallback").locate(photo)
    assert [c["schema"] for c in vlm.calls] == [False, True] and pred.source == "direct"
    assert [g["constrained"] for g in pred.raw_outputs["direct"]] == [False, True]
    vlm = FakeVLM({"direct": loc(*PARIS)}, constrained={"direct": loc(*SYDNEY)})
    make(demo_bundle, vlm, use_cluemap=False, use_refinement=False, constrain="fallback").locate(photo)
    assert [c["schema"] for c in vlm.calls] == [False]  # free answer parsed: no grammar
    vlm = FakeVLM({"direct": "nope"})
    pred = make(demo_bundle, vlm, use_cluemap=False, use_refinement=False, constrain="never").locate(photo)
    assert [c["schema"] for c in vlm.calls] == [False] and pred.fallback
    vlm = FakeVLM({"direct": loc(*PARIS)}, constrained={"direct": loc(*SYDNEY)})
    pred = make(demo_bundle, vlm, use_cluemap=False, use_refinement=False, constrain="always").locate(photo)
    assert [c["schema"] for c in vlm.calls] == [True] and (pred.lat, pred.lon) == pytest.approx(SYDNEY)


def test_samples_per_prompt_and_nearest_neighbour_option(demo_bundle: Path, photo: Path) -> None:
    vlm = FakeVLM({"direct": loc(*PARIS)})
    pred = make(
        demo_bundle,
        vlm,
        use_cluemap=False,
        use_refinement=False,
        samples_per_prompt=3,
        nearest_neighbour_candidate=True,
    ).locate(photo)
    direct = [c for c in vlm.calls if c["kind"] == "direct"]
    assert [c["seed"] for c in direct] == [1000, 1001, 1002] and all(c["temperature"] == 0.7 for c in direct)
    assert [c.source for c in pred.candidates] == ["direct"] * 3 + ["gallery_nearest"]
    assert [c.sample for c in pred.candidates[:3]] == [0, 1, 2]


def test_options_reject_unknown_keys() -> None:
    with pytest.raises(TypeError, match="unknown option"):
        Options.from_kwargs(use_clue_map=False)
    with pytest.raises(ValueError):
        Options(constrain="sometimes")  # type: ignore[arg-type]


def test_gallery_search_matches_brute_force(geo: Geolocator, photo: Path) -> None:
    """USearch top hits agree with exact numpy search over the same (f16) vectors."""
    idx = geo.gallery.index
    vecs = np.asarray(idx.get(np.arange(len(idx), dtype=np.uint64)), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    q = geo.gpsclip.encode_images([load_image(photo).image])[0]
    exact = np.argsort(-(vecs @ q))
    sim = [h.key for h in geo.gallery.most_similar(q, 15)]
    # f16 storage can swap near-ties at the edge of the top 15; everything else must agree
    assert len(set(sim) & set(exact[:15].tolist())) >= 14
    dis = geo.gallery.least_similar(q, 15)
    assert len({h.key for h in dis} & set(exact[::-1][:15].tolist())) >= 14
    scores = vecs @ q
    assert [h.cosine for h in dis] == pytest.approx(scores[[h.key for h in dis]].tolist(), abs=2e-3)
    assert max(h.cosine for h in dis) < min(h.cosine for h in geo.gallery.most_similar(q, 15))


def test_cues_status_says_how_the_cue_list_was_obtained(demo_bundle: Path, photo: Path) -> None:
    cut = json.dumps(CUES)[:-40]  # the token budget ran out inside the fourth cue
    vlm = FakeVLM({"cues": cut, "direct": loc(*PARIS)}, truncated=frozenset({"cues"}))
    pred = make(demo_bundle, vlm, use_refinement=False).locate(photo)
    assert pred.cues_status == "truncated" and [c.cue for c in pred.cues] == ["Tower", "Sign", "Sky"]
    assert pred.cluemap is not None and "Tower" in pred.cluemap["text"]

    vlm = FakeVLM({"cues": "a tower and a sign", "direct": loc(*PARIS)}, constrained={"cues": json.dumps(CUES)})
    pred = make(demo_bundle, vlm, use_refinement=False, constrain="fallback").locate(photo)
    assert pred.cues_status == "reasked" and len(pred.cues) == 4
    assert [c["schema"] for c in vlm.calls if c["kind"] == "cues"] == [False, True]

    vlm = FakeVLM({"cues": "nothing useful", "direct": loc(*PARIS)})
    pred = make(demo_bundle, vlm, use_refinement=False).locate(photo)
    assert pred.cues_status == "failed" and pred.cues == ()  # said, not silently empty
    assert make(demo_bundle, FakeVLM({"direct": loc(*PARIS)}), use_cluemap=False).locate(photo).cues_status == "skipped"


def test_model_strings_are_kept_apart_and_cleaned(demo_bundle: Path, photo: Path) -> None:
    noisy = loc(*PARIS, country="Fr\u0007ance" + "x" * 300, city="=cmd|' /C calc'!A0")
    pred = make(demo_bundle, FakeVLM({"direct": noisy}), use_cluemap=False, use_refinement=False).locate(photo)
    assert pred.country == "France" and pred.country_code == "FR"  # the geocoder of the winning coordinate
    assert pred.model_country.startswith("France") and "\x07" not in pred.model_country
    assert len(pred.model_country) <= 200 and pred.model_city == "=cmd|' /C calc'!A0"
