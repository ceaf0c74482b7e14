"""The default VLM engine: llama.cpp's low-level API, one image prefix shared by every prompt about
it, every live answer of every image in flight decoded together (DESIGN §7–8).

Per image: Pillow resizes it to the bundle's image-token budget (in the caller's thread), the engine
thread encodes it once with the vision tower and evaluates the shared prefix (system message + user
turn + image) into one sequence. Each prompt about the image copies that sequence (with its own KV stream
the copy is one memory copy of the prefix, not a second encode or prefill), prefills only its own
suffix, and joins the batch: one ``llama_decode`` per step advances every live sequence of every
image. New prompts and new images are admitted between steps, so answers that finish early make
room at once (continuous batching).

Why a KV stream per sequence and not one unified cache (where a copy is only cell metadata): in a
unified cache a sequence's cells land wherever space is free, so the order of the terms in the
attention sums, and with it the last bits of the logits, depends on what else is in flight. On a
random-weight model that flips near-tied tokens; on any model it makes an answer depend on the load.
Per-sequence streams give the same cell layout every time: the same image and prompt give the same
tokens alone, batched, or beside other threads' images (tested).

One thread owns the llama and mtmd contexts (neither is thread-safe); callers hand it work through a
queue and wait on futures, so any number of threads may use the engine at once. That thread's loop
and the state it keeps are :class:`~.batch_loop.DecodeLoop`.

KV budget: every sequence's stream holds ``ctx_per_image`` cells: the image prefix, a prompt's
suffix and its ``max_tokens``. A prompt that cannot fit fails alone (that prompt, not the batch).

Sequences: each image in flight reserves ``seqs_per_image`` of them when it is admitted (its prefix
and the prompts that may be live at once: 1 + 5 prompts x samples), and its prompts use only those,
waiting for one of them when all are busy. So an image's admission can never find the pool empty,
whatever the other images' prompts hold.

Faults: any exception in a step fails the prompts that step touched with a :class:`VLMError` naming
the cause, and the engine goes on serving; a failed ``llama_decode`` fails every prompt it fed,
prompts whose suffix spans several steps included. Non-finite logits fail their prompt. Should the
engine thread itself die, everything pending and everything submitted later fails at once: no
caller waits for ever.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from ..inputs.image import LoadedImage
from .base import EngineStats, Generation, ImageSession, VLMError, load_failure, load_llama_cpp, model_params
from .batch_loop import DecodeLoop
from .clock import EngineClock
from .grammar import GrammarFactory, build_tokenizer
from .image_tokens import IMAGE_MAX_TOKENS, budget, fit_image
from .loop_state import AskState, ImageState

SEQS_PER_IMAGE = 6  # the prefix + the paper's 5 prompts, one sample each
MAX_SEQUENCES = 256  # llama.cpp's limit on n_seq_max
PROMPTS_PER_IMAGE = 5  # cues, 3 RAG, direct


def seqs_per_image(samples_per_prompt: int = 1) -> int:
    """Sequences one image reserves for its whole need: its prefix + 5 prompts x samples."""
    return 1 + PROMPTS_PER_IMAGE * max(1, int(samples_per_prompt))


_SUFFIX = "{prompt}<|im_end|>\n<|im_start|>assistant\n"


def _flash(lib: Any, on: bool) -> int:
    """Flash attention on or off, never "auto": both engines must compute alike to agree token for
    token (it changes logits by ~1e-2 on the demo model; llama-cpp-python's ``Llama`` defaults to off)."""
    return lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if on else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED


class BatchSession(ImageSession):
    """Prompts about one image; :meth:`submit` returns at once with a future."""

    def __init__(self, engine: LlamaBatchEngine, image: ImageState) -> None:
        self._engine, self._image = engine, image

    def submit(
        self,
        prompt: str,
        *,
        schema: Mapping[str, Any] | None,
        max_tokens: int,
        seed: int | None = None,
        temperature: float | None = None,
    ) -> Future[Generation]:
        return self._engine._submit(self._image, prompt, schema, max_tokens, seed, temperature)

    def close(self) -> None:
        self._engine._close_image(self._image)


class LlamaBatchEngine:
    """Qwen2.5-VL (text GGUF + mmproj GGUF) on llama.cpp's low-level API, many images in flight.

    The callers' side: :meth:`open` an image, submit prompts, close; the engine thread's side is the
    :class:`~.batch_loop.DecodeLoop` it owns."""

    name = "batched"

    def __init__(
        self,
        model_path: Path,
        mmproj_path: Path,
        *,
        max_images: int = 4,
        ctx_per_image: int = 4096,
        samples_per_prompt: int = 1,
        n_batch: int = 2048,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        image_max_tokens: int = IMAGE_MAX_TOKENS,
        temperature: float = 0.0,
        seed: int = 0,
        flash_attn: bool = False,
        verbose: bool = False,
    ) -> None:
        self._lib, self._mtmd = load_llama_cpp(verbose)
        self.max_images = max(1, int(max_images))
        self.ctx_per_image = int(ctx_per_image)
        self.image_max_tokens = int(image_max_tokens)
        self.temperature, self.seed = temperature, seed
        self.stats = EngineStats()
        self.clock = EngineClock()
        self.n_threads = n_threads
        self.seqs_per_image = seqs_per_image(samples_per_prompt)
        n_seq = self._sequences(samples_per_prompt)
        self.model_params = model_params(self._lib, n_gpu_layers=n_gpu_layers)
        self._model = self._load_model(model_path)
        self._vocab = self._lib.llama_model_get_vocab(self._model)
        ctx = self._new_context(model_path, n_seq, int(n_batch), n_threads, flash_attn)
        mctx = self._new_mtmd(mmproj_path, ctx, n_gpu_layers, n_threads, flash_attn)
        self._grammars: dict[str, GrammarFactory] = {}
        self._grammar_lock = threading.Lock()
        self._lltokenizer: Any = None
        self._slots = threading.BoundedSemaphore(self.max_images)
        self._closed = False
        self._freed = False  # native contexts released (close() completed)
        self._start_loop(ctx, mctx, n_seq, int(n_batch))

    def _sequences(self, samples_per_prompt: int) -> int:
        """The sequences of every image in flight, refused above llama.cpp's limit."""
        n_seq = self.max_images * self.seqs_per_image
        if n_seq > MAX_SEQUENCES:
            raise VLMError(
                f"max_in_flight={self.max_images} with samples_per_prompt={samples_per_prompt} needs {n_seq} "
                f"sequences ({self.seqs_per_image} per image); llama.cpp allows {MAX_SEQUENCES}: at most "
                f"{MAX_SEQUENCES // self.seqs_per_image} images in flight at these samples"
            )
        return n_seq

    def _load_model(self, model_path: Path) -> Any:
        model = self._lib.llama_model_load_from_file(str(model_path).encode(), self.model_params)
        if not model:
            raise load_failure("model", model_path, Path(model_path).stat().st_size)
        return model

    def _new_context(self, model_path: Path, n_seq: int, n_batch: int, n_threads: int | None, flash_attn: bool) -> Any:
        """The llama context: one KV stream of ``ctx_per_image`` cells per sequence (not unified, so
        an answer does not depend on what else is in flight). On failure the model is freed."""
        lib = self._lib
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = self.ctx_per_image * n_seq  # one stream of ctx_per_image per sequence
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(512, n_batch)
        cparams.n_seq_max = n_seq
        cparams.kv_unified = False
        cparams.flash_attn_type = _flash(lib, flash_attn)
        if n_threads:
            cparams.n_threads = cparams.n_threads_batch = n_threads
        ctx = lib.llama_init_from_model(self._model, cparams)
        if not ctx:
            m = self._model  # read its shape before it is freed
            kv_dim = lib.llama_model_n_embd(m) // lib.llama_model_n_head(m) * lib.llama_model_n_head_kv(m)
            kv = cparams.n_ctx * lib.llama_model_n_layer(m) * kv_dim * 2 * 2  # K and V, f16
            lib.llama_model_free(m)
            self._model = None
            raise load_failure(
                f"KV cache ({cparams.n_ctx} cells: {self.max_images} images in flight x {self.seqs_per_image} "
                f"sequences x {self.ctx_per_image}) for",
                model_path,
                kv,
            )
        return ctx

    def _new_mtmd(self, mmproj_path: Path, ctx: Any, n_gpu_layers: int, n_threads: int | None, flash_attn: bool) -> Any:
        """The vision projector's context; on failure the llama context and the model are freed."""
        lib, mtmd = self._lib, self._mtmd
        tparams = mtmd.mtmd_context_params_default()
        tparams.use_gpu = n_gpu_layers != 0
        tparams.print_timings = False
        tparams.warmup = False
        if n_threads:
            tparams.n_threads = n_threads
        tparams.image_max_tokens = self.image_max_tokens
        tparams.flash_attn_type = _flash(lib, flash_attn)
        mctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), self._model, tparams)
        if not mctx:
            lib.llama_free(ctx)
            lib.llama_model_free(self._model)
            raise load_failure("vision projector", mmproj_path, Path(mmproj_path).stat().st_size)
        return mctx

    def _start_loop(self, ctx: Any, mctx: Any, n_seq: int, n_batch: int) -> None:
        """Hand the native contexts to the decode loop and start the engine thread on it."""
        self._loop = DecodeLoop(
            self._lib,
            self._mtmd,
            ctx=ctx,
            mctx=mctx,
            vocab=self._vocab,
            n_batch=n_batch,
            ctx_per_image=self.ctx_per_image,
            seqs_per_image=self.seqs_per_image,
            n_seq=n_seq,
            slots=self._slots,
            stats=self.stats,
            clock=self.clock,
        )
        self.n_vocab = self._loop.n_vocab
        self._thread = threading.Thread(target=self._loop.run, name="clue2geo-vlm", daemon=True)
        self._thread.start()

    @property
    def share_prefill(self) -> bool:
        """Whether a prompt copies the head of its suffix that another prompt about the same image
        has already evaluated (the three RAG prompts share ~350 of ~1,900 suffix tokens; samples of
        one prompt all but one). Off by default: the copied head was computed in another chunk, and
        that changes the last bits of what follows; on the synth 3B bundle one RAG answer of three
        took another near-tied token after 5 tokens, so an answer would depend on its siblings."""
        return self._loop.share_prefill

    @share_prefill.setter
    def share_prefill(self, on: bool) -> None:
        self._loop.share_prefill = bool(on)

    # -- callers' side (any thread) ----------------------------------------------------------------

    def open(self, image: LoadedImage, *, image_tokens: int = 0) -> BatchSession:
        """A session for one image (at most ``image_tokens`` vision tokens, 0: the engine's budget);
        blocks while ``max_images`` sessions are open."""
        dead = self._loop.dead
        if self._closed or dead is not None:
            raise VLMError(f"the VLM engine is {'closed' if self._closed else f'stopped ({dead})'}")
        img = fit_image(image.image, budget(self.image_max_tokens, image_tokens))
        self._slots.acquire()
        state = ImageState(rgb=img.tobytes(), size=img.size)
        if not self._loop.post("open", state):
            self._slots.release()
            raise VLMError(f"the VLM engine stopped ({self._loop.dead})")
        return BatchSession(self, state)

    def _submit(
        self,
        image: ImageState,
        prompt: str,
        schema: Mapping[str, Any] | None,
        max_tokens: int,
        seed: int | None,
        temperature: float | None,
    ) -> Future[Generation]:
        fut: Future[Generation] = Future()
        if self._closed or image.closed:
            fut.set_exception(VLMError("the session or engine is closed"))
            return fut
        try:
            temp = self.temperature if temperature is None else float(temperature)
            ask = AskState(
                image=image,
                suffix=self._tokenize(_SUFFIX.format(prompt=prompt)),
                max_tokens=int(max_tokens),
                temperature=temp,
                rng=np.random.default_rng(self.seed if seed is None else seed),
                grammar=self._grammar(schema).new() if schema is not None else None,
                future=fut,
                label=" ".join(prompt.split()[:6]),
            )
        except Exception as exc:  # a bad schema or prompt fails this answer, not the caller's thread
            fut.set_exception(exc if isinstance(exc, VLMError) else VLMError(f"the prompt was refused: {exc}"))
            return fut
        if not self._loop.post("ask", ask):
            fut.set_exception(VLMError(f"the VLM engine stopped ({self._loop.dead})"))
        return fut

    def _close_image(self, image: ImageState) -> None:
        """Cancel the image's pending prompts (they fail with a VLMError) and free its sequences."""
        if not image.closed:
            image.closed = True
            if not self._loop.post("close", image):
                self._slots.release()  # the engine thread is gone: nobody else will

    def close(self, timeout: float | None = None) -> None:
        """Finish: fail what is still queued, stop the engine thread, free the native contexts.

        With ``timeout``, a :class:`VLMError` is raised when the thread has not stopped in time (a
        native call still running); the native contexts are then left alone rather than freed in use."""
        if self._freed:
            return
        self._closed = True
        self._loop.post("stop", None)
        self._thread.join(timeout)
        if self._thread.is_alive():  # a later close() waits again and frees once the thread has ended
            raise VLMError(f"the VLM engine did not stop within {timeout} s (a native call is still running)")
        self._freed = True
        self._loop.free()
        self._lib.llama_model_free(self._model)

    def _grammar(self, schema: Mapping[str, Any]) -> GrammarFactory:
        key = json.dumps(dict(schema), sort_keys=True)
        with self._grammar_lock:
            if self._lltokenizer is None:
                self._lltokenizer = build_tokenizer(self._lib, self._vocab)
            if key not in self._grammars:
                self._grammars[key] = GrammarFactory(self._lltokenizer, schema)
            return self._grammars[key]

    def _tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (self._lib.llama_token * (len(data) + 8))()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, len(buf), False, True)
        if n < 0:
            raise VLMError(f"prompt could not be tokenized ({n})")
        return list(buf[:n])
