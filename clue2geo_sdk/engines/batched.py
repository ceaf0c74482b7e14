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

import contextlib
import ctypes
import json
import queue
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, InvalidStateError
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from ..inputs.image import LoadedImage
from .base import (
    SYSTEM_PROMPT,
    EngineStats,
    Generation,
    ImageSession,
    VLMError,
    load_failure,
    load_llama_cpp,
    model_params,
)
from .grammar import CheckFirstGrammar, GrammarError, GrammarFactory, build_tokenizer
from .image_tokens import IMAGE_MAX_TOKENS, fit_image

SEQS_PER_IMAGE = 6  # the prefix + the paper's 5 prompts, one sample each
MAX_SEQUENCES = 256  # llama.cpp's limit on n_seq_max
PROMPTS_PER_IMAGE = 5  # cues, 3 RAG, direct


def seqs_per_image(samples_per_prompt: int = 1) -> int:
    """Sequences one image reserves for its whole need: its prefix + 5 prompts x samples."""
    return 1 + PROMPTS_PER_IMAGE * max(1, int(samples_per_prompt))


_PREFIX = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{marker}"
_SUFFIX = "{prompt}<|im_end|>\n<|im_start|>assistant\n"


@attrs.define(eq=False)
class _Image:
    rgb: bytes
    size: tuple[int, int]
    seq: int = -1
    owned: list[int] = attrs.field(factory=list)  # every sequence reserved for this image
    free: list[int] = attrs.field(factory=list)  # those its prompts may take now
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
        draw from the softmax at the temperature with this prompt's own seeded generator.
        NaN logits (numpy's argmax picks a NaN) or no finite logit raise a :class:`VLMError`."""
        if self.temperature <= 0:
            tok = int(np.argmax(logits))
            if not np.isfinite(logits[tok]):
                raise VLMError("the model produced non-finite logits (NaN); the answer was stopped")
            return tok
        z = logits.astype(np.float64) / self.temperature
        finite = np.isfinite(z)
        if np.isnan(z).any() or not finite.any():
            raise VLMError("the model produced non-finite logits (NaN or all -inf); the answer was stopped")
        p = np.exp(z - z[finite].max())
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
        lib, mtmd = load_llama_cpp(verbose)
        self._lib, self._mtmd = lib, mtmd
        self.max_images = max(1, int(max_images))
        self.ctx_per_image = int(ctx_per_image)
        self.image_max_tokens = int(image_max_tokens)
        self.temperature, self.seed = temperature, seed
        self.stats = EngineStats()
        self._n_batch = int(n_batch)
        self.seqs_per_image = seqs_per_image(samples_per_prompt)
        n_seq = self.max_images * self.seqs_per_image
        if n_seq > MAX_SEQUENCES:
            raise VLMError(
                f"max_in_flight={self.max_images} with samples_per_prompt={samples_per_prompt} needs {n_seq} "
                f"sequences ({self.seqs_per_image} per image); llama.cpp allows {MAX_SEQUENCES}: at most "
                f"{MAX_SEQUENCES // self.seqs_per_image} images in flight at these samples"
            )

        self.model_params = model_params(lib, n_gpu_layers=n_gpu_layers)
        self._model = lib.llama_model_load_from_file(str(model_path).encode(), self.model_params)
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
        self._freed = False  # native contexts released (close() completed)
        self._dead: BaseException | None = None  # set when the engine thread has ended for good
        self._door = threading.Lock()  # orders "check dead, then enqueue" against the thread's last drain
        self._thread = threading.Thread(target=self._run, name="clue2geo-vlm", daemon=True)
        self._thread.start()

    # -- callers' side (any thread) ----------------------------------------------------------------

    def open(self, image: LoadedImage) -> BatchSession:
        """A session for one image; blocks while ``max_images`` sessions are open."""
        if self._closed or self._dead is not None:
            raise VLMError(f"the VLM engine is {'closed' if self._closed else f'stopped ({self._dead})'}")
        img = fit_image(image.image, self.image_max_tokens)
        self._slots.acquire()
        state = _Image(rgb=img.tobytes(), size=img.size)
        if not self._post("open", state):
            self._slots.release()
            raise VLMError(f"the VLM engine stopped ({self._dead})")
        return BatchSession(self, state)

    def _post(self, cmd: str, obj: Any) -> bool:
        """Hand work to the engine thread; False when it has stopped for good (nothing was queued)."""
        with self._door:
            if self._dead is not None:
                return False
            self._inbox.put((cmd, obj))
            return True

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
        try:
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
        except Exception as exc:  # a bad schema or prompt fails this answer, not the caller's thread
            fut.set_exception(exc if isinstance(exc, VLMError) else VLMError(f"the prompt was refused: {exc}"))
            return fut
        if not self._post("ask", ask):
            fut.set_exception(VLMError(f"the VLM engine stopped ({self._dead})"))
        return fut

    def _close_image(self, image: _Image) -> None:
        """Cancel the image's pending prompts (they fail with a VLMError) and free its sequences."""
        if not image.closed:
            image.closed = True
            if not self._post("close", image):
                self._slots.release()  # the engine thread is gone: nobody else will

    def close(self, timeout: float | None = None) -> None:
        """Finish: fail what is still queued, stop the engine thread, free the native contexts.

        With ``timeout``, a :class:`VLMError` is raised when the thread has not stopped in time (a
        native call still running); the native contexts are then left alone rather than freed in use."""
        if self._freed:
            return
        self._closed = True
        self._post("stop", None)
        self._thread.join(timeout)
        if self._thread.is_alive():  # a later close() waits again and frees once the thread has ended
            raise VLMError(f"the VLM engine did not stop within {timeout} s (a native call is still running)")
        self._freed = True
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

    def _run(self) -> None:
        """The thread's body: serve until "stop"; should serving itself break, fail everything
        pending and refuse later work (see :meth:`_post`), so no caller waits for ever."""
        waiting: list[_Ask] = []
        live: list[_Ask] = []
        try:
            while self._serve(waiting, live):
                pass
        except BaseException as exc:  # given to every caller below and later; not re-raised in this thread
            self._dead = exc
        finally:
            with self._door:
                if self._dead is None:
                    self._dead = VLMError("the VLM engine was closed")
            dead = self._dead
            err = dead if isinstance(dead, VLMError) else VLMError(f"the VLM engine stopped: {dead!r}")
            for a in waiting + live:
                self._fail(a, err)
            self._drain(err)

    def _drain(self, err: VLMError) -> None:
        """Fail the prompts queued before the door closed, release the slots of queued closes."""
        while True:
            try:
                cmd, obj = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd == "ask":
                self._fail(obj, err)
            elif cmd == "close":
                self._slots.release()

    def _serve(self, waiting: list[_Ask], live: list[_Ask]) -> bool:
        """Take commands, admit prompts, run one step. False on "stop". A fault anywhere fails the
        prompts it touched (all in flight, if it cannot be narrowed) and serving goes on."""
        try:
            if not self._take_commands(waiting, live):
                err = VLMError("the VLM engine was closed")
                for a in waiting + live:
                    self._fail(a, err)
                waiting.clear()
                live.clear()
                return False
            waiting[:] = self._admit(waiting, live)
            if live:
                self._step(live)
                live[:] = [a for a in live if not a.future.done()]
        except Exception as exc:
            self.stats.faults += 1
            err = _fault(exc)
            for a in waiting + live:
                self._fail(a, err)
            waiting.clear()
            live.clear()
        return True

    def _take_commands(self, waiting: list[_Ask], live: list[_Ask]) -> bool:
        """Apply every queued command (blocking for one when idle); False on "stop"."""
        idle = not waiting and not live
        try:
            cmd, obj = self._inbox.get() if idle else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd == "stop":
                return False
            if cmd == "open":
                self._eval_prefix(obj)
            elif cmd == "ask":
                waiting.append(obj)
            elif cmd == "close":
                err = VLMError("the image's session was closed before the answer")
                for a in [a for a in waiting + live if a.image is obj]:
                    self._fail(a, err)
                waiting[:] = [a for a in waiting if a.image is not obj]
                live[:] = [a for a in live if a.image is not obj]
                self._release_image(obj)
            try:
                cmd, obj = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _eval_prefix(self, img: _Image) -> None:
        """Reserve the image's sequences, encode it once and evaluate system + user turn + image
        into the first of them."""
        lib, mtmd = self._lib, self._mtmd
        try:
            if len(self._free_seqs) < self.seqs_per_image:  # cannot happen: open images are capped
                raise VLMError(f"no {self.seqs_per_image} free sequences for the image ({len(self._free_seqs)})")
            img.owned = [self._free_seqs.pop() for _ in range(self.seqs_per_image)]
            img.seq, img.free = img.owned[0], img.owned[1:]
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
        except Exception as exc:  # this image fails; the engine and other images go on
            img.error = exc if isinstance(exc, VLMError) else VLMError(f"image prefix failed: {exc!r}")
            if img.seq >= 0:
                lib.llama_memory_seq_rm(self._mem, img.seq, -1, -1)
        finally:
            img.rgb = b""

    def _release_image(self, img: _Image) -> None:
        for seq in img.owned:
            self._lib.llama_memory_seq_rm(self._mem, seq, -1, -1)
        self._free_seqs.extend(img.owned)
        img.owned, img.free, img.seq = [], [], -1
        self._slots.release()

    def _admit(self, waiting: list[_Ask], live: list[_Ask]) -> list[_Ask]:
        """Start waiting prompts while their image has a free sequence (FIFO); fail those that can
        never fit; drop those the caller cancelled."""
        rest = []
        for a in waiting:
            img = a.image
            if a.future.done():  # cancelled by the caller
                continue
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
            elif img.free:
                if not a.future.set_running_or_notify_cancel():
                    continue
                a.seq = img.free.pop()
                self._lib.llama_memory_seq_cp(self._mem, img.seq, a.seq, -1, -1)
                a.pos, a.feed = img.n_past, list(a.suffix)
                self.stats.suffix_tokens += len(a.suffix)
                live.append(a)
            else:
                rest.append(a)
        return rest

    def _step(self, live: list[_Ask]) -> None:
        """One ``llama_decode`` over every live sequence: pending prompt tokens and one new token each.
        A failed or raising decode fails every prompt it fed; a fault in one prompt's sampling fails it alone."""
        lib, b = self._lib, self._batch
        n, outputs, fed = 0, [], []
        for a in live:
            take = a.feed[: self._n_batch - n]
            if not take:
                continue
            fed.append(a)
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
        self.stats.decode_calls += 1
        try:
            rc = lib.llama_decode(self._ctx, b)
            if rc != 0:
                raise VLMError(f"llama_decode failed (code {rc}): the KV cache may be full")
        except Exception as exc:
            self.stats.faults += 1
            err = _fault(exc)
            for a in fed:
                self._fail(a, err)
            return
        for a, idx in outputs:
            try:
                self._advance(a, idx)
            except Exception as exc:
                self.stats.faults += 1
                self._fail(a, _fault(exc))

    def _advance(self, a: _Ask, idx: int) -> None:
        """Sample ``a``'s next token from batch row ``idx``; finish it at end of generation or budget."""
        lib = self._lib
        ptr = lib.llama_get_logits_ith(self._ctx, idx)
        if not ptr:
            raise VLMError(f"llama.cpp returned no logits for batch row {idx}")
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        try:
            tok = a.grammar.choose(logits, a.sample) if a.grammar else a.sample(logits)
        except GrammarError as exc:
            raise VLMError(str(exc)) from exc
        if lib.llama_vocab_is_eog(self._vocab, tok):
            self._finish(a, truncated=False)
            return
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
            if a.image.owned:  # back to its image's reservation (gone with the image once released)
                a.image.free.append(a.seq)
            a.seq = -1
        if a.grammar is not None:
            self.stats.grammar_checks += a.grammar.checks
            self.stats.grammar_full_masks += a.grammar.full_masks
            a.grammar.close()
            a.grammar = None

    def _finish(self, a: _Ask, *, truncated: bool) -> None:
        constrained = a.grammar is not None
        self._drop_seq(a)
        with contextlib.suppress(InvalidStateError):  # cancelled by the caller meanwhile
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
        with contextlib.suppress(InvalidStateError):  # the caller may cancel it at any moment
            a.future.set_exception(exc)


def _fault(exc: BaseException) -> VLMError:
    """The error a prompt fails with when a step broke: the cause named, a VLMError kept as it is."""
    if isinstance(exc, VLMError):
        return exc
    return VLMError(f"the VLM engine failed while answering ({type(exc).__name__}: {exc}); the engine goes on")
