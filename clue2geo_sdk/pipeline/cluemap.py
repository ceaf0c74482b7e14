"""The cluemap (paper eqs. 2-4): score cues, pick three primary nodes, attach the rest.

S_l(c)   = max_j cos(CLIPtext(c), CLIPimage(patch_j))               local consistency (eq. 2)
S_s(c_i) = 1/(|C|-1) * sum_{j != i} cos(SBERT(c_i), SBERT(c_j))     semantic coherence (eq. 3)
S_r(c_i) = alpha * S_l + (1 - alpha) * S_s, alpha = 0.5            relationship strength (eq. 4)

Deterministic: exact duplicate cues are merged first; ties in S_r keep the cues' original order;
a cue equally similar to two primaries joins the higher-ranked one. With one cue S_s is 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np

from ..engines.encoders import unit_rows
from ..results import Cue

N_PRIMARY = 3


@attrs.frozen(kw_only=True)
class ClueSet:
    primary: int  # index into Cluemap.cues
    members: tuple[int, ...]  # attached cue indices, most similar to the primary first


@attrs.frozen(kw_only=True)
class Cluemap:
    cues: tuple[Cue, ...]
    sets: tuple[ClueSet, ...]
    alpha: float = 0.5
    duplicates_merged: int = 0

    def render(self) -> str:
        """Figure 5's layout: numbered clue sets, primary cue first."""
        if not self.sets:
            return "(no clues were extracted)"
        lines = []
        for n, s in enumerate(self.sets, start=1):
            lines.append(f"{n}. Clue Set {n}:")
            lines.extend(f"- {self.cues[i].text}" for i in (s.primary, *s.members))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "duplicates_merged": self.duplicates_merged,
            "sets": [{"primary": s.primary, "members": list(s.members)} for s in self.sets],
            "text": self.render(),
        }


def dedupe(cues: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], int]:
    """Drop exact repeats (case- and whitespace-insensitive), keeping the first; return the count dropped."""
    seen: set[str] = set()
    kept = []
    for cue, desc in cues:
        key = " ".join(f"{cue} {desc}".lower().split())
        if key and key not in seen:
            seen.add(key)
            kept.append((cue, desc))
    return kept, len(cues) - len(kept)


def local_consistency(text_emb: np.ndarray, patch_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 2: per cue, the max cosine over patches, and which patch gave it."""
    sims = unit_rows(text_emb, np.float64) @ unit_rows(patch_emb, np.float64).T
    return sims.max(axis=1), sims.argmax(axis=1)


def semantic_coherence(sbert_emb: np.ndarray) -> np.ndarray:
    """Eq. 3: mean cosine to every other cue (0 when there is no other cue)."""
    n = len(sbert_emb)
    if n < 2:
        return np.zeros(n)
    sims = unit_rows(sbert_emb, np.float64) @ unit_rows(sbert_emb, np.float64).T
    return (sims.sum(axis=1) - np.diag(sims)) / (n - 1)


def build_cluemap(
    cues: Sequence[tuple[str, str]],
    clip_text_emb: np.ndarray,
    patch_emb: np.ndarray,
    sbert_emb: np.ndarray,
    *,
    alpha: float = 0.5,
    duplicates_merged: int = 0,
) -> Cluemap:
    """Score already-deduplicated ``(cue, description)`` pairs and group them into up to three sets."""
    n = len(cues)
    if n == 0:
        return Cluemap(cues=(), sets=(), alpha=alpha, duplicates_merged=duplicates_merged)
    s_l, best_patch = local_consistency(clip_text_emb, patch_emb)
    s_s = semantic_coherence(sbert_emb)
    s_r = alpha * s_l + (1 - alpha) * s_s
    scored = tuple(
        Cue(cue=c, description=d, s_l=float(s_l[i]), s_s=float(s_s[i]), s_r=float(s_r[i]), patch=int(best_patch[i]))
        for i, (c, d) in enumerate(cues)
    )
    order = sorted(range(n), key=lambda i: (-s_r[i], i))  # stable: ties keep the original order
    primaries = order[:N_PRIMARY]
    sims = unit_rows(sbert_emb, np.float64) @ unit_rows(sbert_emb, np.float64).T
    members: dict[int, list[tuple[float, int]]] = {p: [] for p in primaries}
    for i in order[N_PRIMARY:]:
        best = max(primaries, key=lambda p: (sims[i, p], -primaries.index(p)))
        members[best].append((float(sims[i, best]), i))
    sets = tuple(
        ClueSet(primary=p, members=tuple(i for _, i in sorted(members[p], key=lambda t: (-t[0], t[1]))))
        for p in primaries
    )
    return Cluemap(cues=scored, sets=sets, alpha=alpha, duplicates_merged=duplicates_merged)
