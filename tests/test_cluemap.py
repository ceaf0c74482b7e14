"""Eqs. 2-4 against values worked out by hand on fixed 2-d embeddings, and the edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clue2geo_sdk.pipeline.cluemap import build_cluemap, dedupe, local_consistency, semantic_coherence

R = 1 / math.sqrt(2)
CUES = [("A", "a"), ("B", "b"), ("C", "c"), ("D", "d")]
PATCHES = np.array([[1.0, 0.0], [0.0, 1.0]])
CLIP_TEXT = np.array([[1.0, 0.0], [0.0, 1.0], [R, R], [-1.0, 0.0]])
SBERT = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [R, R]])


def test_scores_match_hand_computation() -> None:
    cm = build_cluemap(CUES, CLIP_TEXT, PATCHES, SBERT, alpha=0.5)
    # S_l: max over patches of the cosine.
    assert [c.s_l for c in cm.cues] == pytest.approx([1.0, 1.0, R, 0.0])
    assert [c.patch for c in cm.cues] == [0, 1, 0, 1]  # C ties at both patches: the first wins
    # S_s: mean cosine to the other three cues.
    assert [c.s_s for c in cm.cues] == pytest.approx([(1 + R) / 3, R / 3, (1 + R) / 3, R])
    # S_r = 0.5 S_l + 0.5 S_s.
    want = [0.5 + (1 + R) / 6, 0.5 + R / 6, R / 2 + (1 + R) / 6, R / 2]
    assert [c.s_r for c in cm.cues] == pytest.approx(want)
    # Primaries by S_r: A (0.785), C (0.638), B (0.618); D is equally similar (R) to all three
    # primaries, so it joins the highest-ranked one, A.
    assert [s.primary for s in cm.sets] == [0, 2, 1]
    assert [s.members for s in cm.sets] == [(3,), (), ()]
    text = cm.render()
    assert text.splitlines() == [
        "1. Clue Set 1:",
        "- A: a",
        "- D: d",
        "2. Clue Set 2:",
        "- C: c",
        "3. Clue Set 3:",
        "- B: b",
    ]


def test_alpha_weights_the_two_scores() -> None:
    only_local = build_cluemap(CUES, CLIP_TEXT, PATCHES, SBERT, alpha=1.0)
    assert [c.s_r for c in only_local.cues] == pytest.approx([1.0, 1.0, R, 0.0])
    only_semantic = build_cluemap(CUES, CLIP_TEXT, PATCHES, SBERT, alpha=0.0)
    assert only_semantic.sets[0].primary == 3  # D has the highest coherence


def test_zero_one_two_cues() -> None:
    empty = build_cluemap([], np.zeros((0, 2)), PATCHES, np.zeros((0, 2)))
    assert empty.sets == () and "no clues" in empty.render()
    one = build_cluemap(CUES[:1], CLIP_TEXT[:1], PATCHES, SBERT[:1])
    assert one.cues[0].s_s == 0.0 and one.cues[0].s_r == pytest.approx(0.5)
    assert [s.primary for s in one.sets] == [0]
    two = build_cluemap(CUES[:2], CLIP_TEXT[:2], PATCHES, SBERT[:2])
    assert sorted(s.primary for s in two.sets) == [0, 1] and all(s.members == () for s in two.sets)


def test_ties_keep_original_order() -> None:
    same = np.tile([[1.0, 0.0]], (5, 1))
    cm = build_cluemap([(f"c{i}", "") for i in range(5)], same, PATCHES, same)
    assert [s.primary for s in cm.sets] == [0, 1, 2]
    assert cm.sets[0].members == (3, 4)  # equal similarity everywhere: to the first primary, in order


def test_dedupe_merges_exact_repeats_only() -> None:
    kept, merged = dedupe([("Sign", "Red  sign"), ("sign", "red sign"), ("Sign", "blue sign"), ("", "")])
    assert kept == [("Sign", "Red  sign"), ("Sign", "blue sign")] and merged == 2


def test_component_functions() -> None:
    s_l, patch = local_consistency(np.array([[3.0, 4.0]]), np.array([[1.0, 0.0], [0.0, 2.0]]))
    assert s_l[0] == pytest.approx(0.8) and patch[0] == 1
    assert semantic_coherence(np.array([[1.0, 0.0], [0.0, 1.0]])) == pytest.approx([0.0, 0.0])
