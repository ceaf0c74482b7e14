"""JSON-schema constrained sampling at the cost of free sampling: check one token, mask on rejection.

llama-cpp-python applies llama.cpp's GBNF grammar to all ~152k candidate pieces before sampling
(~30 ms a token on this CPU). Here the grammar is llguidance's (a lexer + Earley parser with a token
trie): the sampled token is checked alone (a few µs); only when it is rejected is the allowed set
computed (~0.1–0.3 ms for the whole vocabulary) and the sample redrawn from it. Greedy picks the
best allowed token either way.

JSON is written as the training data writes it (``json.dumps``: ", " and ": " separators, no other
whitespace), so the grammar never lets a model wander into whitespace. A token enters the grammar
state only after the grammar allowed it; an error state is reported, never ignored.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .._native import llguidance_module

# The JSON layout the training data uses (json.dumps defaults) and nothing else.
JSON_LAYOUT = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class GrammarError(RuntimeError):
    """The grammar allows no continuation (the model cannot complete a valid answer)."""


def build_tokenizer(lib: Any, vocab: Any) -> Any:
    """llguidance's view of the llama.cpp vocabulary, with every end-of-generation token as EOS
    (~1 s for 152k tokens: build once per engine)."""
    lltokenizer_from_vocab = llguidance_module().llamacpp.lltokenizer_from_vocab
    n = lib.llama_vocab_n_tokens(vocab)
    eog = [t for t in range(n) if lib.llama_vocab_is_eog(vocab, t)]
    with warnings.catch_warnings():  # it calls a binding llama-cpp-python marks deprecated, per token
        warnings.simplefilter("ignore", DeprecationWarning)
        return lltokenizer_from_vocab(vocab, eos_token=eog)


class GrammarFactory:
    """Compiles a schema once; ``new()`` gives each sequence its own matcher (a cheap deep copy)."""

    def __init__(self, tokenizer: Any, schema: Mapping[str, Any]) -> None:
        llg = llguidance_module()
        grammar = llg.LLMatcher.grammar_from_json_schema(dict(schema), overrides=JSON_LAYOUT)
        self._template = llg.LLMatcher(tokenizer, grammar, log_level=0)
        if self._template.is_error():
            raise ValueError(
                f"no grammar for the schema {json.dumps(dict(schema))[:200]}: {self._template.get_error()}"
            )

    def new(self) -> CheckFirstGrammar:
        return CheckFirstGrammar(self._template.deep_copy())


class CheckFirstGrammar:
    """One sequence's grammar state. Counts checks and how often the full mask was needed."""

    def __init__(self, matcher: Any) -> None:
        self._m = matcher
        self.checks = 0
        self.full_masks = 0

    def allows(self, token: int) -> bool:
        self.checks += 1
        return self._m.validate_tokens([token]) == 1

    def allowed(self, n_vocab: int) -> np.ndarray:
        """Ids of every token the grammar allows next (the full-vocabulary pass, ~0.1–0.3 ms)."""
        self.full_masks += 1
        bits = np.unpackbits(np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return np.flatnonzero(bits[:n_vocab])

    def choose(self, logits: np.ndarray, sample: Callable[[np.ndarray], int]) -> int:
        """The sampled token if the grammar allows it, else a sample among the allowed tokens only
        (their logits, so greedy picks the best allowed one); the token is then consumed."""
        token = sample(logits)
        if not self.allows(token):
            ids = self.allowed(len(logits))
            if ids.size == 0:
                raise GrammarError(f"the grammar allows no next token ({self._m.get_error() or 'dead end'})")
            token = int(ids[sample(logits[ids])])
        if not self._m.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self._m.get_error()}")
        return token

    def close(self) -> None:
        self._m = None
