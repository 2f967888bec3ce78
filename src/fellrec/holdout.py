"""Filtering, train/valid/test splits and the sequence samples built from them.

Splits (each keeps the interactions' time order, ties in file order):

- ``temporal`` (FELLRec): one global cut by time. With the timestamps sorted, ``t_valid`` is the
  timestamp at position ⌊r_train·n⌋ and ``t_test`` the one at ⌊(r_train + r_valid)·n⌋; train is
  ``t < t_valid``, valid ``t_valid <= t < t_test``, test ``t >= t_test``. Interactions that share
  a timestamp therefore always land in the same part.
- ``per-user`` (FedPA): each user's own sequence; the last ⌊r_test·n⌋ go to test, the ⌊r_valid·n⌋
  before them to valid, the rest to train.
- ``leave-one-out``: each user's last interaction is test, the one before valid, the rest train;
  every user needs 3 interactions (a user with fewer is a ConfigError: raise ``data.kcore``).

Samples (``build_samples``), as FELLRec's released preprocessing builds them:

- train: one sample per position of a user's train sequence, history = the up-to-N items before it
  (positions with no history are skipped); with ``train_stride`` s > 1, only every s-th position,
  counted back from the last (s = N gives windows that do not overlap, for a backbone that learns
  from every position of a sample);
- valid: one per validation interaction of a user who has train data; history = the last N items
  before it (train items, then earlier validation items);
- test: one per user who has train data and test interactions; history = the last N of the user's
  train + valid items; target = ALL of the user's test items (multi-item ground truth).

Valid and test samples also carry ``exclude``: every item the user interacted with before the
target(s), which a full ranking masks out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fellrec.data.tables import Dataset
from fellrec.errors import ConfigError


def filter_min_rating(ds: Dataset, min_rating: float | None) -> Dataset:
    if min_rating is None:
        return ds
    keep = ds.interactions["rating"].to_numpy() >= min_rating
    return ds.subset(keep, f"kept {int(keep.sum())} of {len(keep)} interactions with rating >= {min_rating}")


def kcore(ds: Dataset, k: int) -> Dataset:
    """Drop users and items with fewer than ``k`` interactions, again and again until none is left."""
    if k <= 0:
        return ds
    users = ds.interactions["user"].to_numpy()
    items = ds.interactions["item"].to_numpy()
    keep = np.ones(len(users), dtype=bool)
    rounds = 0
    while True:
        user_n = np.bincount(users[keep], minlength=ds.num_users)
        item_n = np.bincount(items[keep], minlength=ds.num_items)
        ok = keep & (user_n[users] >= k) & (item_n[items] >= k)
        rounds += 1
        if ok.sum() == keep.sum():
            break
        keep = ok
    if keep.all():
        return ds
    return ds.subset(keep, f"{k}-core filter ({rounds} passes) kept {int(keep.sum())} of {len(keep)} "
                           "interactions")


@dataclass
class Split:
    """The train / valid / test interactions (rows of ``Dataset.interactions``, in time order)."""

    method: str
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    cuts: tuple[float, float] | None = None
    """The two timestamps of a temporal split."""


def split(ds: Dataset, method: str = "temporal", ratios: tuple[float, ...] = (0.8, 0.1, 0.1)) -> Split:
    inter = ds.interactions
    r_train, r_valid, r_test = (r / sum(ratios) for r in ratios)
    if method == "temporal":
        ts = np.sort(inter["timestamp"].to_numpy(), kind="stable")
        n = len(ts)
        if n == 0:
            raise ConfigError("split: the dataset has no interactions left after filtering")
        t_valid = ts[min(n - 1, int(np.floor(r_train * n)))]
        t_test = ts[min(n - 1, int(np.floor((r_train + r_valid) * n)))] if r_test > 0 else np.inf
        t = inter["timestamp"].to_numpy()
        part = np.where(t < t_valid, 0, np.where(t < t_test, 1, 2))
        cuts = (float(t_valid), float(t_test))
    elif method == "per-user":
        pos, size = _positions(inter)
        n_test = np.floor(r_test * size).astype(np.int64)
        n_valid = np.floor(r_valid * size).astype(np.int64)
        part = np.where(pos >= size - n_test, 2, np.where(pos >= size - n_test - n_valid, 1, 0))
        cuts = None
    elif method == "leave-one-out":
        pos, size = _positions(inter)
        short = np.unique(inter["user"].to_numpy()[size < 3])
        if len(short):
            raise ConfigError(f"split.method: leave-one-out tests every user on their last item, but {len(short)} "
                              f"user(s) have fewer than 3 interactions (train, valid, test), e.g. user "
                              f"{ds.users['user_id'].iloc[int(short[0])]!r}; set data.kcore to 3 or more")
        part = np.where(pos == size - 1, 2, np.where(pos == size - 2, 1, 0))
        cuts = None
    else:
        raise ConfigError(f"split.method: unknown split {method!r}; "
                          "expected temporal, per-user, leave-one-out")
    return Split(method, inter.loc[part == 0], inter.loc[part == 1], inter.loc[part == 2], cuts)


def _positions(inter: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each interaction's 0-based position in its user's sequence, and that user's sequence length."""
    grouped = inter.groupby("user", sort=False)
    return grouped.cumcount().to_numpy(), grouped["user"].transform("size").to_numpy()


