"""VLM engines behind one seam (:class:`~.base.VisionLanguageModel`): ``batched`` (the default,
llama.cpp's low-level API with a shared image prefix and continuous batching), ``chat`` (the
llama-cpp-python chat-handler baseline), and the check-first grammar both can be compared on."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from .base import EngineStats, Generation, ImageSession, VisionLanguageModel, VLMError
from .batched import LlamaBatchEngine
from .chat import LlamaChatVLM
from .threads import default_threads

EngineName = Literal["batched", "chat"]
ENGINES: tuple[str, ...] = ("batched", "chat")


def make_engine(
    name: EngineName,
    model_path: Path,
    mmproj_path: Path,
    *,
    max_images: int = 4,
    ctx_per_image: int = 4096,
    samples_per_prompt: int = 1,
    **kwargs: Any,
) -> VisionLanguageModel:
    """Build the named engine; ``kwargs`` are the settings both share (threads, GPU layers, seed...).
    CPU threads default to the physical cores the process may use (:func:`~.threads.default_threads`),
    the same for both engines so they compute alike.
    ``samples_per_prompt`` sizes the batched engine's per-image sequence reservation."""
    if not kwargs.get("n_threads"):
        kwargs["n_threads"] = default_threads()
    if name == "batched":
        return LlamaBatchEngine(
            model_path,
            mmproj_path,
            max_images=max_images,
            ctx_per_image=ctx_per_image,
            samples_per_prompt=samples_per_prompt,
            **kwargs,
        )
    if name == "chat":
        return LlamaChatVLM(model_path, mmproj_path, n_ctx=ctx_per_image, **kwargs)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")


__all__ = [
    "ENGINES",
    "EngineName",
    "EngineStats",
    "Generation",
    "ImageSession",
    "VLMError",
    "VisionLanguageModel",
    "make_engine",
]
