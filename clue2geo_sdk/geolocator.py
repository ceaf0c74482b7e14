"""``Geolocator``: the Clue2Geo pipeline over one bundle (DESIGN §3).

image -> cues (VLM) -> cluemap (CLIP + SBERT) -> direct prediction (VLM)
      -> retrieval (GPSCLIP + USearch) -> 3 RAG predictions (VLM) -> selection (GPSCLIP) -> result

Thread-safety: one ``Geolocator`` may be shared by threads. Encoders and the gallery are
read-only; VLM calls are serialized by a lock inside the VLM, so threads add no VLM throughput.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np

from .bundle import Bundle
from .cluemap import Cluemap, build_cluemap, dedupe
from .encoders import ClipEncoder, Device, GpsClipEncoder, SbertEncoder, patch_grid, providers_for
from .geocode import ReverseGeocoder
from .image import ImageInput, LoadedImage, load_image
from .parsing import LocationAnswer, parse_cues, parse_location
from .prompts import resolve
from .results import Candidate, Prediction
from .retrieval import Gallery
from .sanitize import clean_text
from .selection import confidence, format_references, select, spread_km
from .vlm import CUES_SCHEMA, LOCATION_SCHEMA, Constrain, Generation, LlamaCppVLM, VisionLanguageModel, ask_parsed


@attrs.frozen(kw_only=True)
class Options:
    """Pipeline switches. ``use_cluemap=False`` / ``use_refinement=False`` are the paper's w/o CM / w/o CR."""

    use_cluemap: bool = True
    use_refinement: bool = True
    references: tuple[int, ...] = attrs.field(default=(5, 10, 15), converter=tuple)
    samples_per_prompt: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    sample_temperature: float = 0.7
    nearest_neighbour_candidate: bool = False
    constrain: Literal["fallback", "always", "never"] = attrs.field(
        default="fallback", validator=attrs.validators.in_(("fallback", "always", "never"))
    )
    alpha: float = attrs.field(default=0.5, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])
    max_cue_tokens: int = 512
    max_answer_tokens: int = 128

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Options:
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["references"] = list(self.references)
        return d

    def digest(self) -> str:
        """sha256 of the options as canonical JSON: records made under other options are not reused."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@attrs.frozen(kw_only=True)
class Failure:
    """An input that could not be geolocated; batches record it and go on."""

    image: str
    error: str
    message: str
    image_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "error": self.error, "message": self.message, "image_sha256": self.image_sha256}


class Geolocator:
    """Load once, then ``locate`` images. Use as a context manager or call ``close()``."""

    def __init__(self, bundle: Bundle, vlm: VisionLanguageModel, *, device: Device = "auto", options: Options) -> None:
        self.bundle = bundle
        self.options = options
        self.vlm = vlm
        providers = providers_for(device)
        files = {role: {k: bundle.file(role, k) for k in bundle.component(role).files} for role in bundle.components}
        self.clip = ClipEncoder(files["clip"], bundle.params("clip"), providers)
        self.gpsclip = GpsClipEncoder(files["gpsclip"], bundle.params("gpsclip"), providers)
        self.sbert = SbertEncoder(files["sbert"], bundle.params("sbert"), providers)
        gparams = bundle.params("gallery")
        self.gallery = Gallery(
            files["gallery"]["index"],
            files["metadata"]["db"],
            dim=int(gparams["dim"]),
            encoder_sha256=str(gparams["encoder_sha256"]),
            location_sha256=bundle.component("gpsclip").files["location"].sha256,
        )
        self.geocoder = ReverseGeocoder(files["metadata"]["db"])
        self.prompts = resolve(bundle.params("vlm").get("prompts"))
        grid = bundle.params("clip").get("patch_grid", [3, 3])
        self.grid = (int(grid[0]), int(grid[1]))

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: Device = "auto",
        verify: bool = True,
        n_gpu_layers: int | None = None,
        n_threads: int | None = None,
        verbose: bool = False,
        **options: Any,
    ) -> Geolocator:
        """Open a bundle and every model in it. ``options`` are :class:`Options` fields."""
        opts = Options.from_kwargs(**options)
        bundle = Bundle.open(path, verify=verify)
        p = bundle.params("vlm")
        if n_gpu_layers is None:
            n_gpu_layers = 0 if device == "cpu" else -1
        vlm = LlamaCppVLM(
            bundle.file("vlm", "model"),
            bundle.file("vlm", "mmproj"),
            n_ctx=int(p.get("n_ctx", 4096)),
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
            image_max_tokens=p.get("image_max_tokens"),
            temperature=float(p.get("generation", {}).get("temperature", 0.0)),
            verbose=verbose,
        )
        return cls(bundle, vlm, device=device, options=opts)

    def __enter__(self) -> Geolocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.vlm.close()

    # -- stages ---------------------------------------------------------------------------------

    def cluemap(
        self, image: ImageInput, cues: list[tuple[str, str]] | None = None
    ) -> tuple[Cluemap, list[dict[str, Any]]]:
        """The cluemap of one image, from the VLM's cues or from ``cues`` given as (cue, description);
        also the raw VLM outputs. The training-data builder uses this, so both share one implementation."""
        img = load_image(image)
        raw: dict[str, Any] = {"cues": []}
        return self._cues(self.vlm.open(img), img, raw, given=cues, opts=self.options), raw["cues"]

    def ask(self, image: ImageInput, prompt: str) -> str:
        """One free-form answer about an image (e.g. a teacher's reasoning chain)."""
        img = load_image(image)
        return self.vlm.open(img).ask(prompt, schema=None, max_tokens=self.options.max_answer_tokens).text

    def _cues(
        self,
        session: Any,
        img: LoadedImage,
        raw: dict[str, Any],
        given: list[tuple[str, str]] | None = None,
        *,
        opts: Options,
    ) -> Cluemap:
        if given is None:
            given, gens = ask_parsed(
                session,
                self.prompts["cues"],
                parse_cues,
                schema=CUES_SCHEMA,
                max_tokens=opts.max_cue_tokens,
                constrain=opts.constrain,
            )
            raw["cues"] = [_gen_dict(g) for g in gens]
        cues, merged = dedupe(given or [])
        texts = [f"{c}: {d}" if d else c for c, d in cues]
        patches = [crop for crop, _ in patch_grid(img.image, *self.grid)]
        patch_emb = self.clip.encode_images(patches) if cues else np.zeros((0, 1))
        return build_cluemap(
            cues,
            self.clip.encode_texts(texts),
            patch_emb,
            self.sbert.encode(texts),
            alpha=opts.alpha,
            duplicates_merged=merged,
        )

    def _ask_location(
        self, session: Any, prompt: str, source: str, raw: dict[str, Any], opts: Options
    ) -> list[tuple[int, LocationAnswer]]:
        answers = []
        for s in range(opts.samples_per_prompt):
            several = opts.samples_per_prompt > 1
            answer, gens = ask_parsed(
                session,
                prompt,
                parse_location,
                schema=LOCATION_SCHEMA,
                max_tokens=opts.max_answer_tokens,
                constrain=opts.constrain,
                seed=1000 + s if several else None,
                temperature=opts.sample_temperature if several else None,
            )
            raw.setdefault(source, []).extend(_gen_dict(g) for g in gens)
            answers.append((s, answer))
        return answers

    # -- the pipeline -----------------------------------------------------------------------------

    def locate(self, image: ImageInput, *, name: str | None = None, options: Options | None = None) -> Prediction:
        """Geolocate one image (path, bytes, PIL image or HxWx3 uint8 array); ``options`` override the
        loaded defaults for this call only (shared state is never changed, so threads may differ)."""
        opts = options or self.options
        timings: dict[str, float] = {}
        raw: dict[str, Any] = {}
        t = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[stage] = round(now - t, 4)
            t = now

        img = load_image(image, name=name)
        lap("load")
        image_emb = self.gpsclip.encode_images([img.image])[0]
        lap("gpsclip_image")
        session = self.vlm.open(img)
        cluemap: Cluemap | None = None
        if opts.use_cluemap:
            cluemap = self._cues(session, img, raw, opts=opts)
            lap("cues_and_cluemap")
            prompt = self.prompts["locate"].format(cluemap=cluemap.render())
        else:
            prompt = self.prompts["locate_no_cluemap"]
        proposals: list[tuple[str, int, LocationAnswer]] = [
            ("direct", s, a) for s, a in self._ask_location(session, prompt, "direct", raw, opts)
        ]
        lap("direct")
        similar = self.gallery.most_similar(image_emb, max(opts.references, default=1))
        if opts.use_refinement:
            dissimilar = self.gallery.least_similar(image_emb, max(opts.references))
            lap("retrieval")
            for k in opts.references:
                rag_prompt = self.prompts["rag"].format(
                    similar=format_references([(h.lat, h.lon) for h in similar[:k]]),
                    dissimilar=format_references([(h.lat, h.lon) for h in dissimilar[:k]]),
                )
                proposals += [(f"rag{k}", s, a) for s, a in self._ask_location(session, rag_prompt, f"rag{k}", raw, opts)]
            lap("rag")
        valid = [(src, s, a) for src, s, a in proposals if a.valid]
        invalid = len(proposals) - len(valid)
        points = [(a.lat, a.lon) for _, _, a in valid]
        nearest = similar[0]
        use_nearest = opts.nearest_neighbour_candidate or not valid
        if use_nearest:
            points.append((nearest.lat, nearest.lon))
        best, scores = select(image_emb, self.gpsclip.encode_locations(np.asarray(points, dtype=np.float32)))
        candidates = [
            Candidate(
                source=src,
                lat=a.lat,
                lon=a.lon,
                score=float(scores[i]),
                country=a.country,
                city=a.city,
                landmark=a.landmark,
                sample=s,
            )
            for i, (src, s, a) in enumerate(valid)
        ]
        if use_nearest:
            candidates.append(
                Candidate(
                    source="gallery_nearest",
                    lat=nearest.lat,
                    lon=nearest.lon,
                    score=float(scores[-1]),
                    country=nearest.country or None,
                    city=nearest.city or None,
                )
            )
        win = candidates[best]
        lap("selection")
        place = self.geocoder.lookup(win.lat, win.lon)
        lap("reverse_geocode")
        timings["total"] = round(sum(timings.values()), 4)
        return Prediction(
            lat=win.lat,
            lon=win.lon,
            country=place.country or None,
            country_code=place.country_code or None,
            admin1=place.admin1 or None,
            city=place.city or None,
            landmark=clean_text(win.landmark),
            model_country=clean_text(win.country),
            model_city=clean_text(win.city),
            confidence=confidence(win.score),
            spread_km=spread_km(win.lat, win.lon, [(c.lat, c.lon) for i, c in enumerate(candidates) if i != best]),
            source=win.source,
            fallback=not valid,
            candidates=tuple(candidates),
            invalid_candidates=invalid,
            cues=cluemap.cues if cluemap else (),
            cluemap=cluemap.to_dict() if cluemap else None,
            raw_outputs=raw,
            timings=timings,
            image_sha256=img.sha256,
            image=img.source,
            bundle=self.bundle.name,
            options=opts.to_dict(),
        )

    def locate_many(
        self, images: Iterable[ImageInput], *, stream: bool = True, options: Options | None = None
    ) -> Iterator[Prediction | Failure] | list[Prediction | Failure]:
        """Geolocate many inputs; a bad input yields a :class:`Failure`, never an exception."""
        gen = (self.try_locate(img, options=options) for img in images)
        return gen if stream else list(gen)

    def try_locate(
        self, image: ImageInput, *, name: str | None = None, options: Options | None = None
    ) -> Prediction | Failure:
        """``locate``, but any error becomes a :class:`Failure` (what batches record)."""
        name = name or (str(image) if isinstance(image, str | Path) else f"<{type(image).__name__}>")
        try:
            return self.locate(image, name=name, options=options)
        except Exception as exc:  # one bad input must not end a batch
            return Failure(image=name, error=type(exc).__name__, message=str(exc) or repr(exc))


def _gen_dict(g: Generation) -> dict[str, Any]:
    return {"text": g.text, "constrained": g.constrained, "tokens": g.tokens, "seconds": round(g.seconds, 4)}




__all__ = ["Constrain", "Failure", "Geolocator", "Options"]
