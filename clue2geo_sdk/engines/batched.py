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
queue and wait on futures, so any number of threads may use the engine at once.

KV budget: every sequence's stream holds ``ctx_per_image`` cells: the image prefix, a prompt's
suffix and its ``max_tokens``. A prompt that cannot fit fails alone (that prompt, not the batch);
prompts wait for a free sequence (``max_images`` x 6: the prefix and 5 prompts per image).
"""

from __future__ import annotations

import ctypes
import json
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..image import LoadedImage
from ..image_tokens import IMAGE_MAX_TOKENS, fit_image
from .base import SYSTEM_PROMPT, EngineStats, Generation, ImageSession, VLMError, load_failure, load_llama_cpp
from .grammar import CheckFirstGrammar, GrammarError, GrammarFactory, build_tokenizer

SEQS_PER_IMAGE = 6  # the prefix + cues and 3 RAG at once, then direct / re-asks / samples as they free up
MAX_SEQUENCES = 256  # llama.cpp's limit on n_seq_max
_PREFIX = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{marker}"
_SUFFIX = "{prompt}<|im_end|>\n<|im_start|>assistant\n"


@attrs.define(eq=False)
class _Image:
    rgb: bytes
    size: tuple[int, int]
    seq: int = -1
    n_past: int = 0  # next position after the prefix (M-RoPE: not the token count)
    prefix_tokens: int = 0
    error: BaseException | None = None
    closed: bool = False


@attrs.define(eq=False)
class _Ask:
    image: _Image
    suffix: list[int]
    max_tokens: int
    temperature: float
    rng: np.random.Generator
    grammar: CheckFirstGrammar | None
    future: Future[Generation]
    t0: float = attrs.field(factory=time.perf_counter)
    seq: int = -1
    pos: int = 0
    feed: list[int] = attrs.field(factory=list)
    out: list[int] = attrs.field(factory=list)
    text: bytearray = attrs.field(factory=bytearray)

    @property
    def cost(self) -> int:
        return len(self.suffix) + self.max_tokens

    def sample(self, logits: np.ndarray) -> int:
        """Greedy at temperature 0 (ties to the lowest id, as llama.cpp's greedy sampler), else a
        draw from the softmax at the temperature with this prompt's own seeded generator."""
        if self.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        p = np.exp(z - z[np.isfinite(z)].max())
        return int(self.rng.choice(len(p), p=p / p.sum()))


def _flash(lib: Any, on: bool) -> int:
    """Flash attention on or off, never "auto": both engines must compute alike to agree token for
    token (it changes logits by ~1e-2 on the demo model; llama-cpp-python's ``Llama`` defaults to off)."""
    return lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if on else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED


class BatchSession(ImageSession):
    """Prompts about one image; :meth:`submit` returns at once with a future."""

    def __init__(self, engine: LlamaBatchEngine, image: _Image) -> None:
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
    """Qwen2.5-VL (text GGUF + mmproj GGUF) on llama.cpp's low-level API, many images in flight."""

    name = "batched"

    def __init__(
        self,
        model_path: Path,
        mmproj_path: Path,
        *,
        max_images: int = 4,
        ctx_per_image: int = 4096,
        n_batch: int = 2048,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        image_max_tokens: int = IMAGE_MAX_TOKENS,
        temperature: float = 0.0,
        seed: int = 0,
        flash_attn: bool = False,
        verbose: bool = False,
    ) -> None:
        lib, mtmd = load_llama_cpp(verbose)
        self._lib, self._mtmd = lib, mtmd
        self.max_images = max(1, int(max_images))
        self.ctx_per_image = int(ctx_per_image)
        self.image_max_tokens = int(image_max_tokens)
        self.temperature, self.seed = temperature, seed
        self.stats = EngineStats()
        self._n_batch = int(n_batch)
        n_seq = self.max_images * SEQS_PER_IMAGE
        if n_seq > MAX_SEQUENCES:
            raise ValueError(
                f"max_images={self.max_images} needs {n_seq} sequences; llama.cpp allows {MAX_SEQUENCES} "
                f"({MAX_SEQUENCES // SEQS_PER_IMAGE} images in flight at most)"
            )

        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        self._model = lib.llama_model_load_from_file(str(model_path).encode(), mparams)
        if not self._model:
            raise load_failure("model", model_path, Path(model_path).stat().st_size)
        self._vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = lib.llama_vocab_n_tokens(self._vocab)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = self.ctx_per_image * n_seq  # one stream of ctx_per_image per sequence
        cparams.n_batch = self._n_batch
        cparams.n_ubatch = min(512, self._n_batch)
        cparams.n_seq_max = n_seq
        cparams.kv_unified = False
        cparams.flash_attn_type = _flash(lib, flash_attn)
        if n_threads:
            cparams.n_threads = cparams.n_threads_batch = n_threads
        self._ctx = lib.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lib.llama_model_free(self._model)
            m = self._model
            kv_dim = lib.llama_model_n_embd(m) // lib.llama_model_n_head(m) * lib.llama_model_n_head_kv(m)
            kv = cparams.n_ctx * lib.llama_model_n_layer(m) * kv_dim * 2 * 2  # K and V, f16
            raise load_failure(
                f"KV cache ({cparams.n_ctx} cells: {self.max_images} images in flight x {SEQS_PER_IMAGE} "
                f"sequences x {self.ctx_per_image}) for",
                model_path,
                kv,
            )
        self._mem = lib.llama_get_memory(self._ctx)
        tparams = mtmd.mtmd_context_params_default()
        tparams.use_gpu = n_gpu_layers != 0
        tparams.print_timings = False
        tparams.warmup = False
        if n_threads:
            tparams.n_threads = n_threads
        tparams.image_max_tokens = self.image_max_tokens
        tparams.flash_attn_type = _flash(lib, flash_attn)
        self._mctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), self._model, tparams)
        if not self._mctx:
            lib.llama_free(self._ctx)
            lib.llama_model_free(self._model)
            raise load_failure("vision projector", mmproj_path, Path(mmproj_path).stat().st_size)
        self._marker = mtmd.mtmd_default_marker().decode()
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)
        self._free_seqs = list(range(n_seq - 1, -1, -1))
        self._grammars: dict[str, GrammarFactory] = {}
        self._grammar_lock = threading.Lock()
        self._lltokenizer: Any = None
        self._slots = threading.BoundedSemaphore(self.max_images)
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="clue2geo-vlm", daemon=True)
        self._thread.start()

    # -- callers' side (any thread) ----------------------------------------------------------------

    def open(self, image: LoadedImage) -> BatchSession:
        """A session for one image; blocks while ``max_images`` sessions are open."""
        if self._closed:
            raise VLMError("the VLM engine is closed")
        img = fit_image(image.image, self.image_max_tokens)
        self._slots.acquire()
        state = _Image(rgb=img.tobytes(), size=img.size)
        self._inbox.put(("open", state))
        return BatchSession(self, state)

    def _submit(
        self,
        image: _Image,
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
        temp = self.temperature if temperature is None else float(temperature)
        ask = _Ask(
            image=image,
            suffix=self._tokenize(_SUFFIX.format(prompt=prompt)),
            max_tokens=int(max_tokens),
            temperature=temp,
            rng=np.random.default_rng(self.seed if seed is None else seed),
            grammar=self._grammar(schema).new() if schema is not None else None,
            future=fut,
        )
        self._inbox.put(("ask", ask))
        return fut

    def _close_image(self, image: _Image) -> None:
        if not image.closed:
            image.closed = True
            self._inbox.put(("close", image))

    def close(self) -> None:
        """Finish: fail what is still queued, stop the engine thread, free the native contexts."""
        if self._closed:
            return
        self._closed = True
        self._inbox.put(("stop", None))
        self._thread.join()
        self._lib.llama_batch_free(self._batch)
        self._mtmd.mtmd_free(self._mctx)
        self._lib.llama_free(self._ctx)
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

    # -- the engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        waiting: list[_Ask] = []
        live: list[_Ask] = []
        while True:
            idle = not waiting and not live
            try:
                cmd, obj = self._inbox.get() if idle else self._inbox.get_nowait()
            except queue.Empty:
                cmd, obj = "", None
            while cmd:
                if cmd == "stop":
                    err = VLMError("the VLM engine was closed")
                    for a in waiting + live:
                        self._fail(a, err)
                    return
                if cmd == "open":
                    self._eval_prefix(obj)
                elif cmd == "ask":
                    waiting.append(obj)
                elif cmd == "close":
                    for a in [a for a in waiting + live if a.image is obj]:
                        self._fail(a, VLMError("the image's session was closed before the answer"))
                    waiting = [a for a in waiting if a.image is not obj]
                    live = [a for a in live if a.image is not obj]
                    self._release_image(obj)
                try:
                    cmd, obj = self._inbox.get_nowait()
                except queue.Empty:
                    cmd = ""
            waiting = self._admit(waiting, live)
            if live:
                self._step(live)
                live[:] = [a for a in live if not a.future.done()]

    def _eval_prefix(self, img: _Image) -> None:
        """Encode the image once and evaluate system + user turn + image into the image's sequence."""
        lib, mtmd = self._lib, self._mtmd
        try:
            img.seq = self._free_seqs.pop()
            rgb = (ctypes.c_uint8 * len(img.rgb)).from_buffer_copy(img.rgb)
            bitmap = mtmd.mtmd_bitmap_init(img.size[0], img.size[1], rgb)
            text = _PREFIX.format(system=SYSTEM_PROMPT, marker=self._marker).encode()
            inp = mtmd.mtmd_input_text()
            inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), True, True
            chunks = mtmd.mtmd_input_chunks_init()
            try:
                arr = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
                rc = mtmd.mtmd_tokenize(self._mctx, chunks, ctypes.byref(inp), arr, 1)
                if rc != 0:
                    raise VLMError(f"mtmd could not tokenize the image prompt (code {rc})")
                n_tokens = mtmd.mtmd_helper_get_n_tokens(chunks)
                if n_tokens >= self.ctx_per_image:
                    raise VLMError(
                        f"the image prefix needs {n_tokens} tokens, more than the {self.ctx_per_image} "
                        "reserved per image; lower image_max_tokens or raise ctx_per_image"
                    )
                new_n_past = lib.llama_pos(0)
                rc = mtmd.mtmd_helper_eval_chunks(
                    self._mctx, self._ctx, chunks, 0, img.seq, self._n_batch, False, ctypes.byref(new_n_past)
                )
                if rc != 0:
                    raise VLMError(f"the image could not be encoded/evaluated (mtmd code {rc})")
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
                mtmd.mtmd_bitmap_free(bitmap)
            img.n_past, img.prefix_tokens = int(new_n_past.value), int(n_tokens)
            self.stats.image_encodes += 1
            self.stats.prefix_tokens += int(n_tokens)
        except BaseException as exc:  # this image fails; the engine and other images go on
            img.error = exc if isinstance(exc, VLMError) else VLMError(f"image prefix failed: {exc}")
            if img.seq >= 0:
                lib.llama_memory_seq_rm(self._mem, img.seq, -1, -1)
        finally:
            img.rgb = b""

    def _release_image(self, img: _Image) -> None:
        if img.seq >= 0:
            self._lib.llama_memory_seq_rm(self._mem, img.seq, -1, -1)
            self._free_seqs.append(img.seq)
            img.seq = -1
        self._slots.release()

    def _admit(self, waiting: list[_Ask], live: list[_Ask]) -> list[_Ask]:
        """Start waiting prompts while sequences are free (FIFO); fail those that can never fit."""
        rest = []
        for a in waiting:
            img = a.image
            if img.error is not None:
                self._fail(a, VLMError(f"the image could not be processed: {img.error}"))
            elif img.prefix_tokens + a.cost > self.ctx_per_image:
                self._fail(
                    a,
                    VLMError(
                        f"the prompt needs {len(a.suffix)} + {a.max_tokens} tokens after an image prefix of "
                        f"{img.prefix_tokens}, more than the {self.ctx_per_image} per image (ctx_per_image)"
                    ),
                )
            elif self._free_seqs:
                a.seq = self._free_seqs.pop()
                self._lib.llama_memory_seq_cp(self._mem, img.seq, a.seq, -1, -1)
                a.pos, a.feed = img.n_past, list(a.suffix)
                self.stats.suffix_tokens += len(a.suffix)
                live.append(a)
            else:
                rest.append(a)
        return rest

    def _step(self, live: list[_Ask]) -> None:
        """One ``llama_decode`` over every live sequence: pending prompt tokens and one new token each."""
        lib, b = self._lib, self._batch
        n, outputs = 0, []
        for a in live:
            take = a.feed[: self._n_batch - n]
            if not take:
                continue
            for i, tok in enumerate(take):
                b.token[n], b.pos[n], b.n_seq_id[n] = tok, a.pos + i, 1
                b.seq_id[n][0] = a.seq
                last = i == len(take) - 1 and len(take) == len(a.feed)
                b.logits[n] = last
                if last:
                    outputs.append((a, n))
                n += 1
            a.pos += len(take)
            a.feed = a.feed[len(take) :]
            if n >= self._n_batch:
                break
        b.n_tokens = n
        rc = lib.llama_decode(self._ctx, b)
        self.stats.decode_calls += 1
        if rc != 0:
            err = VLMError(f"llama_decode failed (code {rc}): the KV cache may be full")
            for a in {id(a): a for a, _ in outputs}.values():
                self._fail(a, err)
            return
        for a, idx in outputs:
            try:
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx, idx), shape=(self.n_vocab,))
                tok = a.grammar.choose(logits, a.sample) if a.grammar else a.sample(logits)
            except GrammarError as exc:
                self._fail(a, VLMError(str(exc)))
                continue
            if lib.llama_vocab_is_eog(self._vocab, tok):
                self._finish(a, truncated=False)
                continue
            a.out.append(tok)
            a.text += self._piece(tok)
            self.stats.generated_tokens += 1
            if len(a.out) >= a.max_tokens:
                self._finish(a, truncated=True)
            else:
                a.feed = [tok]

    def _piece(self, tok: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _drop_seq(self, a: _Ask) -> None:
        if a.seq >= 0:
            self._lib.llama_memory_seq_rm(self._mem, a.seq, -1, -1)
            self._free_seqs.append(a.seq)
            a.seq = -1
        if a.grammar is not None:
            self.stats.grammar_checks += a.grammar.checks
            self.stats.grammar_full_masks += a.grammar.full_masks
            a.grammar.close()
            a.grammar = None

    def _finish(self, a: _Ask, *, truncated: bool) -> None:
        constrained = a.grammar is not None
        self._drop_seq(a)
        a.future.set_result(
            Generation(
                text=a.text.decode("utf-8", errors="replace"),
                constrained=constrained,
                tokens=len(a.out),
                seconds=time.perf_counter() - a.t0,
                truncated=truncated,
                prompt_tokens=len(a.suffix),
            )
        )

    def _fail(self, a: _Ask, exc: BaseException) -> None:
        self._drop_seq(a)
        if not a.future.done():
            a.future.set_exception(exc)
