"""The batched engine's thread: its decode loop (the state it keeps per image and prompt: :mod:`.asks`).

One thread owns the llama and mtmd contexts (neither is thread-safe). Callers' threads hand it work
through :meth:`DecodeLoop.post` ("open" an image, "ask" a prompt, "close" an image, "stop"); between
decode steps the loop applies every queued command, admits waiting prompts while their image has a
free sequence, and runs one ``llama_decode`` over every live sequence (continuous batching).

Faults: any exception in a step fails the prompts that step touched with a :class:`VLMError` naming
the cause, and the loop goes on; should the loop itself break, everything pending and everything
posted later fails at once, so no caller waits for ever.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
import time
from concurrent.futures import InvalidStateError
from typing import Any

import numpy as np

from .base import EngineStats, Generation, VLMError
from .clock import EngineClock
from .grammar import GrammarError
from .loop_state import AskState, ImageState, shared_head
from .prefix import eval_prefix


class DecodeLoop:
    """The engine thread's body (:meth:`run`) and everything only that thread touches: the llama
    and mtmd contexts, the batch, the pool of free sequences. ``slots`` is the engine's cap on
    open images: the loop releases an image's slot when it frees the image."""

    def __init__(
        self,
        lib: Any,
        mtmd: Any,
        *,
        ctx: Any,
        mctx: Any,
        vocab: Any,
        n_batch: int,
        ctx_per_image: int,
        seqs_per_image: int,
        n_seq: int,
        slots: threading.BoundedSemaphore,
        stats: EngineStats,
        clock: EngineClock,
    ) -> None:
        self.lib, self.mtmd = lib, mtmd
        self.ctx, self.mctx, self.vocab = ctx, mctx, vocab
        self.n_vocab = lib.llama_vocab_n_tokens(vocab)
        self.mem = lib.llama_get_memory(ctx)
        self.n_batch = n_batch
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        self.ctx_per_image, self.seqs_per_image = ctx_per_image, seqs_per_image
        self.free_seqs = list(range(n_seq - 1, -1, -1))
        self.slots, self.stats, self.clock = slots, stats, clock
        # Copy a suffix head another prompt of the image already evaluated (off: see LlamaBatchEngine.share_prefill)
        self.share_prefill = False
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.dead: BaseException | None = None  # set when the loop has ended for good
        self._door = threading.Lock()  # orders "check dead, then enqueue" against the loop's last drain

    def post(self, cmd: str, obj: Any) -> bool:
        """Hand work to the engine thread; False when it has stopped for good (nothing was queued)."""
        with self._door:
            if self.dead is not None:
                return False
            self.inbox.put((cmd, obj))
            return True

    def free(self) -> None:
        """Release the native contexts (after the thread has ended)."""
        self.lib.llama_batch_free(self.batch)
        self.mtmd.mtmd_free(self.mctx)
        self.lib.llama_free(self.ctx)

    def run(self) -> None:
        """The thread's body: serve until "stop"; should serving itself break, fail everything
        pending and refuse later work (see :meth:`post`), so no caller waits for ever."""
        waiting: list[AskState] = []
        live: list[AskState] = []
        try:
            while self._serve(waiting, live):
                pass
        except BaseException as exc:  # given to every caller below and later; not re-raised in this thread
            self.dead = exc
        finally:
            with self._door:
                if self.dead is None:
                    self.dead = VLMError("the VLM engine was closed")
            dead = self.dead
            err = dead if isinstance(dead, VLMError) else VLMError(f"the VLM engine stopped: {dead!r}")
            for a in waiting + live:
                self._fail(a, err)
            self._drain(err)

    def _drain(self, err: VLMError) -> None:
        """Fail the prompts queued before the door closed, release the slots of queued closes."""
        while True:
            try:
                cmd, obj = self.inbox.get_nowait()
            except queue.Empty:
                return
            if cmd == "ask":
                self._fail(obj, err)
            elif cmd == "close":
                self.slots.release()

    def _serve(self, waiting: list[AskState], live: list[AskState]) -> bool:
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

    def _take_commands(self, waiting: list[AskState], live: list[AskState]) -> bool:
        """Apply every queued command (blocking for one when idle); False on "stop"."""
        idle = not waiting and not live
        try:
            cmd, obj = self.inbox.get() if idle else self.inbox.get_nowait()
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
                cmd, obj = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _eval_prefix(self, img: ImageState) -> None:
        """Reserve the image's sequences, then encode it once and evaluate system + user turn + image
        into the first of them. A failure fails this image alone; the loop and other images go on."""
        try:
            if len(self.free_seqs) < self.seqs_per_image:  # cannot happen: open images are capped
                raise VLMError(f"no {self.seqs_per_image} free sequences for the image ({len(self.free_seqs)})")
            img.owned = [self.free_seqs.pop() for _ in range(self.seqs_per_image)]
            img.seq, img.free = img.owned[0], img.owned[1:]
            n_past, n_tokens = self._encode_prefix(img)
            img.n_past, img.prefix_tokens = n_past, n_tokens
            self.stats.image_encodes += 1
            self.stats.prefix_tokens += n_tokens
        except Exception as exc:  # this image fails; the engine and other images go on
            img.error = exc if isinstance(exc, VLMError) else VLMError(f"image prefix failed: {exc!r}")
            if img.seq >= 0:
                self.lib.llama_memory_seq_rm(self.mem, img.seq, -1, -1)
        finally:
            img.rgb = b""

    def _encode_prefix(self, img: ImageState) -> tuple[int, int]:
        """The prefix into ``img.seq`` (:func:`~.prefix.eval_prefix`): (next position, prefix tokens)."""
        return eval_prefix(
            self.lib,
            self.mtmd,
            ctx=self.ctx,
            mctx=self.mctx,
            image=(img.rgb, img.size),
            seq=img.seq,
            n_batch=self.n_batch,
            limit=self.ctx_per_image,
            clock=self.clock,
        )

    def _release_image(self, img: ImageState) -> None:
        for seq in img.owned:
            self.lib.llama_memory_seq_rm(self.mem, seq, -1, -1)
        self.free_seqs.extend(img.owned)
        img.owned, img.free, img.seq = [], [], -1
        self.slots.release()

    def _admit(self, waiting: list[AskState], live: list[AskState]) -> list[AskState]:
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
                donor, shared = shared_head(a, live + rest) if self.share_prefill else (None, 0)
                if donor is not None and donor.evaluated < shared:
                    rest.append(a)  # its head is being evaluated by ``donor``: copy it once it is there
                elif a.future.set_running_or_notify_cancel():
                    self._start(a, donor, shared)
                    live.append(a)
            else:
                rest.append(a)
        return rest

    def _start(self, a: AskState, donor: AskState | None, shared: int) -> None:
        """Give ``a`` a sequence holding the image prefix (and ``donor``'s first ``shared`` suffix
        tokens, the same as ``a``'s), and queue the rest of its suffix."""
        img = a.image
        a.seq = img.free.pop()
        self.lib.llama_memory_seq_cp(self.mem, donor.seq if donor else img.seq, a.seq, -1, -1)
        if donor is not None:  # a stream is copied whole: drop what follows the shared head
            self.lib.llama_memory_seq_rm(self.mem, a.seq, img.n_past + shared, -1)
        a.pos, a.feed = img.n_past + shared, list(a.suffix[shared:])
        self.stats.suffix_tokens += len(a.feed)
        self.clock.shared_tokens += shared

    def _step(self, live: list[AskState]) -> None:
        """One ``llama_decode`` over every live sequence: pending prompt tokens and one new token each.
        A failed or raising decode fails every prompt it fed; a fault in one prompt's sampling fails it alone."""
        t0 = time.perf_counter()
        fed, outputs = self._fill_batch(live)
        self.stats.decode_calls += 1
        t1 = time.perf_counter()
        try:
            rc = self.lib.llama_decode(self.ctx, self.batch)
            if rc != 0:
                raise VLMError(f"llama_decode failed (code {rc}): the KV cache may be full")
        except Exception as exc:
            self.stats.faults += 1
            err = _fault(exc)
            for a, _, _ in fed:
                self._fail(a, err)
            return
        t2 = time.perf_counter()
        self._clock_step(fed, t2 - t1)
        for a, idx in outputs:
            try:
                self._advance(a, idx)
            except Exception as exc:
                self.stats.faults += 1
                self._fail(a, _fault(exc))
        host = (t1 - t0) + (time.perf_counter() - t2)
        self.clock.host_s += host
        if not any(prompt for _, _, prompt in fed):
            self.clock.decode_host_s += host

    def _clock_step(self, fed: list[tuple[AskState, int, bool]], seconds: float) -> None:
        """Count the step, and give each prompt its share of it (by the tokens it fed)."""
        n_prompt = sum(n for _, n, prompt in fed if prompt)
        total = sum(n for _, n, _ in fed) or 1
        self.clock.step(n_prompt, sum(n for _, n, prompt in fed if not prompt), seconds)
        for a, n, prompt in fed:
            if prompt:
                a.prefill_s += seconds * n / total
            else:
                a.decode_s += seconds * n / total

    def _fill_batch(self, live: list[AskState]) -> tuple[list[tuple[AskState, int, bool]], list[tuple[AskState, int]]]:
        """Put up to ``n_batch`` pending tokens of the live prompts into the batch: the prompts fed
        (with how many tokens, and whether they were prompt tokens), and the batch row whose logits
        each prompt that reached its last pending token samples from."""
        b = self.batch
        n, outputs, fed = 0, [], []
        for a in live:
            take = a.feed[: self.n_batch - n]
            if not take:
                continue
            fed.append((a, len(take), not a.out))
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
            if n >= self.n_batch:
                break
        b.n_tokens = n
        return fed, outputs

    def _advance(self, a: AskState, idx: int) -> None:
        """Sample ``a``'s next token from batch row ``idx``; finish it at end of generation or budget."""
        lib = self.lib
        ptr = lib.llama_get_logits_ith(self.ctx, idx)
        if not ptr:
            raise VLMError(f"llama.cpp returned no logits for batch row {idx}")
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
        try:
            tok = a.grammar.choose(logits, a.sample) if a.grammar else a.sample(logits)
        except GrammarError as exc:
            raise VLMError(str(exc)) from exc
        if lib.llama_vocab_is_eog(self.vocab, tok):
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
        n = self.lib.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _drop_seq(self, a: AskState) -> None:
        if a.seq >= 0:
            self.lib.llama_memory_seq_rm(self.mem, a.seq, -1, -1)
            if a.image.owned:  # back to its image's reservation (gone with the image once released)
                a.image.free.append(a.seq)
            a.seq = -1
        if a.grammar is not None:
            self.stats.grammar_checks += a.grammar.checks
            self.stats.grammar_full_masks += a.grammar.full_masks
            a.grammar.close()
            a.grammar = None

    def _finish(self, a: AskState, *, truncated: bool) -> None:
        constrained = a.grammar is not None
        self._drop_seq(a)
        if self.clock.trace:
            self.clock.asks.append(
                {
                    "label": a.label,
                    "suffix_tokens": len(a.suffix),
                    "generated": len(a.out),
                    "prefill_s": round(a.prefill_s, 4),
                    "decode_s": round(a.decode_s, 4),
                    "wall_s": round(time.perf_counter() - a.t0, 4),
                }
            )
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

    def _fail(self, a: AskState, exc: BaseException) -> None:
        self._drop_seq(a)
        with contextlib.suppress(InvalidStateError):  # the caller may cancel it at any moment
            a.future.set_exception(exc)


def _fault(exc: BaseException) -> VLMError:
    """The error a prompt fails with when a step broke: the cause named, a VLMError kept as it is."""
    if isinstance(exc, VLMError):
        return exc
    return VLMError(f"the VLM engine failed while answering ({type(exc).__name__}: {exc}); the engine goes on")
