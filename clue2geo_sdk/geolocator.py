"""``Geolocator``: the Clue2Geo pipeline over one bundle (DESIGN §3).

image -> GPSCLIP + retrieval (USearch) -> 3 RAG prompts (VLM) ----------------+
      -> cues (VLM) -> cluemap (CLIP + SBERT) -> direct prompt (VLM) ----------+-> selection -> result

The stages live in :mod:`clue2geo_sdk.pipeline.stages`; ``Geolocator`` schedules them by dependency so the
VLM engine always has every prompt it could be working on. Thread-safety: one ``Geolocator`` may
be shared by threads; encoders and the gallery are read-only, and the batched engine decodes the
prompts of every thread's images together.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import attrs
import numpy as np

from ._native import llama_cpp_module
from .bundle.manifest import Bundle
from .engines import ENGINES, EngineName, make_engine
from .engines import base as engines_base
from .engines.ask import Constrain, PendingAnswer, VisionLanguageModel
from .engines.encoders import ClipEncoder, Device, GpsClipEncoder, SbertEncoder, providers_for
from .engines.image_tokens import IMAGE_MAX_TOKENS
from .errors import (
    BundleFormatError,
    Clue2GeoError,
    DeviceError,
    ImageLoadError,
    InsufficientMemoryError,
    InvalidArgumentError,
    OptionsError,
)
from .geo.countries import countries
from .geo.region import Region
from .geo.reverse import ReverseGeocoder
from .inputs.image import ImageInput, LoadedImage, load_image
from .inputs.metadata.photo import read_metadata
from .options import Options
from .pipeline import stages
from .pipeline.answers import rank_answers
from .pipeline.cluemap import Cluemap
from .pipeline.prompts import resolve
from .pipeline.selection import similarity, spread_km
from .results import Failure, Prediction
from .retrieval.search import Gallery

REGION_CACHE = 32
T = TypeVar("T")
R = TypeVar("R")


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
        _check_load_args(device, "batched", max_in_flight, None, None)
        self.max_in_flight = int(max_in_flight)
        providers = device_providers(device)
        files = {role: {k: bundle.file(role, k) for k in bundle.component(role).files} for role in bundle.components}
        self.clip = ClipEncoder(files["clip"], bundle.params("clip"), providers)
        self.gpsclip = GpsClipEncoder(files["gpsclip"], bundle.params("gpsclip"), providers)
        self.sbert = SbertEncoder(files["sbert"], bundle.params("sbert"), providers)
        from .retrieval.photos import PhotoGallery

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
        if not (
            isinstance(grid, list | tuple)
            and len(grid) == 2
            and all(isinstance(g, int) and not isinstance(g, bool) and 1 <= g <= 16 for g in grid)
        ):
            raise BundleFormatError(
                f"bundle {bundle.name!r}: clip.params.patch_grid={grid!r} must be two whole numbers from 1 to 16"
            )
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
        _check_load_args(device, engine, max_in_flight, n_gpu_layers, n_threads)
        opts = Options.from_kwargs(**options)
        device_providers(device)  # device="cuda" without onnxruntime's CUDA provider: refused before any load
        bundle = Bundle.open(path, verify=verify, trusted_keys=trusted_keys)
        if n_gpu_layers is None:
            n_gpu_layers = 0 if device == "cpu" else -1
        check_memory(
            bundle,
            engine=engine,
            max_in_flight=max_in_flight,
            samples_per_prompt=opts.samples_per_prompt,
            device=device,
            n_gpu_layers=n_gpu_layers,
        )
        try:
            vlm = make_engine(
                engine,
                bundle.file("vlm", "model"),
                bundle.file("vlm", "mmproj"),
                max_images=max_in_flight,
                ctx_per_image=vlm_int(bundle, "n_ctx", N_CTX_DEFAULT),
                samples_per_prompt=opts.samples_per_prompt,
                n_gpu_layers=n_gpu_layers,
                n_threads=n_threads,
                image_max_tokens=vlm_int(bundle, "image_max_tokens", IMAGE_MAX_TOKENS),
                temperature=_bundle_temperature(bundle),
                verbose=verbose,
            )
        except Clue2GeoError:
            raise
        except (TypeError, ValueError) as exc:  # e.g. a setting the engine refuses: said as a load error
            raise InvalidArgumentError(f"cannot load the VLM of bundle {bundle.name!r}: {exc}") from exc
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
        img = _load(image, None)
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
        img = _load(image, None)
        with self._call(), self.vlm.open(img) as session:
            return session.ask(prompt, schema=None, max_tokens=max_tokens or self.options.max_answer_tokens).text

    # -- the pipeline -----------------------------------------------------------------------------

    def locate(
        self, image: ImageInput, *, name: str | None = None, options: Options | Mapping[str, Any] | None = None
    ) -> Prediction:
        """Geolocate one image (path, bytes, PIL image or HxWx3 uint8 array); ``options`` override the
        loaded defaults for this call only (shared state is never changed, so threads may differ)."""
        opts = self._options(options)
        with self._call():
            return self._locate(_load(image, name), opts)

    def _options(self, options: Options | Mapping[str, Any] | None) -> Options:
        """The options of one call: the loaded ones, an :class:`Options`, or a mapping of its fields."""
        if options is None:
            return self.options
        if isinstance(options, Options):
            return options
        if isinstance(options, Mapping):
            return Options(**{str(k): v for k, v in options.items()})
        raise OptionsError(f"options={options!r}: must be an Options, a mapping of option names, or None")

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
        opts = self._options(options)  # a bad option is the caller's error, not every image's failure
        if in_flight is not None and (not _whole(in_flight) or in_flight < 1):
            raise InvalidArgumentError(f"in_flight={in_flight!r}: must be a whole number, at least 1 (or None)")
        gen = self.map_in_flight(lambda img: self.try_locate(img, options=opts), images, in_flight=in_flight)
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


def _load(image: Any, name: Any) -> LoadedImage:
    """:func:`load_image`, with any builtin error it lets through said as an :class:`ImageLoadError`
    naming the input (a public call raises only Clue2GeoError subclasses)."""
    if name is not None and not isinstance(name, str):
        raise InvalidArgumentError(f"name={name!r}: must be a string naming the image (or None)")
    try:
        return load_image(image, name=name)
    except Clue2GeoError:
        raise
    except (TypeError, ValueError, OSError, AttributeError) as exc:
        what = name or (str(image) if isinstance(image, str | Path) else f"<{type(image).__name__}>")
        raise ImageLoadError(f"{what}: cannot be read as an image ({type(exc).__name__}: {exc})") from exc


# -- load-time checks -------------------------------------------------------------------------------

DEVICES = ("auto", "cpu", "cuda")
N_CTX_DEFAULT = 4096
N_UBATCH = 512  # the engines' micro-batch (llama.cpp's default): sizes the compute buffers
GiB = 2**30


def _whole(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_load_args(device: Any, engine: Any, max_in_flight: Any, n_gpu_layers: Any, n_threads: Any) -> None:
    """Refuse a bad load argument by name before anything is opened (never a bare TypeError later)."""
    if device not in DEVICES:
        raise InvalidArgumentError(f"device={device!r}: must be one of {', '.join(DEVICES)}")
    if engine not in ENGINES:
        raise InvalidArgumentError(f"engine={engine!r}: must be one of {', '.join(ENGINES)}")
    if not _whole(max_in_flight) or max_in_flight < 1:
        raise InvalidArgumentError(f"max_in_flight={max_in_flight!r}: must be a whole number, at least 1")
    if n_gpu_layers is not None and (not _whole(n_gpu_layers) or n_gpu_layers < -1):
        raise InvalidArgumentError(
            f"n_gpu_layers={n_gpu_layers!r}: must be a whole number: -1 (all), 0 (none) or a layer count"
        )
    if n_threads is not None and (not _whole(n_threads) or n_threads < 1):
        raise InvalidArgumentError(f"n_threads={n_threads!r}: must be a whole number, at least 1 (or None)")


def device_providers(device: Device) -> list[str]:
    """onnxruntime providers for ``device``; an unusable device is a :class:`DeviceError`."""
    try:
        return providers_for(device)
    except Clue2GeoError:
        raise
    except RuntimeError as exc:
        raise DeviceError(str(exc)) from None


def vlm_int(bundle: Bundle, key: str, default: int, *, low: int = 1) -> int:
    """A whole-number VLM setting of the bundle's manifest, refused by name when it is not one."""
    value = bundle.params("vlm").get(key)
    if value is None:
        return default
    if not _whole(value) or value < low:
        raise BundleFormatError(
            f"bundle {bundle.name!r}: vlm.params.{key}={value!r} must be a whole number, at least {low}; "
            "rebuild or re-export the bundle"
        )
    return int(value)


