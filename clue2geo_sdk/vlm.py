"""The vision-language model behind one small interface, and its llama.cpp implementation.

``VisionLanguageModel.open(image)`` returns an :class:`ImageSession`; every prompt about that
image goes through the session, so an engine that caches the image's KV prefix can do so here
without touching the pipeline. The llama-cpp-python implementation encodes the image once to a
data URL per session; its chat handler still re-encodes the image per call (DESIGN §7).

Constrained decoding: ``constrain="fallback"`` (default) samples freely and parses; only when the
answer cannot be parsed is the prompt re-asked under a JSON schema (which costs ~23 ms/token on a
GPU in llama-cpp-python). "always" and "never" force one way.
"""

from __future__ import annotations

import base64
import ctypes
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import attrs

from .errors import MissingExtraError
from .image import LoadedImage

Constrain = Literal["fallback", "always", "never"]

# Decimal degrees as strings (the paper's format), at least four decimals, range-limited by pattern.
_LAT = {"type": "string", "pattern": "^-?(90|[0-8]?[0-9])[.][0-9]{4,6}$"}
_LON = {"type": "string", "pattern": "^-?(180|1[0-7][0-9]|[0-9]?[0-9])[.][0-9]{4,6}$"}
_NAME = {"type": "string", "maxLength": 64}
LOCATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"country": _NAME, "city": _NAME, "landmark": _NAME, "lat": _LAT, "lon": _LON},
    "required": ["country", "city", "landmark", "lat", "lon"],
}
CUES_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "maxItems": 12,
    "items": {
        "type": "object",
        "properties": {"cue": {"type": "string", "maxLength": 48}, "description": {"type": "string", "maxLength": 200}},
        "required": ["cue", "description"],
    },
}


@attrs.frozen(kw_only=True)
class Generation:
    """One model answer: the text, whether a grammar constrained it, tokens and seconds."""

    text: str
    constrained: bool
    tokens: int
    seconds: float


class ImageSession(Protocol):
    def ask(
        self,
        prompt: str,
        *,
        schema: Mapping[str, Any] | None,
        max_tokens: int,
        seed: int | None = None,
        temperature: float | None = None,
    ) -> Generation: ...


class VisionLanguageModel(Protocol):
    def open(self, image: LoadedImage) -> ImageSession: ...

    def close(self) -> None: ...


def ask_parsed(
    session: ImageSession,
    prompt: str,
    parse: Callable[[str], Any],
    *,
    schema: Mapping[str, Any],
    max_tokens: int,
    constrain: Constrain,
    seed: int | None = None,
    temperature: float | None = None,
) -> tuple[Any, list[Generation]]:
    """Ask and parse; with "fallback", re-ask under the schema only if the free answer doesn't parse.

    ``parse`` returns None (or a value whose ``valid`` is False) for an unusable answer.
    """

    def usable(v: Any) -> bool:
        return v is not None and getattr(v, "valid", True)

    gens: list[Generation] = []
    if constrain != "always":
        gen = session.ask(prompt, schema=None, max_tokens=max_tokens, seed=seed, temperature=temperature)
        gens.append(gen)
        value = parse(gen.text)
        if usable(value) or constrain == "never":
            return value, gens
    gen = session.ask(prompt, schema=schema, max_tokens=max_tokens, seed=seed, temperature=temperature)
    gens.append(gen)
    return parse(gen.text), gens


_SILENT_CALLBACK: Any = None