@dataclass
class Samples:
    """Sequence samples: for sample s, ``history[s]`` (oldest first) -> ``targets[s]``.

    ``exclude[s]`` (valid/test only) lists the items to mask in a full ranking: everything the user
    interacted with before the target(s).
    """

    user: np.ndarray
    history: list[np.ndarray]
    targets: list[np.ndarray]
    exclude: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.user)

    def select(self, mask: np.ndarray) -> Samples:
        """The samples where ``mask`` is true."""
        return self.take(np.flatnonzero(mask))

    def take(self, idx: np.ndarray | list[int]) -> Samples:
        """The samples at positions ``idx``, in that order."""
        idx = np.asarray(idx, dtype=np.int64)
        return Samples(self.user[idx], [self.history[i] for i in idx], [self.targets[i] for i in idx],
                       None if self.exclude is None else [self.exclude[i] for i in idx])

    def subsample(self, n: int | None, seed: int) -> Samples:
        """A seeded random subset of ``n`` samples in their original order (all when n is None or larger)."""
        if n is None or n >= len(self):
            return self
        rng = np.random.default_rng(seed)
        return self.take(np.sort(rng.choice(len(self), size=n, replace=False)))


@dataclass
class SampleSets:
    train: Samples
    valid: Samples
    test: Samples


def build_samples(sp: Split, history_len: int = 10, train_stride: int = 1) -> SampleSets:
    train_seq = _sequences(sp.train)
    valid_seq = _sequences(sp.valid)
    test_seq = _sequences(sp.test)
    n = history_len

    tr_u, tr_h, tr_t = [], [], []
    for u, seq in train_seq.items():
        for i in range(1, len(seq)):
            if (len(seq) - 1 - i) % train_stride:  # every train_stride-th position, back from the last
                continue
            tr_u.append(u)
            tr_h.append(seq[max(0, i - n):i])
            tr_t.append(seq[i:i + 1])

    va_u, va_h, va_t, va_x = [], [], [], []
    for u, seq in valid_seq.items():
        if u not in train_seq:
            continue
        past = np.concatenate([train_seq[u], seq])
        start = len(train_seq[u])
        for i in range(start, len(past)):
            va_u.append(u)
            va_h.append(past[max(0, i - n):i])
            va_t.append(past[i:i + 1])
            va_x.append(np.unique(past[:i]))

    te_u, te_h, te_t, te_x = [], [], [], []
    for u, seq in test_seq.items():
        if u not in train_seq:
            continue
        past = np.concatenate([train_seq[u], valid_seq.get(u, seq[:0])])
        te_u.append(u)
        te_h.append(past[-n:])
        te_t.append(np.unique(seq))
        te_x.append(np.unique(past))

    def pack(u, h, t, x=None) -> Samples:
        return Samples(np.asarray(u, dtype=np.int64), h, t, x)

    return SampleSets(pack(tr_u, tr_h, tr_t), pack(va_u, va_h, va_t, va_x), pack(te_u, te_h, te_t, te_x))


def _sequences(frame: pd.DataFrame) -> dict[int, np.ndarray]:
    """user -> items in time order (frame rows are already in time order, ties in file order)."""
    users = frame["user"].to_numpy()
    items = frame["item"].to_numpy()
    order = np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    return {int(g[0]): it for g, it in zip(np.split(users, bounds), np.split(items, bounds), strict=True)
            if len(g)}


def within_domains(sets: SampleSets, user_domain: np.ndarray, item_domain: np.ndarray) -> SampleSets:
    """Valid and test samples that rank only the items of their user's domain: every other domain's
    items join ``exclude`` (a cross-domain federation, where each domain's client recommends from its
    own catalogue, as with datasets kept apart)."""
    user_domain, item_domain = np.asarray(user_domain), np.asarray(item_domain)
    others = {d: np.flatnonzero(item_domain != d) for d in np.unique(user_domain)}

    def restrict(s: Samples) -> Samples:
        exclude = [np.union1d(e if e is not None else np.zeros(0, np.int64), others[user_domain[u]])
                   for u, e in zip(s.user, s.exclude or [None] * len(s), strict=True)]
        return Samples(s.user, s.history, s.targets, exclude)

    return SampleSets(sets.train, restrict(sets.valid), restrict(sets.test))
