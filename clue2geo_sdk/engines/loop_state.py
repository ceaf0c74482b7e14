"""What the batched engine's thread keeps per image and per prompt, and how much of a prompt's
suffix another prompt about the same image has already evaluated (its shared head)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future

import attrs
import numpy as np

from .base import Generation
from .grammar import CheckFirstGrammar
from .sampling import sample_token

MIN_SHARED = 16  # a shared head shorter than this is evaluated again (a copy costs about that much)


@attrs.define(eq=False)
class ImageState:
    """One image in flight: its pixels until the prefix is evaluated, then its sequences."""

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
class AskState:
    """One prompt about an image: its suffix tokens, sampling, and the answer so far."""

    image: ImageState
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
    label: str = ""  # the prompt's first words, for the clock's per-prompt records
    prefill_s: float = 0.0  # this prompt's share of the steps that fed its suffix
    decode_s: float = 0.0  # and of the steps that fed its sampled tokens

    @property
    def cost(self) -> int:
        return len(self.suffix) + self.max_tokens

    @property
    def evaluated(self) -> int:
        """How many of its suffix tokens its sequence holds (0 before it is admitted)."""
        if self.seq < 0:
            return 0
        return len(self.suffix) if self.out else len(self.suffix) - len(self.feed)

    def sample(self, logits: np.ndarray) -> int:
        """The next token by this prompt's temperature and seeded generator (:func:`~.sampling.sample_token`)."""
        return sample_token(logits, self.temperature, self.rng)


def shared_head(a: AskState, others: Sequence[AskState]) -> tuple[AskState | None, int]:
    """The prompt among ``others`` (same image, earlier in line) whose suffix shares the longest head
    with ``a``'s, and that head's length, when it is at least ``MIN_SHARED`` tokens; ``a`` keeps at
    least its last token to evaluate itself (its logits give its first answer token)."""
    best, n_best = None, 0
    cap = len(a.suffix) - 1
    for o in others:
        if o is a or o.image is not a.image:
            continue
        n = 0
        for x, y in zip(a.suffix[:cap], o.suffix, strict=False):
            if x != y:
                break
            n += 1
        if n > n_best:
            best, n_best = o, n
    return (best, n_best) if n_best >= MIN_SHARED else (None, 0)
