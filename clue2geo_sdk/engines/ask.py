"""Asking the VLM for typed answers: the JSON schemas, and a pending answer that parses itself.

Prompts are submitted at once (the engine works on them while the caller does other things) and
parsed when the caller needs them. ``constrain`` says how: "always" (the default: every answer
under the JSON schema, as cheap as free decoding with the check-first grammar), "fallback" (free,
then re-asked under the schema only when the answer doesn't parse) or "never".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Literal

import attrs

from .base import Generation, ImageSession, VisionLanguageModel, silence_native_logs

Constrain = Literal["fallback", "always", "never"]

# Decimal degrees as strings (the paper's format), four to six decimals, range-limited by pattern:
# |lat| <= 90 and |lon| <= 180 exactly (90 and 180 only with zero decimals).
_LAT = {"type": "string", "pattern": "^-?(90[.]0{4,6}|[0-8]?[0-9][.][0-9]{4,6})$"}
_LON = {"type": "string", "pattern": "^-?(180[.]0{4,6}|(1[0-7][0-9]|[0-9]?[0-9])[.][0-9]{4,6})$"}
_NAME = {"type": "string", "maxLength": 64}
LOCATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"country": _NAME, "city": _NAME, "landmark": _NAME, "lat": _LAT, "lon": _LON},
    "required": ["country", "city", "landmark", "lat", "lon"],
    "additionalProperties": False,
}
CUES_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "maxItems": 12,
    "items": {
        "type": "object",
        "properties": {"cue": {"type": "string", "maxLength": 48}, "description": {"type": "string", "maxLength": 200}},
        "required": ["cue", "description"],
        "additionalProperties": False,
    },
}


def usable(value: Any) -> bool:
    """A parsed answer worth keeping: not None, and not marked invalid."""
    return value is not None and getattr(value, "valid", True)


@attrs.define(eq=False)
class PendingAnswer:
    """A submitted prompt; :meth:`result` waits, parses, and re-asks under the schema if allowed."""

    session: ImageSession
    prompt: str
    parse: Callable[[str], Any]
    schema: Mapping[str, Any]
    max_tokens: int
    constrain: Constrain
    seed: int | None
    temperature: float | None
    future: Future[Generation]
    _done: tuple[Any, list[Generation]] | None = None

    def result(self, timeout: float | None = None) -> tuple[Any, list[Generation]]:
        """The parsed value (None or invalid when unusable) and every generation it took.
        ``timeout`` bounds each wait (``TimeoutError`` past it); the engine never leaves one pending."""
        if self._done is None:
            gens = [self.future.result(timeout)]
            value = self.parse(gens[0].text)
            if not usable(value) and self.constrain == "fallback" and not gens[0].constrained:
                gens.append(
                    self.session.submit(
                        self.prompt,
                        schema=self.schema,
                        max_tokens=self.max_tokens,
                        seed=self.seed,
                        temperature=self.temperature,
                    ).result(timeout)
                )
                value = self.parse(gens[-1].text)
            self._done = (value, gens)
        return self._done


def ask(
    session: ImageSession,
    prompt: str,
    parse: Callable[[str], Any],
    *,
    schema: Mapping[str, Any],
    max_tokens: int,
    constrain: Constrain,
    seed: int | None = None,
    temperature: float | None = None,
) -> PendingAnswer:
    """Submit ``prompt`` now (under ``schema`` unless ``constrain`` allows free decoding)."""
    fut = session.submit(
        prompt,
        schema=schema if constrain == "always" else None,
        max_tokens=max_tokens,
        seed=seed,
        temperature=temperature,
    )
    return PendingAnswer(session, prompt, parse, schema, max_tokens, constrain, seed, temperature, fut)


__all__ = [
    "CUES_SCHEMA",
    "LOCATION_SCHEMA",
    "Constrain",
    "Generation",
    "ImageSession",
    "PendingAnswer",
    "VisionLanguageModel",
    "ask",
    "silence_native_logs",
    "usable",
]
