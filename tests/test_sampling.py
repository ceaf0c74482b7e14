"""The next-token draw (engines/sampling.py) against an independent float64 inverse-CDF and the softmax."""

from __future__ import annotations

import numpy as np
import pytest

from clue2geo_sdk.engines.base import VLMError
from clue2geo_sdk.engines.sampling import BLOCK, draw, sample_token


def _reference(p: np.ndarray, u: float) -> int:
    """The inverse-CDF draw over the whole vector in float64, as ``Generator.choice`` computes it."""
    cdf = np.cumsum(p.astype(np.float64))
    return int(np.searchsorted(cdf, u * cdf[-1], side="right"))


@pytest.mark.parametrize("n", [1, 5, BLOCK - 1, BLOCK, BLOCK + 1, 1000, 151_936])
def test_draw_is_the_inverse_cdf(n: int) -> None:
    rng = np.random.default_rng(n)
    p = rng.random(n).astype(np.float32)
    p[rng.random(n) < 0.3] = 0.0  # tokens of no weight are never drawn
    p[rng.integers(n)] = 1.0
    us = np.concatenate([rng.random(400), [0.0, 0.5, np.nextafter(1.0, 0.0)]])
    cdf = np.cumsum(p.astype(np.float64)) / p.astype(np.float64).sum()
    for u in us:
        got = draw(p, float(u))
        assert p[got] > 0
        # the same index, unless u sits within rounding of a boundary between two tokens
        if min(abs(cdf - u)) > 1e-6:
            assert got == _reference(p, float(u)), u


def test_a_u_at_the_top_lands_on_the_last_token_with_weight() -> None:
    p = np.zeros(3 * BLOCK, np.float32)
    p[[3, BLOCK + 7]] = [0.25, 0.75]
    assert draw(p, np.nextafter(1.0, 0.0)) == BLOCK + 7
    assert draw(p, 0.0) == 3
    assert draw(p, 0.2499) == 3 and draw(p, 0.2501) == BLOCK + 7


def test_sampled_frequencies_follow_the_softmax_at_the_temperature() -> None:
    logits = np.zeros(300, np.float32) - 50.0
    logits[[0, 150, 299]] = [1.0, 2.0, 0.0]
    t = 0.7
    expect = np.exp(np.array([1.0, 2.0, 0.0]) / t)
    expect /= expect.sum()
    rng = np.random.default_rng(7)
    n = 20_000
    toks = [sample_token(logits, t, rng) for _ in range(n)]
    counts = np.array([toks.count(i) for i in (0, 150, 299)])
    assert counts.sum() == n  # the other tokens' weights are e^-73 of the best: never drawn
    sigma = np.sqrt(n * expect * (1 - expect))
    assert np.all(np.abs(counts - n * expect) < 4 * sigma), (counts, n * expect)


def test_a_seed_gives_the_same_tokens_and_greedy_takes_the_lowest_best_id() -> None:
    logits = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    a = [sample_token(logits, 1.0, np.random.default_rng(3)) for _ in range(3)]
    assert len(set(a)) == 1
    tied = np.array([0.0, 2.0, 1.0, 2.0], np.float32)
    assert sample_token(tied, 0.0, np.random.default_rng()) == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_non_finite_logits_are_refused(bad: float, temperature: float) -> None:
    logits = np.zeros(400, np.float32)
    logits[17] = bad
    with pytest.raises(VLMError, match="non-finite logits"):
        sample_token(logits, temperature, np.random.default_rng())


def test_all_minus_inf_is_refused_when_sampling() -> None:
    with pytest.raises(VLMError, match="non-finite"):
        sample_token(np.full(10, -np.inf, np.float32), 0.5, np.random.default_rng())
