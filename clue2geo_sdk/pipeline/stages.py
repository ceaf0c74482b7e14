"""The pipeline's stages as functions with typed inputs and outputs (paper §3, G3 for refinement).

cues -> cluemap -> prompts -> proposals (then :mod:`.selection`). Prompt stages only *submit* (they
return :class:`~clue2geo_sdk.engines.ask.PendingAnswer`s), so :mod:`.run` can schedule them by
dependency: the RAG prompts need only the image and the retrieved references and run beside cue
extraction; the direct prompt starts as soon as the cluemap exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs
import numpy as np

from ..engines.ask import CUES_SCHEMA, LOCATION_SCHEMA, Constrain, Generation, ImageSession, PendingAnswer, ask
from ..engines.encoders import ClipEncoder, SbertEncoder, patch_grid
from ..geo.region import Region
from ..inputs.image import LoadedImage
from ..retrieval.search import GalleryHit, GallerySearch
from .cluemap import Cluemap, build_cluemap, dedupe
from .parsing import LocationAnswer, parse_cues, parse_location, salvage_cues

CuesStatus = Literal["ok", "reasked", "truncated", "failed", "skipped", "given"]


@attrs.frozen(kw_only=True)
class Cues:
    """The cue list of one image and how it was obtained (``status``), with the raw generations."""

    items: tuple[tuple[str, str], ...]
    status: CuesStatus
    generations: tuple[Generation, ...] = ()


@attrs.frozen(kw_only=True)
class Proposal:
    """One location answer: which prompt (``source``) and sample produced it."""

    source: str
    sample: int
    answer: LocationAnswer


@attrs.frozen(kw_only=True)
class References:
    """Gallery coordinates most and least similar to the image (GPSCLIP), for the RAG prompts."""

    similar: tuple[GalleryHit, ...]
    dissimilar: tuple[GalleryHit, ...]


def submit_cues(session: ImageSession, prompt: str, *, max_tokens: int, constrain: Constrain) -> PendingAnswer:
    return ask(session, prompt, parse_cues, schema=CUES_SCHEMA, max_tokens=max_tokens, constrain=constrain)


def finish_cues(pending: PendingAnswer) -> Cues:
    """Parse the cue answer. An answer cut off at the token budget keeps its complete cues
    ("truncated"); one that still does not parse is "failed" — said, never silently empty."""
    value, gens = pending.result()
    if value:
        status: CuesStatus = "reasked" if len(gens) > 1 else "ok"
        return Cues(items=tuple(value), status=status, generations=tuple(gens))
    salvaged = salvage_cues(gens[-1].text) if gens[-1].truncated else []
    status = "truncated" if salvaged else "failed"
    return Cues(items=tuple(salvaged), status=status, generations=tuple(gens))


def make_cluemap(
    img: LoadedImage,
    cues: Sequence[tuple[str, str]],
    *,
    clip: ClipEncoder,
    sbert: SbertEncoder,
    grid: tuple[int, int],
    alpha: float,
    patch_emb: np.ndarray | None = None,
) -> Cluemap:
    """Eqs. 2–4: rank cues by CLIP patch similarity and SBERT centrality, group them around the top three.
    ``patch_emb``: the image's :func:`patch_embeddings` when already computed."""
    items, merged = dedupe(list(cues))
    texts = [f"{c}: {d}" if d else c for c, d in items]
    if not items:
        patch_emb = np.zeros((0, 1))
    elif patch_emb is None:
        patch_emb = patch_embeddings(img, clip=clip, grid=grid)
    return build_cluemap(
        items, clip.encode_texts(texts), patch_emb, sbert.encode(texts), alpha=alpha, duplicates_merged=merged
    )


def patch_embeddings(img: LoadedImage, *, clip: ClipEncoder, grid: tuple[int, int]) -> np.ndarray:
    """CLIP embeddings of the image's patch grid: the cluemap's image side. It needs no cue, so the
    pipeline computes it while the cues are being written, off the path from cues to direct prompt."""
    return clip.encode_images([crop for crop, _ in patch_grid(img.image, *grid)])


def retrieve(
    gallery: GallerySearch, image_emb: np.ndarray, ks: Sequence[int], allowed: np.ndarray | None = None
) -> References:
    """``allowed`` (sorted gallery keys) restricts both searches, e.g. to a region; it may be empty."""
    n = max(ks, default=1)
    if allowed is not None and not len(allowed):
        return References(similar=(), dissimilar=())
    return References(
        similar=tuple(gallery.most_similar(image_emb, n, allowed=allowed)),
        dissimilar=tuple(gallery.least_similar(image_emb, n, allowed=allowed)) if ks else (),
    )


def within_region(prompt: str, region: Region | None) -> str:
    """Tell the model what the analyst knows: one sentence before the output-format line."""
    if region is None:
        return prompt
    sentence = f"The photo is known to have been taken {region.describe()}; answer with a location there.\n"
    head, sep, tail = prompt.rpartition("Output only JSON")
    return head + sentence + sep + tail if sep else prompt.rstrip("\n") + "\n" + sentence


def format_references(points: Sequence[tuple[float, float]]) -> str:
    """Reference coordinates for the RAG prompt: '[(48.8584, 2.2945), ...]'."""
    return "[" + ", ".join(f"({lat:.4f}, {lon:.4f})" for lat, lon in points) + "]"


def rag_prompt(template: str, refs: References, k: int) -> str:
    return template.format(
        similar=format_references([(h.lat, h.lon) for h in refs.similar[:k]]),
        dissimilar=format_references([(h.lat, h.lon) for h in refs.dissimilar[:k]]),
    )


def submit_location(
    session: ImageSession,
    prompt: str,
    *,
    samples: int,
    temperature: float,
    max_tokens: int,
    constrain: Constrain,
) -> list[PendingAnswer]:
    """One answer per sample; with several, each is drawn at ``temperature`` with its own seed
    (extra sequences on the same image prefix)."""
    several = samples > 1
    return [
        ask(
            session,
            prompt,
            parse_location,
            schema=LOCATION_SCHEMA,
            max_tokens=max_tokens,
            constrain=constrain,
            seed=1000 + s if several else None,
            temperature=temperature if several else None,
        )
        for s in range(samples)
    ]


def finish_location(source: str, pending: Sequence[PendingAnswer], raw: dict[str, Any]) -> list[Proposal]:
    out = []
    for s, p in enumerate(pending):
        answer, gens = p.result()
        raw.setdefault(source, []).extend(generation_dict(g) for g in gens)
        out.append(Proposal(source=source, sample=s, answer=answer))
    return out


def generation_dict(g: Generation) -> Mapping[str, Any]:
    return {
        "text": g.text,
        "constrained": g.constrained,
        "tokens": g.tokens,
        "truncated": g.truncated,
        "seconds": round(g.seconds, 4),
    }
