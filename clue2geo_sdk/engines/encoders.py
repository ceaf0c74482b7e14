"""The bundle's ONNX encoders on onnxruntime: CLIP image/text, GPSCLIP image/location, SBERT.

Every encoder returns unit-length float32 rows, so a dot product is a cosine similarity.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from .._native import onnxruntime_module
from ..errors import Clue2GeoError, DeviceError

log = logging.getLogger("clue2geo")

Device = Literal["auto", "cpu", "cuda"]


def providers_for(device: Device) -> list[str]:
    """onnxruntime providers for a device choice; "auto" falls back to CPU with one log line."""
    available = onnxruntime_module().get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:  # "cuda" names no fallback: a session that falls back is refused
        return ["CUDAExecutionProvider"] if device == "cuda" else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(
            "device='cuda' but onnxruntime has no CUDA provider (available: "
            f"{', '.join(available)}); on a machine with an NVIDIA GPU replace the CPU wheel: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu (README, Pinned stack)"
        )
    log.info("clue2geo: no CUDA provider in onnxruntime, encoders run on the CPU")
    return ["CPUExecutionProvider"]


def device_providers(device: Device) -> list[str]:
    """onnxruntime providers for ``device``; an unusable device is a :class:`DeviceError`."""
    try:
        return providers_for(device)
    except Clue2GeoError:
        raise
    except RuntimeError as exc:
        raise DeviceError(str(exc)) from None


_LEVELS = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _session(path: Path, providers: list[str], level: str | None = None) -> Any:
    """An onnxruntime session; a model with external weights (``NAME.onnx.data``) finds them beside it."""
    ort = onnxruntime_module()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if path.with_name(path.name + ".data").is_file():
        # Weights in a .data file are memory-mapped; prepacking would copy them all into private
        # memory. Measured on ViT-H/14's image tower (2.5 GB): session 0.25 s instead of 7.4 s,
        # 0.1 GB private memory instead of 2.4 GB (the rest is page cache, shared between processes),
        # the same inference speed within 5 %.
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if level is not None:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    running = session.get_providers()[:1]
    if providers[:1] == ["CUDAExecutionProvider"] and running != providers[:1]:
        # onnxruntime-gpu lists CUDA whether or not CUDA's libraries load, and falls back to the CPU
        why = f"{path.name}: onnxruntime could not start CUDA for it and runs it on {', '.join(running)}"
        if len(providers) == 1:  # device="cuda"
            raise DeviceError(
                f"device='cuda' but {why}; are CUDA 12/13's cuBLAS and cuDNN libraries installed and on the "
                "library path? (docs/gpu.md)"
            )
        log.info("clue2geo: %s", why)
    return session


def _tower(files: Mapping[str, Path], params: Mapping[str, Any], key: str, providers: list[str]) -> Any:
    """The session for one tower: its float16 variant on CUDA when the bundle has one that passed
    parity (run at the optimization level it was checked at), else the float32 file."""
    verdict = (params.get("fp16") or {}).get(key) or {}
    if providers[:1] == ["CUDAExecutionProvider"] and verdict.get("ok") and f"{key}_fp16" in files:
        return _session(files[f"{key}_fp16"], providers, verdict.get("graph_optimization"))
    return _session(files[key], providers)


def unit_rows(x: np.ndarray, dtype: type[np.floating[Any]] = np.float32) -> np.ndarray:
    """Each row scaled to unit length (a zero row stays zero), as ``dtype``: dot products of unit
    rows are cosine similarities."""
    x = np.asarray(x, dtype=dtype)
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def mean_pool_normalize(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence-transformers' pooling: mask-weighted mean over tokens, then unit length."""
    m = mask[..., None].astype(np.float32)
    return unit_rows((tokens * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None))


def preprocess(images: Sequence[Image.Image], params: Mapping[str, Any]) -> np.ndarray:
    """CLIP preprocessing: shortest side to ``image_size`` (bicubic), center crop, scale, normalize."""
    size = int(params["image_size"])
    mean = np.asarray(params["mean"], dtype=np.float32)
    std = np.asarray(params["std"], dtype=np.float32)
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, img in enumerate(images):
        w, h = img.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        resized = img.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        arr = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        out[i] = ((arr - mean) / std).transpose(2, 0, 1)
    return out


def patch_grid(img: Image.Image, rows: int, cols: int) -> list[tuple[Image.Image, tuple[int, int, int, int]]]:
    """Split an image into a fixed rows x cols grid of crops (eq. 2's patches) with their boxes."""
    w, h = img.size
    out = []
    for r in range(rows):
        for c in range(cols):
            box = (c * w // cols, r * h // rows, (c + 1) * w // cols, (r + 1) * h // rows)
            out.append((img.crop(box), box))
    return out


class ClipEncoder:
    """CLIP image and text towers; text through the bundle's ``tokenizer.json``."""

    def __init__(
        self, files: Mapping[str, Path], params: Mapping[str, Any], providers: list[str], batch: int = 32
    ) -> None:
        self.params = params
        self.batch = batch
        self._image = _tower(files, params, "image", providers)
        self._text = _tower(files, params, "text", providers)
        self._tok = Tokenizer.from_file(str(files["tokenizer"]))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        chunks = [
            self._image.run(None, {"pixel_values": preprocess(images[s : s + self.batch], self.params)})[0]
            for s in range(0, len(images), self.batch)
        ]
        return unit_rows(np.concatenate(chunks))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, int(self.params["embed_dim"])), dtype=np.float32)
        chunks = []
        for s in range(0, len(texts), self.batch):
            ids = np.array([e.ids for e in self._tok.encode_batch(list(texts[s : s + self.batch]))], dtype=np.int64)
            chunks.append(self._text.run(None, {"input_ids": ids})[0])
        return unit_rows(np.concatenate(chunks))


class GpsClipEncoder:
    """GPSCLIP image tower (pixels -> 512) and location tower (lat/lon degrees -> 512)."""

    def __init__(self, files: Mapping[str, Path], params: Mapping[str, Any], providers: list[str]) -> None:
        self.params = params
        self._image = _tower(files, params, "image", providers)
        self._location = _session(files["location"], providers)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return unit_rows(self._image.run(None, {"pixel_values": preprocess(images, self.params)})[0])

    def encode_locations(self, latlon: np.ndarray) -> np.ndarray:
        latlon = np.asarray(latlon, dtype=np.float32).reshape(-1, 2)
        if len(latlon) == 0:
            return np.zeros((0, int(self.params["dim"])), dtype=np.float32)
        return unit_rows(self._location.run(None, {"latlon": latlon})[0])


class SbertEncoder:
    """Sentence-BERT: token embeddings from ONNX, then mean pooling and L2 normalization."""

    def __init__(
        self, files: Mapping[str, Path], params: Mapping[str, Any], providers: list[str], batch: int = 64
    ) -> None:
        self.params = params
        self.batch = batch
        self._model = _session(files["model"], providers)
        self._inputs = {i.name for i in self._model.get_inputs()}
        self._tok = Tokenizer.from_file(str(files["tokenizer"]))
        self._tok.enable_truncation(int(params.get("max_length", 256)))
        self._tok.enable_padding(pad_id=0, pad_token="[PAD]")

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, int(self.params["dim"])), dtype=np.float32)
        chunks = []
        for s in range(0, len(texts), self.batch):
            enc = self._tok.encode_batch(list(texts[s : s + self.batch]))
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            tokens = self._model.run(None, {k: v for k, v in feeds.items() if k in self._inputs})[0]
            chunks.append(mean_pool_normalize(tokens, mask))
        return np.concatenate(chunks)
