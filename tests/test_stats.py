"""Bootstrap intervals and paired differences against independent computations."""

import numpy as np
import pytest

from fellrec.stats import across_seeds, interval, intervals, paired_difference


def numpy_bootstrap(x, resamples, level, seed):
    """The percentile bootstrap written out: resample users with replacement, take the quantiles."""
    rng = np.random.default_rng(seed)
    means = np.array([x[rng.integers(0, len(x), len(x))].mean() for _ in range(resamples)])
    alpha = (1 - level) / 2
    return np.quantile(means, alpha), np.quantile(means, 1 - alpha)


def test_interval_agrees_with_a_direct_bootstrap_and_the_normal_approximation():
    rng = np.random.default_rng(3)
    x = (rng.random(943) < 0.08).astype(float)  # hits of 943 users, as recall@10 with one target each
    low, high = interval(x, resamples=4000)
    d_low, d_high = numpy_bootstrap(x, 4000, 0.95, seed=11)
    # two bootstraps with different draws agree to their own Monte-Carlo error (~0.001 here)
    assert low == pytest.approx(d_low, abs=0.003) and high == pytest.approx(d_high, abs=0.003)
    p, se = x.mean(), x.std(ddof=0) / np.sqrt(len(x))
    assert low == pytest.approx(p - 1.96 * se, abs=0.003) and high == pytest.approx(p + 1.96 * se, abs=0.003)
    assert low < p < high


def test_interval_drops_nan_and_handles_degenerate_samples():
    assert interval([0.5, np.nan, 0.5, 0.5]) == (0.5, 0.5)
    assert all(np.isnan(interval([1.0, np.nan])))
    a = interval([0.0, 1.0] * 50)
    assert a == interval([0.0, 1.0] * 50 + [np.nan] * 7)  # reproducible, NaN ignored


def test_paired_difference_pairs_users_and_marks_what_excludes_zero():
    rng = np.random.default_rng(0)
    base = rng.random(500)
    a = {u: v for u, v in enumerate(base)}
    b = {u: v - 0.01 for u, v in enumerate(base)}  # b is a shifted by a constant: no spread in the difference
    d = paired_difference(a, b)
    assert d.n == 500 and d.mean == pytest.approx(0.01) and d.low == pytest.approx(0.01) and d.significant
    # the same two runs' marginal intervals overlap: only pairing separates them
    la, ha = interval(list(a.values()))
    lb, hb = interval(list(b.values()))
    assert lb < ha and la < hb
    # noise around the same values: the interval holds 0
    c = {u: v + rng.normal(0, 0.05) for u, v in a.items()}
    e = paired_difference(c, a)
    assert e.low < 0 < e.high and not e.significant
    # only users both runs tested count
    f = paired_difference({1: 1.0, 2: 0.0, 3: 1.0}, {2: 1.0, 3: 0.0, 4: 0.0})
    assert f.n == 2 and f.mean == 0.0


def test_intervals_per_client_and_overall():
    values = {"recall@10": np.array([1.0, 0.0, 1.0, 1.0, np.nan, 0.0, 0.0, 0.0])}
    clients = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    out = intervals(values, clients)
    low, high = out["overall"]["recall@10"]
    assert low <= 3 / 7 <= high
    assert out["clients"][2]["recall@10"] == [0.0, 0.0]
    assert set(out["clients"]) == {0, 1, 2}


def test_across_seeds():
    assert across_seeds([0.1, 0.2, 0.3]) == (pytest.approx(0.2), pytest.approx(0.1))
    mean, std = across_seeds([0.4])
    assert mean == 0.4 and np.isnan(std)


def test_paired_over_seeds_by_hand():
    from fellrec.stats import paired_over_seeds

    a = [{1: 1.0, 2: 0.0, 3: 1.0}, {1: 0.0, 2: 1.0, 3: 1.0}]
    b = [{1: 0.0, 2: 0.0, 3: 0.0, 4: 1.0}, {1: 0.0, 2: 0.0, 3: 1.0}]  # user 4: not in every run
    d, each = paired_over_seeds(a, b)
    assert d.n == 3 and d.mean == pytest.approx((0.5 + 0.5 + 0.5) / 3)  # users: (1+0)/2, (0+1)/2, (1+0)/2
    assert each == pytest.approx([2 / 3, 1 / 3])
    with pytest.raises(ValueError, match="as many runs of A as of B, got 2 and 1"):
        paired_over_seeds(a, b[:1])


def test_over_seeds_is_students_t_interval_of_the_seeds_differences():
    from fellrec.stats import over_seeds

    low, high = over_seeds([0.1, 0.2, 0.3])  # mean 0.2, sd 0.1, t(0.975, 2 df) = 4.302653 from a table
    assert low == pytest.approx(0.2 - 4.302653 * 0.1 / 3 ** 0.5, abs=1e-6)
    assert high == pytest.approx(0.2 + 4.302653 * 0.1 / 3 ** 0.5, abs=1e-6)
    assert over_seeds([0.05, 0.05]) == (0.05, 0.05)
    assert all(np.isnan(over_seeds([0.1])))
