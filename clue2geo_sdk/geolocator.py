"""``Geolocator``: the Clue2Geo pipeline over one bundle (DESIGN §3).

image -> GPSCLIP + retrieval (USearch) -> 3 RAG prompts (VLM) ----------------+
      -> cues (VLM) -> cluemap (CLIP + SBERT) -> direct prompt (VLM) ----------+-> selection -> result

The stages live in :mod:`clue2geo_sdk.stages`; ``Geolocator`` schedules them by dependency so the
VLM engine always has every prompt it could be working on. Thread-safety: one ``Geolocator`` may
be shared by threads; encoders and the gallery are read-only, and the batched engine decodes the
prompts of every thread's images together.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import numpy as np

from . import stages
from .answers import rank_answers
from .bundle import Bundle
from .cluemap import Cluemap
from .countries import countries
from .encoders import ClipEncoder, Device, GpsClipEncoder, SbertEncoder, providers_for
from .engines import EngineName, make_engine
from .engines import base as engines_base
from .errors import Clue2GeoError
from .geocode import ReverseGeocoder
from .image import ImageInput, LoadedImage, load_image
from .image_tokens import IMAGE_MAX_TOKENS
from .metadata import read_metadata
from .prompts import resolve
from .region import Region
from .results import Prediction
from .retrieval import Gallery
from .selection import similarity, spread_km
from .vlm import Constrain, PendingAnswer, VisionLanguageModel

REGION_CACHE = 32
T = TypeVar("T")
R = TypeVar("R")


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
        default="always", validator=attrs.validators.in_(("fallback", "always", "never"))
    )
    alpha: float = attrs.field(default=0.5, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)])
    max_cue_tokens: int = 512
    max_answer_tokens: int = 128
    # Where the photo is known to be: "FR,DE", "bbox:W,S,E,N", "circle:LAT,LON,KM", "geojson:PATH",
    # codes or a Region.
    region: Region | None = attrs.field(default=None, converter=lambda v: None if v in (None, "") else Region.parse(v))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Options:
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=False)
        d["references"] = list(self.references)
        d["region"] = self.region.to_dict() if self.region else None
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
    """Load once, then ``locate`` images. Use as a context manager or call ``close()``.

    Thread-safe: any number of threads may call ``locate`` at once; their prompts share the
    engine's batches. ``close()`` refuses new calls and waits for running ones to finish.
    """

    def __init__(
        self,
        bundle: Bundle,
        vlm: VisionLanguageModel,
        *,
        device: Device = "auto",
        options: Options,
        max_in_flight: int = 1,
        gallery: str | Path | None = None,
    ) -> None:
        self.bundle = bundle
        self.options = options
        self.vlm = vlm
        self.max_in_flight = max(1, int(max_in_flight))
        providers = providers_for(device)
        files = {role: {k: bundle.file(role, k) for k in bundle.component(role).files} for role in bundle.components}
        self.clip = ClipEncoder(files["clip"], bundle.params("clip"), providers)
        self.gpsclip = GpsClipEncoder(files["gpsclip"], bundle.params("gpsclip"), providers)
        self.sbert = SbertEncoder(files["sbert"], bundle.params("sbert"), providers)
        from .reference_gallery import PhotoGallery

        self.gallery: Gallery | PhotoGallery
        if gallery is None:
            gparams = bundle.params("gallery")
            self.gallery = Gallery(
                files["gallery"]["index"],
                files["metadata"]["db"],
                dim=int(gparams["dim"]),
                encoder_sha256=str(gparams["encoder_sha256"]),
                location_sha256=bundle.component("gpsclip").files["location"].sha256,
                digest=bundle.component("gallery").files["index"].sha256,
            )
        else:  # the analyst's reference photos: image -> image retrieval
            self.gallery = PhotoGallery(gallery, image_sha256=bundle.component("gpsclip").files["image"].sha256)
        self.geocoder = ReverseGeocoder(files["metadata"]["db"])
        self.countries = countries()
        self._region_keys: dict[Region, Any] = {}
        self._region_lock = threading.Lock()
        self.prompts = resolve(bundle.params("vlm").get("prompts"))
        grid = bundle.params("clip").get("patch_grid", [3, 3])
        self.grid = (int(grid[0]), int(grid[1]))
        self._calls = threading.Condition()
        self._running = 0
        self._closing = False

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: Device = "auto",
        verify: bool = True,
        engine: EngineName = "batched",
        max_in_flight: int = 4,
        n_gpu_layers: int | None = None,
        n_threads: int | None = None,
        verbose: bool = False,
        trusted_keys: Iterable[Any] | None = None,
        gallery: str | Path | None = None,
        **options: Any,
    ) -> Geolocator:
        """Open a bundle and every model in it. ``engine`` picks the VLM engine ("batched", the
        default, or the "chat" baseline); ``max_in_flight`` is how many images ``locate_many`` and
        concurrent callers keep in the engine at once (each reserves ``n_ctx`` KV cells).
        ``options`` are :class:`Options` fields. ``trusted_keys`` (Ed25519 public keys or key files)
        refuses a bundle that none of them signed (:meth:`Bundle.open`). ``gallery`` (a folder made
        by ``clue2geo gallery build``) takes the similar/dissimilar references from the analyst's
        own geotagged photos instead of the bundle's coordinate gallery; it must have been built
        with this bundle's GPSCLIP image tower."""
        opts = Options.from_kwargs(**options)
        bundle = Bundle.open(path, verify=verify, trusted_keys=trusted_keys)
        p = bundle.params("vlm")
        if n_gpu_layers is None:
            n_gpu_layers = 0 if device == "cpu" else -1
        if device == "cpu" or n_gpu_layers == 0:
            _check_memory(bundle)
        vlm = make_engine(
            engine,
            bundle.file("vlm", "model"),
            bundle.file("vlm", "mmproj"),
            max_images=max_in_flight,
            ctx_per_image=int(p.get("n_ctx", 4096)),
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
            image_max_tokens=int(p.get("image_max_tokens") or IMAGE_MAX_TOKENS),
            temperature=float(p.get("generation", {}).get("temperature", 0.0)),
            verbose=verbose,
        )
        try:
            return cls(bundle, vlm, device=device, options=opts, max_in_flight=max_in_flight, gallery=gallery)
        except BaseException:  # e.g. a refused gallery: the engine's thread and memory go with it
            vlm.close()
            raise

    def __enter__(self) -> Geolocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Refuse new calls, wait for the running ones, then free the models."""
        with self._calls:
            if self._closing:
                return
            self._closing = True
            self._calls.wait_for(lambda: self._running == 0)
        self.vlm.close()

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        with self._calls:
            if self._closing:
                raise Clue2GeoError("this Geolocator is closed")
            self._running += 1
        try:
            yield
        finally:
            with self._calls:
                self._running -= 1
                self._calls.notify_all()

    # -- single stages, for the training-data builder and teachers ------------------------------

    def cluemap(
        self, image: ImageInput, cues: list[tuple[str, str]] | None = None
    ) -> tuple[Cluemap, list[dict[str, Any]]]:
        """The cluemap of one image, from the VLM's cues or from ``cues`` given as (cue, description);
        also the raw VLM outputs. The training-data builder uses this, so both share one implementation."""
        img = load_image(image)
        opts = self.options
        raw: list[dict[str, Any]] = []
        with self._call():
            if cues is None:
                with self.vlm.open(img) as session:
                    found = stages.finish_cues(
                        stages.submit_cues(
                            session, self.prompts["cues"], max_tokens=opts.max_cue_tokens, constrain=opts.constrain
                        )
                    )
                cues = list(found.items)
                raw = [dict(stages.generation_dict(g)) for g in found.generations]
            cmap = stages.make_cluemap(img, cues, clip=self.clip, sbert=self.sbert, grid=self.grid, alpha=opts.alpha)
        return cmap, raw

    def ask(self, image: ImageInput, prompt: str, *, max_tokens: int | None = None) -> str:
        """One free-form answer about an image (e.g. a teacher's reasoning chain)."""
        img = load_image(image)
        with self._call(), self.vlm.open(img) as session:
            return session.ask(prompt, schema=None, max_tokens=max_tokens or self.options.max_answer_tokens).text

    # -- the pipeline -----------------------------------------------------------------------------

    def locate(self, image: ImageInput, *, name: str | None = None, options: Options | None = None) -> Prediction:
        """Geolocate one image (path, bytes, PIL image or HxWx3 uint8 array); ``options`` override the
        loaded defaults for this call only (shared state is never changed, so threads may differ)."""
        opts = options or self.options
        with self._call():
            return self._locate(load_image(image, name=name), opts)

    def _locate(self, img: LoadedImage, opts: Options) -> Prediction:
        timings: dict[str, float] = {}
        raw: dict[str, Any] = {}
        t0 = t = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal t
            now = time.perf_counter()
            timings[stage] = round(now - t, 4)
            t = now

        with self.vlm.open(img) as session:  # the engine starts encoding the image now
            pending_cues = None
            if opts.use_cluemap:
                pending_cues = stages.submit_cues(
                    session, self.prompts["cues"], max_tokens=opts.max_cue_tokens, constrain=opts.constrain
                )
            image_emb = self.gpsclip.encode_images([img.image])[0]
            lap("gpsclip_image")
            region = opts.region
            refs = stages.retrieve(
                self.gallery,
                image_emb,
                opts.references if opts.use_refinement else (),
                allowed=self._keys_in(region) if region else None,
            )
            lap("retrieval")

            def locate_prompt(prompt: str) -> list[PendingAnswer]:
                return stages.submit_location(
                    session,
                    stages.within_region(prompt, region),
                    samples=opts.samples_per_prompt,
                    temperature=opts.sample_temperature,
                    max_tokens=opts.max_answer_tokens,
                    constrain=opts.constrain,
                )

            # The RAG prompts need only the image and the references: they run beside cue extraction.
            # A region holding no gallery point leaves none to show, so they are not asked.
            pending_rag = (
                {f"rag{k}": locate_prompt(stages.rag_prompt(self.prompts["rag"], refs, k)) for k in opts.references}
                if opts.use_refinement and refs.similar
                else {}
            )
            cluemap: Cluemap | None = None
            if pending_cues is not None:
                cues = stages.finish_cues(pending_cues)
                raw["cues"] = [stages.generation_dict(g) for g in cues.generations]
                cues_status = cues.status
                lap("cues")
                cluemap = stages.make_cluemap(
                    img, cues.items, clip=self.clip, sbert=self.sbert, grid=self.grid, alpha=opts.alpha
                )
                lap("cluemap")
                direct = locate_prompt(self.prompts["locate"].format(cluemap=cluemap.render()))
            else:
                cues_status = "skipped"
                direct = locate_prompt(self.prompts["locate_no_cluemap"])
            proposals = stages.finish_location("direct", direct, raw)
            lap("direct")
            for source, pending in pending_rag.items():
                proposals += stages.finish_location(source, pending, raw)
            lap("rag")
        nearest = refs.similar[0] if refs.similar else stages.region_anchor(region)  # type: ignore[arg-type]
        chosen = stages.choose(
            proposals,
            image_emb,
            self.gpsclip,
            nearest,
            add_nearest=opts.nearest_neighbour_candidate,
            region=region,
        )
        win = chosen.candidates[chosen.best]
        # Gallery hits are GPSCLIP image-location cosines, on the candidates' scale; a photo gallery's
        # image-image cosines are not, so they stay out of the softmax.
        weighed = refs.similar if self.gallery.kind == "coordinates" else ()
        answers = rank_answers(chosen.candidates, references=weighed)
        # A softmax over one point says nothing: a lone candidate with no references has no confidence.
        if len(chosen.candidates) + len(weighed) <= 1:
            answers = tuple(attrs.evolve(a, confidence=None) for a in answers)
        lap("selection")
        # The country by its real borders; the city and admin1 from the nearest GeoNames place inside it.
        code = self.countries.code_at(win.lat, win.lon)
        place = self.geocoder.lookup(win.lat, win.lon, country_code=code)
        same_country = code is not None and place.country_code == code  # else no city rather than a foreign one
        lap("reverse_geocode")
        meta = read_metadata(img)  # beside the prediction, never used by it (metadata can be forged)
        timings["total"] = round(time.perf_counter() - t0, 4)
        others = [(c.lat, c.lon) for i, c in enumerate(chosen.candidates) if i != chosen.best]
        return Prediction(
            lat=win.lat,
            lon=win.lon,
            country=(place.country if same_country else self.countries.get(code).name) if code else None,
            country_code=code,
            admin1=(place.admin1 or None) if same_country else None,
            city=(place.city or None) if same_country else None,
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
            raw_outputs=raw,
            timings=timings,
            image_sha256=img.sha256,
            image=img.source,
            bundle=self.bundle.name,
            options=opts.to_dict(),
            cues_status=cues_status,
            metadata=meta.to_dict(),
            metadata_distance_km=meta.distance_km(win.lat, win.lon),
            region=region.to_dict() if region else None,
            outside_region=chosen.outside_region,
            answers=answers,
            references={
                "gallery": self.gallery.kind,
                "gallery_digest": self.gallery.digest,
                "similar": [h.to_dict() for h in refs.similar],
                "dissimilar": [h.to_dict() for h in refs.dissimilar],
            },
        )

    def _keys_in(self, region: Region) -> Any:
        """Gallery keys inside ``region`` (sorted), kept for the last ``REGION_CACHE`` regions used."""
        with self._region_lock:
            keys = self._region_keys.pop(region, None)
        if keys is None:  # computed unlocked: other threads' regions need not wait for this one
            keys = np.flatnonzero(region.contains(self.gallery.lat, self.gallery.lon))
        with self._region_lock:
            self._region_keys[region] = keys  # most recent last
            while len(self._region_keys) > REGION_CACHE:
                self._region_keys.pop(next(iter(self._region_keys)))
        return keys

    def locate_many(
        self,
        images: Iterable[ImageInput],
        *,
        stream: bool = True,
        options: Options | None = None,
        in_flight: int | None = None,
    ) -> Iterator[Prediction | Failure] | list[Prediction | Failure]:
        """Geolocate many inputs, up to ``in_flight`` (default ``max_in_flight``) at once, results in
        input order; a bad input yields a :class:`Failure`, never an exception."""
        gen = self.map_in_flight(lambda img: self.try_locate(img, options=options), images, in_flight=in_flight)
        return gen if stream else list(gen)

    def map_in_flight(self, fn: Callable[[T], R], items: Iterable[T], *, in_flight: int | None = None) -> Iterator[R]:
        """``fn`` over ``items`` on up to ``in_flight`` threads, results in input order, reading
        ``items`` lazily (a window of ``in_flight`` ahead). The engine batches their prompts."""
        n = max(1, in_flight or self.max_in_flight)
        if n == 1:
            yield from map(fn, items)
            return
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="clue2geo-locate") as pool:
            window: collections.deque[Future[R]] = collections.deque()
            for item in items:
                window.append(pool.submit(fn, item))
                if len(window) >= n:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()

    def try_locate(
        self, image: ImageInput, *, name: str | None = None, options: Options | None = None
    ) -> Prediction | Failure:
        """``locate``, but any error becomes a :class:`Failure` (what batches record)."""
        name = name or (str(image) if isinstance(image, str | Path) else f"<{type(image).__name__}>")
        try:
            return self.locate(image, name=name, options=options)
        except Exception as exc:  # one bad input must not end a batch
            return Failure(image=name, error=type(exc).__name__, message=str(exc) or repr(exc))


def _check_memory(bundle: Bundle) -> None:
    """Refuse, in one sentence, a CPU load that cannot fit: the OOM killer would otherwise end the
    process without a word. Counts the model files the CPU path reads (float16 variants are CUDA's)."""
    parts = {
        role: sum(f.bytes for k, f in bundle.component(role).files.items() if not k.endswith("fp16"))
        for role in ("vlm", "clip", "gpsclip", "sbert")
        if role in bundle.components
    }
    needed, avail = sum(parts.values()), engines_base.available_memory_bytes()
    if avail is not None and needed > avail:
        detail = ", ".join(f"{role} {n / 2**30:.1f}" for role, n in parts.items())
        raise Clue2GeoError(
            f"not enough memory to load bundle {bundle.name!r}: its models need about {needed / 2**30:.1f} GiB "
            f"({detail}) and {avail / 2**30:.1f} GiB is available; close other programs, lower max_in_flight, "
            "or use a machine (or GPU) with more memory"
        )


__all__ = ["Constrain", "Failure", "Geolocator", "Options"]