def silence_native_logs() -> None:
    """Route llama.cpp's and mtmd's native logs to a no-op callback (process-wide, idempotent).

    Both libraries log through callbacks, so this silences them without touching stdout/stderr
    (which other threads may be using). A verbose VLM simply doesn't call it.
    """
    global _SILENT_CALLBACK
    if _SILENT_CALLBACK is not None:
        return
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    @llama_cpp.llama_log_callback
    def _drop(level: int, text: bytes, user_data: Any) -> None:
        return None

    _SILENT_CALLBACK = _drop  # keep a reference: the C side holds only the pointer
    llama_cpp.llama_log_set(_drop, ctypes.c_void_p(0))
    mtmd.mtmd_log_set(_drop, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(_drop, ctypes.c_void_p(0))


class LlamaCppVLM:
    """Qwen2.5-VL from a text GGUF + mmproj GGUF through llama-cpp-python. One call at a time (locked)."""

    def __init__(
        self,
        model_path: Path,
        mmproj_path: Path,
        *,
        n_ctx: int = 4096,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        image_max_tokens: int | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        verbose: bool = False,
    ) -> None:
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_chat_format import Qwen25VLChatHandler
        except ImportError as exc:  # pragma: no cover - llama-cpp-python is a core dependency
            raise MissingExtraError("llama_cpp", "gpu", "the VLM") from exc
        self.verbose = verbose
        self.temperature = temperature
        self.seed = seed
        self._lock = threading.Lock()
        handler_cls = Qwen25VLChatHandler
        if image_max_tokens:
            handler_cls = _capped_handler(Qwen25VLChatHandler, image_max_tokens)
        if not verbose:
            silence_native_logs()
        self._handler = handler_cls(clip_model_path=str(mmproj_path), verbose=verbose)
        self._llm = Llama(
            str(model_path),
            chat_handler=self._handler,
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
            seed=seed,
            verbose=verbose,
        )

    def open(self, image: LoadedImage) -> _LlamaSession:
        return _LlamaSession(self, "data:image/png;base64," + base64.b64encode(image.png_bytes()).decode())

    def _complete(
        self,
        url: str,
        prompt: str,
        schema: Mapping[str, Any] | None,
        max_tokens: int,
        seed: int | None,
        temperature: float | None,
    ) -> Generation:
        messages = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}],
            }
        ]
        kwargs: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": self.temperature if temperature is None else temperature,
        }
        if seed is not None:
            kwargs["seed"] = seed
        if schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": dict(schema)}
        with self._lock:
            t0 = time.perf_counter()
            out = self._llm.create_chat_completion(messages=messages, **kwargs)
            dt = time.perf_counter() - t0
        return Generation(
            text=out["choices"][0]["message"]["content"] or "",
            constrained=schema is not None,
            tokens=int(out["usage"]["completion_tokens"]),
            seconds=dt,
        )

    def close(self) -> None:
        with self._lock:
            llm = getattr(self, "_llm", None)
            if llm is not None:
                llm.close()
                self._llm = None


@attrs.define
class _LlamaSession:
    vlm: LlamaCppVLM
    url: str

    def ask(
        self,
        prompt: str,
        *,
        schema: Mapping[str, Any] | None,
        max_tokens: int,
        seed: int | None = None,
        temperature: float | None = None,
    ) -> Generation:
        return self.vlm._complete(self.url, prompt, schema, max_tokens, seed, temperature)


class _CappedMtmd:
    """Proxy of llama-cpp-python's mtmd bindings whose default context params cap image tokens."""

    def __init__(self, mtmd: Any, image_max_tokens: int) -> None:
        self._mtmd = mtmd
        self._cap = image_max_tokens

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mtmd, name)

    def mtmd_context_params_default(self) -> Any:
        params = self._mtmd.mtmd_context_params_default()
        params.image_max_tokens = self._cap
        return params


def _capped_handler(base: type, image_max_tokens: int) -> type:
    """The handler, with its mtmd context created under an image-token cap (DESIGN §4 hazard)."""

    class Capped(base):  # type: ignore[misc, valid-type]
        def _init_mtmd_context(self, llama_model: Any) -> None:
            if not isinstance(self._mtmd_cpp, _CappedMtmd):
                self._mtmd_cpp = _CappedMtmd(self._mtmd_cpp, image_max_tokens)
            super()._init_mtmd_context(llama_model)

    return Capped