def _bundle_temperature(bundle: Bundle) -> float:
    generation = bundle.params("vlm").get("generation") or {}
    value = generation.get("temperature", 0.0) if isinstance(generation, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise BundleFormatError(
            f"bundle {bundle.name!r}: vlm.params.generation.temperature={value!r} must be a finite number >= 0"
        )
    return float(value)


@attrs.frozen(kw_only=True)
class MemoryNeed:
    """Host memory (RAM) a load needs, by part, in bytes, and how it was counted.

    ``kv_cells`` is the KV cache's size in cells (``n_ctx`` per sequence x sequences) and
    ``kv_bytes_per_cell`` K and V in f16 over the layers kept in host memory: exactly what llama.cpp
    allocates. Compute buffers are an allowance fitted to llama.cpp's reservations (it sizes them from
    the graph at load): one micro-batch's logits or attention scores plus activations, an output row
    per sequence, and the vision tower's full-attention scores for one image at the token budget."""

    parts: dict[str, int]
    engine: str
    max_in_flight: int
    seqs_per_image: int
    n_seq: int
    n_ctx: int
    kv_cells: int
    kv_bytes_per_cell: int
    gpu_layers: int
    n_layer: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def to_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "total": self.total}


def _gpu_offload_supported() -> bool:
    try:
        return bool(llama_cpp_module().llama_supports_gpu_offload())
    except (ImportError, AttributeError, OSError):
        return False


