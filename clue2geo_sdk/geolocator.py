"""``Geolocator``: the Clue2Geo pipeline over one bundle (DESIGN §3).

It loads the bundle's parts once (the VLM engine, the ONNX encoders, the gallery, the geocoders) and
runs :func:`~clue2geo_sdk.pipeline.run.locate_image` on them for each image. Thread-safety: one
``Geolocator`` may be shared by threads; encoders and the gallery are read-only, and the batched
engine decodes the prompts of every thread's images together.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .bundle.manifest import Bundle
from .engines import ENGINES, EngineName, make_engine
from .engines.ask import VisionLanguageModel
from .engines.encoders import ClipEncoder, Device, GpsClipEncoder, SbertEncoder, device_providers
from .engines.image_tokens import IMAGE_MAX_TOKENS
from .engines.memory import check_memory
from .engines.settings import N_CTX_DEFAULT, vlm_int, vlm_temperature
from .errors import Clue2GeoError, ImageLoadError, InvalidArgumentError, OptionsError
from .geo.countries import countries
from .geo.region import Region
from .geo.reverse import ReverseGeocoder
from .inputs.image import ImageInput, LoadedImage, load_image
from .options import Options, whole_number
from .pipeline import stages
from .pipeline.cluemap import Cluemap
from .pipeline.prompts import resolve
from .pipeline.run import Parts, locate_image
from .results import Failure, Prediction
from .retrieval.coordinates import CoordinateGallery
from .retrieval.photos import PhotoGallery

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
        self.gallery = _open_gallery(bundle, files, gallery)
        self.geocoder = ReverseGeocoder(files["metadata"]["db"])
        self.countries = countries()
        self._region_keys: dict[Region, Any] = {}
        self._region_lock = threading.Lock()
        self.prompts = resolve(bundle.params("vlm").get("prompts"))
        self.grid = _patch_grid(bundle)
        self._parts = Parts(
            vlm=vlm,
            clip=self.clip,
            gpsclip=self.gpsclip,
            sbert=self.sbert,
            gallery=self.gallery,
            geocoder=self.geocoder,
            countries=self.countries,
            prompts=self.prompts,
            grid=self.grid,
            bundle_name=bundle.name,
            keys_in=self._keys_in,
        )
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
        vlm = _make_vlm(
            bundle,
            engine,
            max_in_flight=max_in_flight,
            samples_per_prompt=opts.samples_per_prompt,
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
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
        img = _load(image, None)
        opts = self.options
        raw: list[dict[str, Any]] = []
        with self._call():
            if cues is None:
                with self.vlm.open(img, image_tokens=opts.image_tokens) as session:
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
        with self._call(), self.vlm.open(img, image_tokens=self.options.image_tokens) as session:
            return session.ask(prompt, schema=None, max_tokens=max_tokens or self.options.max_answer_tokens).text

    # -- the pipeline -----------------------------------------------------------------------------

    def locate(
        self, image: ImageInput, *, name: str | None = None, options: Options | Mapping[str, Any] | None = None
    ) -> Prediction:
        """Geolocate one image (path, bytes, PIL image or HxWx3 uint8 array); ``options`` override the
        loaded defaults for this call only (shared state is never changed, so threads may differ)."""
        opts = self._options(options)
        with self._call():
            return locate_image(self._parts, _load(image, name), opts)

    def _options(self, options: Options | Mapping[str, Any] | None) -> Options:
        """The options of one call: the loaded ones, an :class:`Options`, or a mapping of its fields."""
        if options is None:
            return self.options
        if isinstance(options, Options):
            return options
        if isinstance(options, Mapping):
            return Options(**{str(k): v for k, v in options.items()})
        raise OptionsError(f"options={options!r}: must be an Options, a mapping of option names, or None")

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
        if in_flight is not None and (not whole_number(in_flight) or in_flight < 1):
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


def _open_gallery(
    bundle: Bundle, files: Mapping[str, Mapping[str, Path]], gallery: str | Path | None
) -> CoordinateGallery | PhotoGallery:
    """The bundle's coordinate gallery, or the analyst's reference photos (image -> image retrieval)."""
    if gallery is not None:
        return PhotoGallery(gallery, image_sha256=bundle.component("gpsclip").files["image"].sha256)
    gparams = bundle.params("gallery")
    return CoordinateGallery(
        files["gallery"]["index"],
        files["metadata"]["db"],
        dim=int(gparams["dim"]),
        encoder_sha256=str(gparams["encoder_sha256"]),
        location_sha256=bundle.component("gpsclip").files["location"].sha256,
        digest=bundle.component("gallery").files["index"].sha256,
    )


def _patch_grid(bundle: Bundle) -> tuple[int, int]:
    """The cluemap's patch grid (rows, columns) from the bundle's CLIP settings (checked by ``Bundle.open``)."""
    rows, cols = bundle.params("clip").get("patch_grid", [3, 3])
    return (int(rows), int(cols))


def _make_vlm(
    bundle: Bundle,
    engine: EngineName,
    *,
    max_in_flight: int,
    samples_per_prompt: int,
    n_gpu_layers: int,
    n_threads: int | None,
    verbose: bool,
) -> VisionLanguageModel:
    """The bundle's VLM on the named engine, with the bundle's context, image budget and temperature."""
    try:
        return make_engine(
            engine,
            bundle.file("vlm", "model"),
            bundle.file("vlm", "mmproj"),
            max_images=max_in_flight,
            ctx_per_image=vlm_int(bundle, "n_ctx", N_CTX_DEFAULT),
            samples_per_prompt=samples_per_prompt,
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
            image_max_tokens=vlm_int(bundle, "image_max_tokens", IMAGE_MAX_TOKENS),
            temperature=vlm_temperature(bundle),
            verbose=verbose,
        )
    except Clue2GeoError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. a setting the engine refuses: said as a load error
        raise InvalidArgumentError(f"cannot load the VLM of bundle {bundle.name!r}: {exc}") from exc


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


DEVICES = ("auto", "cpu", "cuda")


def _check_load_args(device: Any, engine: Any, max_in_flight: Any, n_gpu_layers: Any, n_threads: Any) -> None:
    """Refuse a bad load argument by name before anything is opened (never a bare TypeError later)."""
    if device not in DEVICES:
        raise InvalidArgumentError(f"device={device!r}: must be one of {', '.join(DEVICES)}")
    if engine not in ENGINES:
        raise InvalidArgumentError(f"engine={engine!r}: must be one of {', '.join(ENGINES)}")
    if not whole_number(max_in_flight) or max_in_flight < 1:
        raise InvalidArgumentError(f"max_in_flight={max_in_flight!r}: must be a whole number, at least 1")
    if n_gpu_layers is not None and (not whole_number(n_gpu_layers) or n_gpu_layers < -1):
        raise InvalidArgumentError(
            f"n_gpu_layers={n_gpu_layers!r}: must be a whole number: -1 (all), 0 (none) or a layer count"
        )
    if n_threads is not None and (not whole_number(n_threads) or n_threads < 1):
        raise InvalidArgumentError(f"n_threads={n_threads!r}: must be a whole number, at least 1 (or None)")


__all__ = ["Geolocator"]
