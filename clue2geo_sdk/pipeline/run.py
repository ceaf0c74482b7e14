"""One image through the pipeline (DESIGN §3), as named phases.

image -> GPSCLIP + retrieval -> 3 RAG prompts (VLM) -----------------------------+
      -> cues (VLM) -> cluemap (CLIP + SBERT) -> direct prompt (VLM) ------------+-> selection -> place

Each prompt is submitted as soon as what it needs exists, and the image's VLM session stays open
until the last answer is in, so the engine always has every prompt it could be working on. The
:class:`Parts` are what a :class:`~clue2geo_sdk.geolocator.Geolocator` loads once; they are read-only,
so any number of threads may run :func:`locate_image` on them at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

import attrs
import numpy as np

from ..engines.ask import ImageSession, PendingAnswer, VisionLanguageModel
from ..engines.encoders import ClipEncoder, GpsClipEncoder, SbertEncoder
from ..geo.countries import Countries
from ..geo.region import Region
from ..geo.reverse import ReverseGeocoder
from ..inputs.image import LoadedImage
from ..inputs.metadata.photo import PhotoMetadata, read_metadata
from ..options import Options
from ..results import Answer, Candidate, Prediction
from ..retrieval.search import GallerySearch
from . import stages
from .answers import rank_answers
from .cluemap import Cluemap
from .selection import Selection, choose, region_anchor, similarity, spread_km


@attrs.frozen(kw_only=True)
class Parts:
    """What a Geolocator loads once and every image's run reads: the VLM engine, the encoders, the
    gallery (``keys_in`` gives its keys inside a region), the geocoders, the prompts and the patch grid."""

    vlm: VisionLanguageModel
    clip: ClipEncoder
    gpsclip: GpsClipEncoder
    sbert: SbertEncoder
    gallery: GallerySearch
    geocoder: ReverseGeocoder
    countries: Countries
    prompts: Mapping[str, str]
    grid: tuple[int, int]
    bundle_name: str
    keys_in: Callable[[Region], np.ndarray]


class Timings:
    """Seconds per stage, each from the end of the one before (a record's ``timings``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 4)
        self._last = now

    def total(self) -> dict[str, float]:
        """Every lap, and ``total`` since the start."""
        self.seconds["total"] = round(time.perf_counter() - self._start, 4)
        return self.seconds


@attrs.define(kw_only=True)
class _Asked:
    """What the VLM phase leaves: the image's GPSCLIP embedding, its references, every proposal,
    the cluemap (None when skipped) and the raw generations by prompt."""

    image_emb: np.ndarray
    refs: stages.References
    proposals: list[stages.Proposal]
    cluemap: Cluemap | None
    cues_status: str
    raw: dict[str, Any]


def locate_image(parts: Parts, img: LoadedImage, opts: Options) -> Prediction:
    """Geolocate one loaded image with ``opts``."""
    timings = Timings()
    with parts.vlm.open(img, image_tokens=opts.image_tokens) as session:  # the engine starts encoding the image now
        asked = _ask_all(parts, session, img, opts, timings)
    chosen, answers = _select(parts, asked, opts)
    timings.lap("selection")
    where = _place(parts, chosen.candidates[chosen.best])
    timings.lap("reverse_geocode")
    meta = read_metadata(img)  # beside the prediction, never used by it (metadata can be forged)
    return _prediction(parts, img, opts, asked, chosen, answers, where, meta, timings.total())


def _ask_all(parts: Parts, session: ImageSession, img: LoadedImage, opts: Options, timings: Timings) -> _Asked:
    """Every prompt about the image, each submitted as soon as it can be: the cue prompt first, the
    RAG prompts once the references are retrieved (they run beside cue extraction), the direct prompt
    once the cluemap is built; then every answer collected, direct first."""
    pending_cues = None
    if opts.use_cluemap:
        pending_cues = stages.submit_cues(
            session, parts.prompts["cues"], max_tokens=opts.max_cue_tokens, constrain=opts.constrain
        )
    image_emb = parts.gpsclip.encode_images([img.image])[0]
    timings.lap("gpsclip_image")
    region = opts.region
    refs = stages.retrieve(
        parts.gallery,
        image_emb,
        opts.references if opts.use_refinement else (),
        allowed=parts.keys_in(region) if region else None,
    )
    timings.lap("retrieval")
    pending_rag = _submit_rag(parts, session, refs, opts)
    patch_emb = None
    if pending_cues is not None:  # the cluemap's image side, while the engine writes the cues
        patch_emb = stages.patch_embeddings(img, clip=parts.clip, grid=parts.grid)
        timings.lap("cluemap_image")
    raw: dict[str, Any] = {}
    cluemap, cues_status, direct = _cluemap_and_direct(
        parts, session, img, opts, (pending_cues, patch_emb), raw, timings
    )
    proposals = stages.finish_location("direct", direct, raw)
    timings.lap("direct")
    for source, pending in pending_rag.items():
        proposals += stages.finish_location(source, pending, raw)
    timings.lap("rag")
    return _Asked(
        image_emb=image_emb, refs=refs, proposals=proposals, cluemap=cluemap, cues_status=cues_status, raw=raw
    )


def _submit_location(session: ImageSession, prompt: str, opts: Options) -> list[PendingAnswer]:
    """A location prompt (told the region, if any), one answer per sample."""
    return stages.submit_location(
        session,
        stages.within_region(prompt, opts.region),
        samples=opts.samples_per_prompt,
        temperature=opts.sample_temperature,
        max_tokens=opts.max_answer_tokens,
        constrain=opts.constrain,
    )


def _submit_rag(
    parts: Parts, session: ImageSession, refs: stages.References, opts: Options
) -> dict[str, list[PendingAnswer]]:
    """The RAG prompts, by source ("rag5", ...). They need only the image and the references. A
    region holding no gallery point leaves none to show, so they are not asked."""
    if not (opts.use_refinement and refs.similar):
        return {}
    return {
        f"rag{k}": _submit_location(session, stages.rag_prompt(parts.prompts["rag"], refs, k), opts)
        for k in opts.references
    }


def _cluemap_and_direct(
    parts: Parts,
    session: ImageSession,
    img: LoadedImage,
    opts: Options,
    cues_and_patches: tuple[PendingAnswer | None, np.ndarray | None],
    raw: dict[str, Any],
    timings: Timings,
) -> tuple[Cluemap | None, str, list[PendingAnswer]]:
    """The cues' answer, the cluemap built from it (and the patch embeddings already computed) and
    the direct prompt shown it; without the cluemap (``use_cluemap=False``) the direct prompt that
    needs none. Returns the cluemap, the cue status and the direct prompt's pending answers."""
    pending_cues, patch_emb = cues_and_patches
    if pending_cues is None:
        return None, "skipped", _submit_location(session, parts.prompts["locate_no_cluemap"], opts)
    cues = stages.finish_cues(pending_cues)
    raw["cues"] = [stages.generation_dict(g) for g in cues.generations]
    timings.lap("cues")
    cluemap = stages.make_cluemap(
        img, cues.items, clip=parts.clip, sbert=parts.sbert, grid=parts.grid, alpha=opts.alpha, patch_emb=patch_emb
    )
    timings.lap("cluemap")
    direct = _submit_location(session, parts.prompts["locate"].format(cluemap=cluemap.render()), opts)
    return cluemap, cues.status, direct


def _select(parts: Parts, asked: _Asked, opts: Options) -> tuple[Selection, tuple[Answer, ...]]:
    """G3's selection over the proposals (and the nearest gallery point, or the region's anchor when
    the gallery has none in the region), then the distinct answers ranked with their confidences."""
    region = opts.region
    nearest = asked.refs.similar[0] if asked.refs.similar else region_anchor(region)  # type: ignore[arg-type]
    chosen = choose(
        asked.proposals,
        asked.image_emb,
        parts.gpsclip,
        nearest,
        add_nearest=opts.nearest_neighbour_candidate,
        region=region,
    )
    # Gallery hits are GPSCLIP image-location cosines, on the candidates' scale; a photo gallery's
    # image-image cosines are not, so they stay out of the softmax.
    weighed = asked.refs.similar if parts.gallery.kind == "coordinates" else ()
    answers = rank_answers(chosen.candidates, references=weighed)
    # A softmax over one point says nothing: a lone candidate with no references has no confidence.
    if len(chosen.candidates) + len(weighed) <= 1:
        answers = tuple(attrs.evolve(a, confidence=None) for a in answers)
    return chosen, answers


class Where(TypedDict):
    """Where the winner is (Prediction's field names)."""

    country: str | None
    country_code: str | None
    admin1: str | None
    city: str | None


def _place(parts: Parts, win: Candidate) -> Where:
    """The winner's country by its real borders; its city and admin1 from the nearest GeoNames place
    inside that country (none rather than a foreign one)."""
    code = parts.countries.code_at(win.lat, win.lon)
    found = parts.geocoder.lookup(win.lat, win.lon, country_code=code)
    same_country = code is not None and found.country_code == code
    return Where(
        country=(found.country if same_country else parts.countries.get(code).name) if code else None,
        country_code=code,
        admin1=(found.admin1 or None) if same_country else None,
        city=(found.city or None) if same_country else None,
    )


def _prediction(
    parts: Parts,
    img: LoadedImage,
    opts: Options,
    asked: _Asked,
    chosen: Selection,
    answers: tuple[Answer, ...],
    where: Where,
    meta: PhotoMetadata,
    timings: dict[str, float],
) -> Prediction:
    """The record of one located image: the winner and where it is, how it was chosen, and what
    made it (cues, cluemap, raw outputs, references, options, bundle, timings)."""
    win = chosen.candidates[chosen.best]
    others = [(c.lat, c.lon) for i, c in enumerate(chosen.candidates) if i != chosen.best]
    region, cluemap, refs = opts.region, asked.cluemap, asked.refs
    return Prediction(
        lat=win.lat,
        lon=win.lon,
        **where,
        landmark=win.landmark,
        model_country=win.country,
        model_city=win.city,
        confidence=answers[0].confidence,
        similarity=similarity(win.score),
        spread_km=spread_km(win.lat, win.lon, others),
        source=win.source,
        fallback=chosen.fallback,
        candidates=chosen.candidates,
        invalid_candidates=chosen.invalid,
        cues=cluemap.cues if cluemap else (),
        cluemap=cluemap.to_dict() if cluemap else None,
        raw_outputs=asked.raw,
        timings=timings,
        image_sha256=img.sha256,
        image=img.source,
        bundle=parts.bundle_name,
        options=opts.to_dict(),
        cues_status=asked.cues_status,
        metadata=meta.to_dict(),
        metadata_distance_km=meta.distance_km(win.lat, win.lon),
        region=region.to_dict() if region else None,
        outside_region=chosen.outside_region,
        answers=answers,
        references={
            "gallery": parts.gallery.kind,
            "gallery_digest": parts.gallery.digest,
            "similar": [h.to_dict() for h in refs.similar],
            "dissimilar": [h.to_dict() for h in refs.dissimilar],
        },
    )
