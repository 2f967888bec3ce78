"""How sure a measured number is.

- ``interval``: a 95% percentile-bootstrap interval of a mean over test users (scipy's
  ``stats.bootstrap``, 2,000 resamples, a fixed seed, so a run's intervals are reproducible);
- ``paired_difference``: the difference of two runs' means over the users both tested, with the
  bootstrap interval of the mean of the per-user differences (pairing removes the spread that the
  users share, so it separates runs that overlapping marginal intervals cannot);
- ``paired_over_seeds`` and ``over_seeds``: the same for two algorithms run with the same seeds, with
  the bootstrap over users of the seed-averaged differences and a Student-t interval over the seeds;
- ``across_seeds``: mean and sample standard deviation of one number over runs that differ only in
  their seed.

A metric's per-user values carry NaN for users without a ground truth; they are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0


def interval(values, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """(low, high) of the percentile bootstrap interval of the mean of ``values`` (NaN dropped);
    (nan, nan) with fewer than two values."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    # sorted, so that the interval depends on the values and not on the order the users came in
    # (a Flower server gathers them client by client, an embedded run in its own order)
    x = np.sort(x[~np.isnan(x)])
    if x.size < 2:
        return float("nan"), float("nan")
    if np.all(x == x[0]):  # no spread to resample (scipy would warn and return NaN)
        return float(x[0]), float(x[0])
    res = stats.bootstrap((x,), np.mean, n_resamples=resamples, confidence_level=level, method="percentile",
                          vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass
class Difference:
    """``a − b`` over the ``n`` users both runs tested: the mean difference and its interval."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return bool(self.low > 0 or self.high < 0)


def paired_difference(a: dict, b: dict, **kw) -> Difference:
    """The paired difference of two runs' per-user values, ``a`` and ``b`` mapping a user to a value
    (users without a value in either are left out)."""
    users = [u for u in a if u in b and np.isfinite(a[u]) and np.isfinite(b[u])]
    d = np.array([a[u] - b[u] for u in users], dtype=np.float64)
    if d.size == 0:
        return Difference(float("nan"), float("nan"), float("nan"), 0)
    low, high = interval(d, **kw)
    return Difference(float(d.mean()), low, high, int(d.size))


def paired_over_seeds(a: Sequence[dict], b: Sequence[dict], **kw) -> tuple[Difference, list[float]]:
    """Two algorithms run with the same seeds: ``a[s]`` and ``b[s]`` map a user to the value of seed
    s's run. Returns the difference of the users' seed-averaged values, mean_s(a_s(u) − b_s(u)), with
    its bootstrap interval over the users that every run tested, and each seed's mean difference."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_over_seeds needs as many runs of A as of B, got {len(a)} and {len(b)}")
    runs = [*a, *b]
    users = [u for u in runs[0] if all(u in r and np.isfinite(r[u]) for r in runs)]
    if not users:
        return Difference(float("nan"), float("nan"), float("nan"), 0), []
    per_seed = np.array([[x[u] - y[u] for u in users] for x, y in zip(a, b, strict=True)], dtype=np.float64)
    d = per_seed.mean(axis=0)
    low, high = interval(d, **kw)
    return Difference(float(d.mean()), low, high, len(users)), per_seed.mean(axis=1).tolist()


def over_seeds(each: Sequence[float], *, level: float = LEVEL) -> tuple[float, float]:
    """(low, high) of the Student-t interval of the mean of each seed's mean difference (``each``, as
    ``paired_over_seeds`` returns it). The seeds are the sample here, so the shift one training run gives
    every user at once is in the interval, where the bootstrap over users holds the seeds' runs fixed;
    with few seeds it is wide. (nan, nan) with fewer than two seeds."""
    x = np.asarray(each, dtype=np.float64).reshape(-1)
    if x.size < 2:
        return float("nan"), float("nan")
    sem = float(x.std(ddof=1)) / np.sqrt(x.size)
    if sem == 0:
        return float(x.mean()), float(x.mean())
    low, high = stats.t.interval(level, df=x.size - 1, loc=float(x.mean()), scale=sem)
    return float(low), float(high)


def across_seeds(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std) of one number over several seeds; std is nan for a single seed."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else float("nan")


def intervals(per_query: dict[str, np.ndarray], client_of_query: np.ndarray, **kw) -> dict:
    """Intervals of every metric: ``{"overall": {m: [low, high]}, "clients": {c: {m: [low, high]}}}``,
    over all counted queries and over each client's."""
    client_of_query = np.asarray(client_of_query).reshape(-1)
    out = {"overall": {}, "clients": {}}
    for m, v in per_query.items():
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        out["overall"][m] = list(interval(v, **kw))
        for c in np.unique(client_of_query):
            mine = v[client_of_query == c]
            if np.isfinite(mine).any():
                key = c.item() if isinstance(c, np.generic) else c
                out["clients"].setdefault(key, {})[m] = list(interval(mine, **kw))
    return out
