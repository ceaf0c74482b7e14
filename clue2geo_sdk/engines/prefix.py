"""One image's shared prefix (system turn + user turn + image) into one sequence, with the vision
tower timed apart from the language model's prefill of the prefix.

The chunks are evaluated one by one, as ``mtmd_helper_eval_chunks`` does (text chunks through
``mtmd_helper_eval_chunk_single``; the image chunk encoded, then its embeddings decoded), so the
numbers are the same; only the clock between the two halves of the image chunk is new.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any

from .base import SYSTEM_PROMPT, VLMError
from .clock import EngineClock

PREFIX = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{marker}"


def eval_prefix(
    lib: Any,
    mtmd: Any,
    *,
    ctx: Any,
    mctx: Any,
    image: tuple[bytes, tuple[int, int]],
    seq: int,
    n_batch: int,
    limit: int,
    clock: EngineClock,
) -> tuple[int, int]:
    """Tokenize and evaluate the prefix of ``image`` (RGB bytes, size) into ``seq``: (next position,
    prefix tokens). More than ``limit`` tokens is a :class:`VLMError`."""
    rgb_bytes, (width, height) = image
    rgb = (ctypes.c_uint8 * len(rgb_bytes)).from_buffer_copy(rgb_bytes)
    bitmap = mtmd.mtmd_bitmap_init(width, height, rgb)
    text = PREFIX.format(system=SYSTEM_PROMPT, marker=mtmd.mtmd_default_marker().decode()).encode()
    inp = mtmd.mtmd_input_text()
    inp.text, inp.text_len, inp.add_special, inp.parse_special = text, len(text), True, True
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        arr = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = mtmd.mtmd_tokenize(mctx, chunks, ctypes.byref(inp), arr, 1)
        if rc != 0:
            raise VLMError(f"mtmd could not tokenize the image prompt (code {rc})")
        n_tokens = mtmd.mtmd_helper_get_n_tokens(chunks)
        if n_tokens >= limit:
            raise VLMError(
                f"the image prefix needs {n_tokens} tokens, more than the {limit} "
                "reserved per image; lower image_max_tokens or raise ctx_per_image"
            )
        n_past, vision = 0, 0.0
        t0 = time.perf_counter()
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            n_past, seconds = _eval_chunk(lib, mtmd, ctx, mctx, chunk, n_past, seq, n_batch)
            vision += seconds
        clock.vision_s += vision
        clock.prefix_s += time.perf_counter() - t0 - vision
        clock.prefix_tokens += int(n_tokens)
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
    return n_past, int(n_tokens)


def _eval_chunk(
    lib: Any, mtmd: Any, ctx: Any, mctx: Any, chunk: Any, n_past: int, seq: int, n_batch: int
) -> tuple[int, float]:
    """One chunk into ``seq`` from ``n_past``: the next position, and the vision tower's seconds."""
    new_n_past = lib.llama_pos(n_past)  # the helper adds the chunk's positions to it
    if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
        rc = mtmd.mtmd_helper_eval_chunk_single(mctx, ctx, chunk, n_past, seq, n_batch, False, ctypes.byref(new_n_past))
        if rc != 0:
            raise VLMError(f"the prompt text before the image could not be evaluated (mtmd code {rc})")
        return int(new_n_past.value), 0.0
    t0 = time.perf_counter()
    rc = mtmd.mtmd_encode_chunk(mctx, chunk)
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise VLMError(f"the image could not be encoded (mtmd code {rc})")
    embd = mtmd.mtmd_get_output_embd(mctx)
    rc = mtmd.mtmd_helper_decode_image_chunk(
        mctx, ctx, chunk, embd, n_past, seq, n_batch, ctypes.byref(new_n_past), _no_callback(mtmd), None
    )
    if rc != 0:
        raise VLMError(f"the image could not be evaluated (mtmd code {rc})")
    return n_past + int(mtmd.mtmd_input_chunk_get_n_pos(chunk)), seconds  # M-RoPE: positions, not tokens


def _no_callback(mtmd: Any) -> Any:
    """A NULL post-decode callback (what ``mtmd_helper_eval_chunk_single`` passes)."""
    return ctypes.cast(None, mtmd.mtmd_helper_post_decode_callback)
