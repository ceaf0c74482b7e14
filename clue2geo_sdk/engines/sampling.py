"""The next token from one sequence's logits row: greedy at temperature 0, else a draw from the
softmax at the temperature with the prompt's own seeded generator.

Why not ``Generator.choice(p=...)``: over a 152k vocabulary its float64 softmax and cumulative sum
cost 3.3 ms a draw, more than a GPU's decode step. Here the softmax is float32 (numpy's SIMD ``exp``)
and the inverse-CDF draw walks two levels: the cumulative sums of blocks of ``BLOCK`` tokens, then
the tokens of the one block the draw lands in (0.16 ms a draw; docs/speed.md).
The distribution is the same (up to float32 rounding of each probability); the random stream is not
``choice``'s, so a seed gives other samples than the engine's first versions, and the same ones every time.
"""

from __future__ import annotations

import numpy as np

from .base import VLMError

BLOCK = 128  # tokens per block of the two-level draw (divides Qwen's 151,936)


def sample_token(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """Greedy at ``temperature`` <= 0 (ties to the lowest id, as llama.cpp's greedy sampler), else
    a draw from the softmax at ``temperature``. NaN logits, or no finite best logit, raise a
    :class:`VLMError`."""
    if temperature <= 0:
        tok = int(np.argmax(logits))  # a NaN anywhere is picked here, and caught below
        if not np.isfinite(logits[tok]):
            raise VLMError("the model produced non-finite logits (NaN); the answer was stopped")
        return tok
    z = np.asarray(logits, dtype=np.float32) * np.float32(1.0 / temperature)  # a new array: the row is llama.cpp's
    top = z.max()  # NaN when any logit is NaN
    if not np.isfinite(top):
        raise VLMError("the model produced non-finite logits (NaN, +inf or all -inf); the answer was stopped")
    z -= top
    return draw(np.exp(z, out=z), rng.random())


def draw(p: np.ndarray, u: float) -> int:
    """The index ``i`` with ``cdf[i-1] <= u * total < cdf[i]`` for the weights ``p`` (non-negative,
    not all zero) and ``u`` in [0, 1): the inverse-CDF draw, found by block sums then inside one block."""
    starts = np.arange(0, len(p), BLOCK)
    blocks = np.cumsum(np.add.reduceat(p, starts), dtype=np.float64)
    x = u * blocks[-1]
    b = int(np.searchsorted(blocks, x, side="right"))
    if b == len(blocks):  # u * total rounded up to the total: the last block with weight
        b = int(np.flatnonzero(np.diff(blocks, prepend=0.0))[-1])
    inner = np.cumsum(p[starts[b] : starts[b] + BLOCK], dtype=np.float64)
    rest = x - (blocks[b - 1] if b else 0.0)
    i = int(np.searchsorted(inner, rest, side="right"))
    if i == len(inner):  # rounding between the block's sum and its own cumulative sum
        i = int(np.flatnonzero(np.diff(inner, prepend=0.0))[-1])
    return int(starts[b]) + i
