"""Where the batched engine's thread spends its time, by kind of work (the benchmark's per-stage
table reads these). Timed with ``perf_counter`` around native calls already made, so it costs a few
hundred nanoseconds per step, and it is always on."""

from __future__ import annotations

from typing import Any

import attrs


@attrs.define
class EngineClock:
    """Seconds and counts, accumulated since the engine started.

    A step that feeds prompt (suffix) tokens is a *prefill* step, one that only feeds the previous
    step's sampled tokens a *decode* step; ``host_s`` is the Python around ``llama_decode`` (batch
    fill, sampling, grammar, detokenizing), ``decode_host_s`` its part in decode steps. ``asks`` holds
    one record per finished prompt while ``trace`` is on: its suffix tokens, generated tokens, and
    its share of the steps it was in (a step's time split by the tokens each prompt fed to it)."""

    vision_s: float = 0.0  # mtmd_encode_chunk: the vision tower
    prefix_s: float = 0.0  # the prefix's text and image tokens through the language model
    prefix_tokens: int = 0
    shared_tokens: int = 0  # suffix tokens not evaluated because another prompt's prefill had them
    prefill_steps: int = 0
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0
    decode_tokens: int = 0
    host_s: float = 0.0
    decode_host_s: float = 0.0  # the part of host_s spent in decode steps (Python per generated token)
    trace: bool = False
    asks: list[dict[str, Any]] = attrs.field(factory=list)

    def step(self, prompt_tokens: int, gen_tokens: int, seconds: float) -> None:
        """Count one ``llama_decode`` of ``prompt_tokens`` suffix and ``gen_tokens`` sampled tokens."""
        if prompt_tokens:
            self.prefill_steps += 1
            self.prefill_s += seconds
        else:
            self.decode_steps += 1
            self.decode_s += seconds
        self.prefill_tokens += prompt_tokens
        self.decode_tokens += gen_tokens

    def to_dict(self) -> dict[str, Any]:
        """The sums (rounded), without the per-prompt records."""
        out = attrs.asdict(self, filter=lambda a, _: a.name not in ("trace", "asks"))
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}