def _memory_model(
    bundle: Bundle, *, engine: str, samples_per_prompt: int, device: Device, n_gpu_layers: int | None
) -> Callable[[int], MemoryNeed]:
    """Read the bundle's headers once; return the need as a function of the images in flight."""
    from .engines.batched import seqs_per_image
    from .engines.gguf_header import read_header, tensor_bytes, text_model_shape

    if n_gpu_layers is None:
        n_gpu_layers = 0 if device == "cpu" else -1
    model, mmproj = bundle.file("vlm", "model"), bundle.file("vlm", "mmproj")
    shape = text_model_shape(model)
    n_ctx = vlm_int(bundle, "n_ctx", N_CTX_DEFAULT)
    budget = vlm_int(bundle, "image_max_tokens", IMAGE_MAX_TOKENS)
    gpu = device != "cpu" and n_gpu_layers != 0 and _gpu_offload_supported()
    # llama.cpp offloads the last n_gpu_layers repeating layers (all, and the output, at -1 or above n_layer)
    on_gpu = 0 if not gpu else shape.n_layer if n_gpu_layers < 0 else min(n_gpu_layers, shape.n_layer)
    first_gpu = shape.n_layer - on_gpu
    all_on_gpu = gpu and (n_gpu_layers < 0 or n_gpu_layers > shape.n_layer)

    def host_tensor(name: str) -> bool:
        if name.startswith("blk."):
            return int(name.split(".")[1]) < first_gpu
        if name.startswith(("output", "output_norm")):
            return not all_on_gpu
        return True  # token embeddings stay in host memory (llama.cpp's input layer)

    fixed: dict[str, int] = {"vlm weights": sum(n for k, n in tensor_bytes(model).items() if host_tensor(k))}
    seqs = seqs_per_image(samples_per_prompt) if engine == "batched" else 1
    per_cell = sum(shape.n_head_kv[:first_gpu]) * (shape.head_dim_k + shape.head_dim_v) * 2
    ff = read_header(model, [f"{shape.arch}.feed_forward_length"]).get(f"{shape.arch}.feed_forward_length")
    n_ff = int(ff) if _whole(ff) else 4 * shape.n_embd
    cpu_graph = first_gpu > 0 or not all_on_gpu  # some of the graph runs on the CPU
    logits = shape.n_vocab * 4  # one float32 row of logits
    if not gpu:  # mtmd puts the vision tower where the text model's layers are
        keys = ("attention.head_count", "embedding_length", "feed_forward_length")
        v = read_header(mmproj, [f"clip.vision.{k}" for k in keys])
        heads, width, ffn = (v.get(f"clip.vision.{k}") for k in keys)
        fixed["vision projector"] = Path(mmproj).stat().st_size
        if _whole(heads) and _whole(width):
            # The vision tower's graph for an image at the budget (2x2 patches per token, P of them):
            # full-attention scores of 6 bytes per head per pair (f32 scores and softmax, overlapping)
            # and the activations; fitted to llama.cpp's reservation (201 MiB at P=4096 on the demo).
            patches, vff = 4 * budget, int(ffn) if _whole(ffn) else 4 * int(width)
            fixed["vision compute"] = patches * (6 * int(heads) * patches + 16 * (int(width) + vff))
    if device_providers(device)[:1] != ["CUDAExecutionProvider"]:  # the CPU reads the float32 files
        fixed["encoders"] = sum(
            f.bytes
            for role in ("clip", "gpsclip", "sbert")
            if role in bundle.components
            for k, f in bundle.component(role).files.items()
            if not k.endswith("fp16")
        )

    def need(max_in_flight: int) -> MemoryNeed:
        n_seq = max_in_flight * seqs if engine == "batched" else 1
        parts = {"vlm weights": fixed["vlm weights"], "KV cache": n_ctx * n_seq * per_cell}
        if cpu_graph:
            # llama.cpp reserves its graph for one micro-batch with every token an output (its logits),
            # the tokens rounded up to a multiple of the sequences; and an output row per sequence.
            n_tok = -(-N_UBATCH // n_seq) * n_seq
            micro = 4 * n_tok * (max(shape.n_vocab, shape.n_head * n_ctx) + 4 * shape.n_embd + 2 * n_ff)
            parts["compute buffers"] = micro + n_seq * logits
            if engine == "chat":  # llama-cpp-python's own float32 scores array, n_batch rows
                parts["compute buffers"] += N_UBATCH * logits
        parts.update((k, v) for k, v in fixed.items() if k != "vlm weights")
        return MemoryNeed(
            parts=parts,
            engine=engine,
            max_in_flight=max_in_flight,
            seqs_per_image=seqs,
            n_seq=n_seq,
            n_ctx=n_ctx,
            kv_cells=n_ctx * n_seq,
            kv_bytes_per_cell=per_cell,
            gpu_layers=on_gpu,
            n_layer=shape.n_layer,
        )

    return need


def memory_need(
    bundle: Bundle,
    *,
    engine: str = "batched",
    max_in_flight: int = 4,
    samples_per_prompt: int = 1,
    device: Device = "auto",
    n_gpu_layers: int | None = None,
) -> MemoryNeed:
    """Host memory to load ``bundle`` with these settings: VLM weights (less the layers llama.cpp
    offloads to a GPU), the KV cache (``n_ctx`` cells per sequence, f16 K and V, sized from the GGUF
    header), compute buffers, the vision projector and the ONNX encoders when they run on the CPU."""
    return _memory_model(
        bundle, engine=engine, samples_per_prompt=samples_per_prompt, device=device, n_gpu_layers=n_gpu_layers
    )(max_in_flight)


def available_memory() -> int | None:
    """Memory a load can take: the system's MemAvailable, bounded by the container's (cgroup) limit."""
    avail = engines_base.available_memory_bytes()
    limit = _cgroup_room()
    if limit is not None:
        avail = limit if avail is None else min(avail, limit)
    return avail


def _cgroup_room() -> int | None:
    """Room left under a cgroup v2 (or v1) memory limit: limit - (usage - reclaimable file cache)."""
    for limit_f, usage_f, stat_f, key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        base = Path("/sys/fs/cgroup")
        try:
            raw = (base / limit_f).read_text().strip()
            if raw == "max" or int(raw) >= 1 << 60:
                return None
            usage = int((base / usage_f).read_text().strip())
            cache = 0
            for line in (base / stat_f).read_text().splitlines():
                name, _, val = line.partition(" ")
                if name == key:
                    cache = int(val)
            return max(0, int(raw) - max(0, usage - cache))
        except (OSError, ValueError):
            continue
    return None


def check_memory(
    bundle: Bundle,
    *,
    engine: str = "batched",
    max_in_flight: int = 4,
    samples_per_prompt: int = 1,
    device: Device = "auto",
    n_gpu_layers: int | None = None,
) -> MemoryNeed:
    """Refuse, in one sentence with the numbers, a load whose host memory need (:func:`memory_need`)
    exceeds what is free: the OOM killer would otherwise end the process without a word. The
    sentence says how many images in flight would fit, when some would."""
    model = _memory_model(
        bundle, engine=engine, samples_per_prompt=samples_per_prompt, device=device, n_gpu_layers=n_gpu_layers
    )
    need = model(max_in_flight)
    avail = available_memory()
    if avail is None or need.total <= avail:
        return need
    detail = ", ".join(f"{k} {v / GiB:.2f}" for k, v in need.parts.items() if v)
    lower = ""
    if engine == "batched" and max_in_flight > 1:
        from .engines.batched import MAX_SEQUENCES

        lo, hi = 0, min(max_in_flight - 1, MAX_SEQUENCES // need.seqs_per_image)
        while lo < hi:  # the most images in flight that fit (the need grows with them)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if model(mid).total <= avail else (lo, mid - 1)
        lower = f"lower max_in_flight (at most {lo} fit), " if lo else ""
    cells = f"{need.max_in_flight} images in flight x {need.seqs_per_image} sequences" if engine == "batched" else "1"
    raise InsufficientMemoryError(
        f"not enough memory to load bundle {bundle.name!r}: its models need about {need.total / GiB:.2f} GiB of "
        f"RAM with the {engine} engine, max_in_flight={max_in_flight} and device={device} ({detail} GiB; the KV "
        f"cache holds {cells} x n_ctx {need.n_ctx} cells of {need.kv_bytes_per_cell} bytes) and "
        f"{avail / GiB:.2f} GiB is free; {lower}lower the bundle's n_ctx, offload layers to a GPU "
        "(n_gpu_layers), or free memory"
    )


__all__ = ["Constrain", "Failure", "Geolocator", "MemoryNeed", "Options", "check_memory", "memory_need"]
