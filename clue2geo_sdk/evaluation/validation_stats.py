"""The numbers of a validation report with their uncertainty: percentile-bootstrap intervals and groups.

Every statistic is computed from one vector of per-image errors (km; NaN for an image that failed):

* accuracy at t km: the fraction of *all* images with ``d < t`` (a failure is a miss);
* median and 90th-percentile error: over the located images (numpy's linear quantile).

The 95 % interval is the percentile bootstrap (Efron): B resamples of the images with replacement
(numpy ``default_rng(seed)``), the statistic recomputed on each, and the 2.5th and 97.5th percentiles
of those B values (numpy's linear percentile). All statistics of a group share the same resamples.
Groups (continent, country) smaller than ``min_n`` are listed with their size only: an interval over
a handful of images says more about the handful than about the tool.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np

from .metrics import THRESHOLDS_KM

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
DEFAULT_MIN_GROUP = 30
CONFIDENCE = 0.95
QUANTILES = {"median": 0.5, "p90": 0.9}
#: Numbers per resample at most in one block (the B x n index matrix is built block by block).
_BLOCK = 4_000_000


def method(resamples: int, seed: int) -> str:
    """The interval method, as the report states it."""
    return (
        f"percentile bootstrap: {resamples} resamples of the images with replacement (numpy default_rng, "
        f"seed {seed}); each statistic recomputed per resample; the interval is the 2.5th-97.5th percentile "
        "of those values (numpy linear). Accuracy is over all images (a failure is a miss); median and 90th "
        "percentile error over the located images."
    )


@attrs.frozen
class Interval:
    """A statistic and its 95 % bootstrap interval (``None`` where it has no value, e.g. no image located)."""

    value: float | None
    low: float | None
    high: float | None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _number(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def statistics(x: np.ndarray, thresholds: Sequence[float] = THRESHOLDS_KM) -> np.ndarray:
    """Per row of errors ``x`` (k, n): accuracy at each threshold, then each of :data:`QUANTILES`
    (k, T + Q). NaN (a failure) is a miss and left out of the quantiles; a row with nothing located
    has NaN quantiles."""
    acc = np.stack([np.mean(x < t, axis=1) for t in thresholds], axis=1)  # NaN < t is False: a miss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: NaN, said as None
        q = np.nanquantile(x, list(QUANTILES.values()), axis=1).T
    return np.concatenate([acc, q.reshape(len(x), -1)], axis=1)


def bootstrap(
    values: np.ndarray,
    stat: Callable[[np.ndarray], np.ndarray],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The statistics ``stat`` (rows -> (k, S)) of ``values`` and their percentile-bootstrap interval
    bounds, each of shape (S,). NaN bounds where a statistic is NaN in every resample."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(x) == 0:
        raise ValueError("no values to bootstrap")
    point = stat(x[None, :])[0]
    n = len(x)
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK // n)
    draws = [stat(x[rng.integers(0, n, size=(min(block, resamples - i), n))]) for i in range(0, resamples, block)]
    boot = np.concatenate(draws, axis=0)
    tail = 100 * (1 - CONFIDENCE) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(boot, [tail, 100 - tail], axis=0)
    return point, low, high


@attrs.frozen(kw_only=True)
class Summary:
    """Accuracy per threshold and the error quantiles of one set of images, with intervals."""

    n: int
    n_located: int
    accuracy: dict[str, Interval]
    error_km: dict[str, Interval]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "n_located": self.n_located,
            "accuracy": {k: v.to_dict() for k, v in self.accuracy.items()},
            "error_km": {k: v.to_dict() for k, v in self.error_km.items()},
        }


def summarize(
    errors_km: Sequence[float | None],
    *,
    thresholds: Sequence[float] = THRESHOLDS_KM,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Summary:
    """Accuracy at each threshold and the median / p90 error of these images (None: failed)."""
    x = np.array([np.nan if d is None else d for d in errors_km], dtype=np.float64)
    if len(x) == 0:
        none = Interval(None, None, None)
        return Summary(
            n=0, n_located=0, accuracy={f"{t:g}": none for t in thresholds}, error_km=dict.fromkeys(QUANTILES, none)
        )
    point, low, high = bootstrap(x, lambda r: statistics(r, thresholds), resamples=resamples, seed=seed)
    ivs = [Interval(_number(p), _number(lo), _number(hi)) for p, lo, hi in zip(point, low, high, strict=True)]
    acc = {f"{t:g}": iv for t, iv in zip(thresholds, ivs, strict=False)}
    err = dict(zip(QUANTILES, ivs[len(thresholds) :], strict=True))
    return Summary(n=len(x), n_located=int(np.sum(np.isfinite(x))), accuracy=acc, error_km=err)


@attrs.frozen(kw_only=True)
class Groups:
    """Per group (a continent, a country) of at least ``min_n`` images its :class:`Summary`; the
    smaller groups by size only (``too_few``: label -> n)."""

    by: str
    min_n: int
    reported: dict[str, Summary]
    too_few: dict[str, int]
    names: dict[str, str] = attrs.Factory(dict)  # label -> display name (a country's code -> its name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "min_n": self.min_n,
            "groups": [{"key": k, "name": self.names.get(k, k), **s.to_dict()} for k, s in self.reported.items()],
            "too_few_to_report": [{"key": k, "name": self.names.get(k, k), "n": n} for k, n in self.too_few.items()],
        }


def group(
    labels: Sequence[str],
    errors_km: Sequence[float | None],
    *,
    by: str,
    min_n: int = DEFAULT_MIN_GROUP,
    names: dict[str, str] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> Groups:
    """The images grouped by ``labels`` (one per image), largest group first (ties by label)."""
    members: dict[str, list[float | None]] = {}
    for lab, d in zip(labels, errors_km, strict=True):
        members.setdefault(lab, []).append(d)
    order = sorted(members, key=lambda k: (-len(members[k]), k))
    reported = {k: summarize(members[k], resamples=resamples, seed=seed) for k in order if len(members[k]) >= min_n}
    too_few = {k: len(members[k]) for k in order if len(members[k]) < min_n}
    return Groups(by=by, min_n=min_n, reported=reported, too_few=too_few, names=dict(names or {}))
