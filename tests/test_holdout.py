"""k-core, the three splits and the sequence samples, each against a direct re-computation."""

import numpy as np
import pandas as pd
import pytest

from fellrec.data.tables import Dataset
from fellrec.errors import ConfigError
from fellrec.holdout import build_samples, filter_min_rating, kcore, split


def naive_kcore(pairs: list[tuple], k: int) -> list[tuple]:
    while True:
        users = pd.Series([u for u, _ in pairs]).value_counts()
        items = pd.Series([i for _, i in pairs]).value_counts()
        kept = [(u, i) for u, i in pairs if users[u] >= k and items[i] >= k]
        if len(kept) == len(pairs):
            return kept
        pairs = kept


def original_pairs(ds: Dataset) -> list[tuple]:
    u = ds.users.user_id.to_numpy()[ds.interactions.user]
    i = ds.items.item_id.to_numpy()[ds.interactions.item]
    return sorted(zip(u.tolist(), i.tolist(), strict=True))


@pytest.mark.parametrize("k", [0, 2, 5, 8])
def test_kcore_matches_naive(k, make_dataset):
    ds = make_dataset(n_inter=700, seed=k)
    out = kcore(ds, k)
    expected = original_pairs(ds) if k == 0 else sorted(naive_kcore(original_pairs(ds), k))
    assert original_pairs(out) == expected
    if k and len(out.interactions):
        assert out.interactions.groupby("user").size().min() >= k
        assert out.interactions.groupby("item").size().min() >= k
        # ids are dense again and the tables agree
        assert out.users.user.tolist() == list(range(out.num_users))
        assert set(out.interactions.item) == set(range(out.num_items))


def test_min_rating_filter(small_dataset):
    out = filter_min_rating(small_dataset, 4)
    assert (out.interactions.rating >= 4).all()
    assert len(out.interactions) == int((small_dataset.interactions.rating >= 4).sum())


def test_temporal_split_cuts_by_time_and_keeps_ties_together(small_dataset):
    sp = split(small_dataset, "temporal", (0.8, 0.1, 0.1))
    ts = np.sort(small_dataset.interactions.timestamp.to_numpy())
    n = len(ts)
    assert sp.cuts == (ts[int(0.8 * n)], ts[int(0.9 * n)])
    assert sp.train.timestamp.max() < sp.cuts[0] <= sp.valid.timestamp.min()
    assert sp.valid.timestamp.max() < sp.cuts[1] <= sp.test.timestamp.min()
    assert len(sp.train) + len(sp.valid) + len(sp.test) == n
    # with ties, no timestamp appears in two parts
    assert not set(sp.train.timestamp) & set(sp.valid.timestamp)
    assert not set(sp.valid.timestamp) & set(sp.test.timestamp)


def test_per_user_split_shares(small_dataset):
    sp = split(small_dataset, "per-user", (0.6, 0.2, 0.2))
    for u, seq in small_dataset.interactions.groupby("user"):
        n = len(seq)
        n_test, n_valid = int(np.floor(0.2 * n)), int(np.floor(0.2 * n))
        assert (sp.test.user == u).sum() == n_test
        assert (sp.valid.user == u).sum() == n_valid
        # the test part is the user's last interactions, in order
        assert sp.test[sp.test.user == u].index.tolist() == seq.index[n - n_test:].tolist()


def test_leave_one_out(small_dataset):
    ds = kcore(small_dataset, 3)
    sp = split(ds, "leave-one-out")
    for u, seq in ds.interactions.groupby("user"):
        assert sp.test[sp.test.user == u].index.tolist() == [seq.index[-1]]
        assert sp.valid[sp.valid.user == u].index.tolist() == [seq.index[-2]]
    assert len(sp.test) == ds.num_users


def test_leave_one_out_refuses_users_it_cannot_test():
    with pytest.raises(ConfigError, match=r"split.method: leave-one-out tests every user on their last item, but "
                                          r"1 user\(s\) have fewer than 3 interactions \(train, valid, test\), "
                                          r"e.g. user 'c'; set data.kcore to 3 or more"):
        split(tiny(), "leave-one-out")  # user c has 2 interactions


def tiny() -> Dataset:
    """Two users; times chosen so that a temporal 50/25/25 split is easy to follow by hand."""
    rows = [  # (user, item, time)
        ("a", 1, 1), ("a", 2, 2), ("a", 3, 3), ("b", 4, 3), ("a", 5, 4), ("b", 6, 4),
        ("a", 7, 5), ("b", 8, 5), ("c", 9, 6), ("a", 10, 7), ("b", 2, 7), ("c", 1, 8),
    ]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": range(1, 11), "title": [f"t{i}" for i in range(1, 11)]})
    return Dataset.from_raw("tiny", inter, items)


def test_samples_by_hand():
    ds = tiny()
    sp = split(ds, "temporal", (0.5, 0.25, 0.25))
    # 12 interactions: valid starts at sorted position 6 (time 5), test at position 9 (time 7)
    assert sp.cuts == (5.0, 7.0)
    s = build_samples(sp, history_len=2)

    def names(arr):
        return [int(ds.items.item_id[i]) for i in arr]

    def uname(u):
        return ds.users.user_id[u]

    train = sorted((uname(u), tuple(names(h)), names(t)[0])
                   for u, h, t in zip(s.train.user, s.train.history, s.train.targets, strict=True))
    assert train == [("a", (1,), 2), ("a", (1, 2), 3), ("a", (2, 3), 5), ("b", (4,), 6)]
    valid = sorted((uname(u), tuple(names(h)), names(t)[0], tuple(sorted(names(x))))
                   for u, h, t, x in zip(s.valid.user, s.valid.history, s.valid.targets, s.valid.exclude,
                                         strict=True))
    # c's valid item (time 6) has no train history: no sample for c
    assert valid == [("a", (3, 5), 7, (1, 2, 3, 5)), ("b", (4, 6), 8, (4, 6))]
    test = sorted((uname(u), tuple(names(h)), tuple(sorted(names(t))), tuple(sorted(names(x))))
                  for u, h, t, x in zip(s.test.user, s.test.history, s.test.targets, s.test.exclude,
                                        strict=True))
    # a: history = last 2 of train+valid, target = all test items; c has no train data
    assert test == [("a", (5, 7), (10,), (1, 2, 3, 5, 7)), ("b", (6, 8), (2,), (4, 6, 8))]


def test_sample_counts_match_direct_count(small_dataset):
    ds = kcore(small_dataset, 3)
    sp = split(ds)
    s = build_samples(sp, history_len=10)
    train_users = set(sp.train.user)
    per_user = sp.train.groupby("user").size()
    assert len(s.train) == int((per_user - 1).sum())
    assert len(s.valid) == int(sp.valid.user.isin(train_users).sum())
    assert sorted(s.test.user.tolist()) == sorted(set(sp.test.user) & train_users)
    assert all(1 <= len(h) <= 10 for h in s.train.history)
    # every test target set is exactly the user's test items
    for u, t in zip(s.test.user, s.test.targets, strict=True):
        assert sorted(t.tolist()) == sorted(set(sp.test.item[sp.test.user == u]))
