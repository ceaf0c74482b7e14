"""JSON-schema constrained sampling that checks one token, not the whole vocabulary.

llama-cpp-python applies the grammar to all ~152k candidate pieces before sampling (~30 ms a token
on this CPU). llama.cpp's own server samples first and asks the grammar about that single token;
only when the grammar rejects it is the full vocabulary masked and the sample redrawn. The answer
is the same token either way (greedy: the best allowed token), at the price of free decoding.

A token is accepted into the grammar's state only after the grammar allowed it: accepting an
unchecked token makes llama.cpp throw a C++ exception, which aborts the whole process via ctypes.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class GrammarError(RuntimeError):
    """The grammar allows no continuation (the model cannot complete a valid answer)."""


def schema_to_gbnf(schema: Mapping[str, Any]) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(json.dumps(dict(schema)))


class GrammarFactory:
    """Parses a schema's grammar once; ``new()`` gives each sequence its own state (a clone)."""

    def __init__(self, vocab: Any, schema: Mapping[str, Any]) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._template = llama_cpp.llama_sampler_init_grammar(vocab, schema_to_gbnf(schema).encode(), b"root")
        if not self._template:
            raise ValueError(f"llama.cpp could not compile a grammar for the schema {json.dumps(dict(schema))[:200]}")

    def new(self) -> CheckFirstGrammar:
        return CheckFirstGrammar(self._lib, self._lib.llama_sampler_clone(self._template))

    def close(self) -> None:
        if self._template:
            self._lib.llama_sampler_free(self._template)
            self._template = None


class CheckFirstGrammar:
    """One sequence's grammar state. Counts how often the full-vocabulary mask was needed."""

    def __init__(self, lib: Any, sampler: Any) -> None:
        self._lib = lib
        self._smpl = sampler
        self._one = lib.llama_token_data()
        self._one_arr = lib.llama_token_data_array(data=ctypes.pointer(self._one), size=1, selected=-1, sorted=False)
        self.checks = 0
        self.full_masks = 0

    def allows(self, token: int) -> bool:
        self.checks += 1
        self._one.id, self._one.logit, self._one.p = token, 0.0, 0.0
        self._one_arr.size, self._one_arr.selected = 1, -1
        self._lib.llama_sampler_apply(self._smpl, ctypes.byref(self._one_arr))
        return bool(np.isfinite(self._one.logit))

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar forbids set to -inf (the full-vocabulary pass)."""
        self.full_masks += 1
        data = np.empty(len(logits), dtype=_TOKEN_DATA)
        data["id"] = np.arange(len(logits), dtype=np.int32)
        data["logit"] = logits
        data["p"] = 0.0
        arr = self._lib.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(self._lib.llama_token_data)),
            size=len(logits),
            selected=-1,
            sorted=False,
        )
        self._lib.llama_sampler_apply(self._smpl, ctypes.byref(arr))
        # Samplers may only rewrite logits in place here (the grammar never reorders or shrinks).
        out = np.full(len(logits), -np.inf, dtype=np.float32)
        n = int(arr.size)
        view = np.ctypeslib.as_array(
            ctypes.cast(arr.data, ctypes.POINTER(ctypes.c_uint8)), shape=(n * _TOKEN_DATA.itemsize,)
        )
        got = view.view(_TOKEN_DATA)
        out[got["id"]] = got["logit"]
        return out

    def choose(self, logits: np.ndarray, sample: Callable[[np.ndarray], int]) -> int:
        """The sampled token if the grammar allows it, else a sample from the masked logits;
        the chosen token is then accepted into the grammar state."""
        token = sample(logits)
        if not self.allows(token):
            masked = self.mask(logits)
            if not np.isfinite(masked).any():
                raise GrammarError("the grammar allows no next token")
            token = sample(masked)
        self._lib.llama_sampler_accept(self._smpl, token)
        return token

    def close(self) -> None:
        if self._smpl:
            self._lib.llama_sampler_free(self._smpl)
            self._smpl = None
