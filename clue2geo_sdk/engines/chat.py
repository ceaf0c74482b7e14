"""The baseline engine: llama-cpp-python's ``Qwen25VLChatHandler``, one chat completion per prompt.

Kept so every benchmark can compare against it (``engine="chat"``). Each call clears the KV cache,
re-encodes the image and re-prefills the whole prompt, and calls are serialized by a lock; the
grammar masks the whole vocabulary every step. The image it sees is the same budget-fitted image the
batched engine sees, so with greedy decoding both give the same tokens.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..inputs.image import LoadedImage
from .base import EngineStats, Generation, ImageSession, VLMError, load_llama_cpp, portable_model_defaults
from .image_tokens import IMAGE_MAX_TOKENS, budget, fit_image


class ChatSession(ImageSession):
    """Prompts about one image, answered one at a time through the chat handler."""

    def __init__(self, vlm: LlamaChatVLM, url: str) -> None:
        self._vlm, self._url = vlm, url

    def submit(
        self,
        prompt: str,
        *,
        schema: Mapping[str, Any] | None,
        max_tokens: int,
        seed: int | None = None,
        temperature: float | None = None,
    ) -> Future[Generation]:
        fut: Future[Generation] = Future()
        try:
            fut.set_result(self._vlm._complete(self._url, prompt, schema, max_tokens, seed, temperature))
        except Exception as exc:  # the future carries it, as the batched engine's do
            fut.set_exception(exc if isinstance(exc, VLMError) else VLMError(str(exc)))
        return fut

    def close(self) -> None:
        return None


class LlamaChatVLM:
    """Qwen2.5-VL from a text GGUF + mmproj GGUF through llama-cpp-python's high-level API."""

    name = "chat"

    def __init__(
        self,
        model_path: Path,
        mmproj_path: Path,
        *,
        n_ctx: int = 4096,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        image_max_tokens: int = IMAGE_MAX_TOKENS,
        temperature: float = 0.0,
        seed: int = 0,
        flash_attn: bool = False,
        verbose: bool = False,
    ) -> None:
        load_llama_cpp(verbose)
        from llama_cpp import Llama  # native: only after load_llama_cpp() loaded libstdc++ (_native)
        from llama_cpp.llama_chat_format import Qwen25VLChatHandler  # native: likewise

        self.temperature, self.seed = temperature, seed
        self.image_max_tokens = int(image_max_tokens)
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._handler = _capped_handler(Qwen25VLChatHandler, self.image_max_tokens)(
            clip_model_path=str(mmproj_path), verbose=verbose
        )
        with portable_model_defaults():
            self._llm: Any = Llama(
                str(model_path),
                chat_handler=self._handler,
                n_ctx=n_ctx,
                n_gpu_layers=n_gpu_layers,
                n_threads=n_threads,
                seed=seed,
                flash_attn=flash_attn,
                verbose=verbose,
            )
        self.n_threads = int(self._llm.context_params.n_threads)  # what llama.cpp was given

    def open(self, image: LoadedImage, *, image_tokens: int = 0) -> ChatSession:
        buf = io.BytesIO()
        fit_image(image.image, budget(self.image_max_tokens, image_tokens)).save(buf, format="PNG")
        return ChatSession(self, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())

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
            "seed": self.seed if seed is None else seed,
        }
        if schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": dict(schema)}
        with self._lock:
            if self._llm is None:
                raise VLMError("the VLM engine is closed")
            t0 = time.perf_counter()
            out = self._llm.create_chat_completion(messages=messages, **kwargs)
            dt = time.perf_counter() - t0
            usage = out["usage"]
            self.stats.image_encodes += 1
            self.stats.prefix_tokens += int(usage["prompt_tokens"])
            self.stats.generated_tokens += int(usage["completion_tokens"])
        return Generation(
            text=out["choices"][0]["message"]["content"] or "",
            constrained=schema is not None,
            tokens=int(usage["completion_tokens"]),
            seconds=dt,
            truncated=out["choices"][0].get("finish_reason") == "length",
            prompt_tokens=int(usage["prompt_tokens"]),
        )

    def close(self) -> None:
        with self._lock:
            if self._llm is not None:
                self._llm.close()
                self._llm = None


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
    """The handler with Qwen2.5-VL's exact template and its mtmd context under an image-token cap."""

    class Capped(base):  # type: ignore[misc, valid-type]
        # Jinja drops the template's final newline, so the stock handler prompts with
        # "<|im_start|>assistant" instead of the "<|im_start|>assistant\n" Qwen2.5-VL is trained on
        # (and the batched engine sends); an empty expression after it keeps the newline.
        CHAT_FORMAT = base.CHAT_FORMAT + "{{ '' }}"

        def _init_mtmd_context(self, llama_model: Any) -> None:
            if not isinstance(self._mtmd_cpp, _CappedMtmd):
                self._mtmd_cpp = _CappedMtmd(self._mtmd_cpp, image_max_tokens)
            super()._init_mtmd_context(llama_model)

    return Capped
