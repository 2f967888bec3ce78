"""FedPA's inputs: integer attribute codes per user and per item, a binary label per interaction,
the public/private user selection and the per-user chronological split of the private users.

Every field has a deterministic vocabulary whose index 0 is reserved for an unknown or missing
value; known values follow in a fixed order (declared bands in band order, everything else
sorted). Users and items are represented only by their attributes, never by their ids, as in the
released FedPA code (research/fedpa.md §1.1).

MovieLens (``ml-100k``, ``ml-100k-recbole``, ``ml-1m``):

- user fields ``age`` (bands <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+: the ML-1M age groups,
  so ML-1M's codes fall into the same bands), ``gender``, ``occupation``, ``zip`` (the first
  character of the zip code when it is a digit, "other" for the non-US codes);
- item fields ``genres`` and ``year``. ``genres`` is a *bag* field: an item carries all its genres
  (width = the largest number of genres of an item, padded with -1) and the model averages their
  embeddings (multi-hot, not the first genre only). ``year`` is the release year in bands
  <1940, 1940s, ..., 1980s, 1990-1994, 1995+;
- label: ``rating >= 4``.

KuaiRand (``kuairand-pure/1k/27k``; §1.2 of the notes):

- user fields: the 23 selected ones (user_active_degree, is_live_streamer, is_video_author, the
  four ``*_range`` fields, onehot_feat0-2, 4-7, 9-17), each categorical;
- item fields: upload_type, music_type, tag (the whole tag string is one value, as the released
  code codes it) and the 3 continuous statistics play_duration, comment_stay_duration,
  complete_play_cnt, binned as the released code does: x' = log1p(x), edges
  [min(x') − 1] + linspace(p1, p99, 99) + [max(x') + 1] over the items' values, giving 100 bins
  (codes 1..100; 0 = missing);
- label: ``is_click`` (the loader's rating), i.e. ``rating >= 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fellrec.data.tables import Dataset
from fellrec.errors import ConfigError

UNKNOWN = "<unk>"
PAD = -1
"""Padding code inside a bag field (never looked up)."""

AGE_EDGES = (-np.inf, 18, 25, 35, 45, 50, 56, np.inf)
AGE_NAMES = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
YEAR_EDGES = (-np.inf, 1940, 1950, 1960, 1970, 1980, 1990, 1995, np.inf)
YEAR_NAMES = ("<1940", "1940s", "1950s", "1960s", "1970s", "1980s", "1990-1994", "1995+")

KUAIRAND_USER_FIELDS = (
    "user_active_degree", "is_live_streamer", "is_video_author", "follow_user_num_range",
    "fans_user_num_range", "friend_user_num_range", "register_days_range",
    *(f"onehot_feat{k}" for k in (0, 1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17)),
)
KUAIRAND_ITEM_FIELDS = ("upload_type", "music_type", "tag")
KUAIRAND_BINNED = ("play_duration", "comment_stay_duration", "complete_play_cnt")


@dataclass
class FeatureTable:
    """Integer codes of every user's and item's attributes, and each interaction's label.

    ``user_codes[u, j]`` is user ``u``'s code in ``user_fields[j]``; ``item_codes`` holds the item
    fields side by side, field j taking ``item_widths[j]`` columns (1 for a plain field, more for a
    bag field padded with ``PAD``). ``vocab[f][c]`` names code ``c`` of field ``f``.
    """

    user_fields: list[str]
    item_fields: list[str]
    item_widths: list[int]
    vocab: dict[str, list[str]]
    user_codes: np.ndarray
    item_codes: np.ndarray
    label: np.ndarray
    kind: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def user_cards(self) -> list[int]:
        return [len(self.vocab[f]) for f in self.user_fields]

    @property
    def item_cards(self) -> list[int]:
        return [len(self.vocab[f]) for f in self.item_fields]

    def user_field(self, name: str) -> int:
        if name not in self.user_fields:
            raise ConfigError(f"fedpa: {name!r} is not a user feature; known: {', '.join(self.user_fields)}")
        return self.user_fields.index(name)


def build_features(ds: Dataset, kind: str = "auto", *, label_threshold: float | None = None) -> FeatureTable:
    """The FeatureTable of ``ds``; ``kind`` is ``movielens``, ``kuairand`` or ``auto`` (from the name)."""
    if kind == "auto":
        name = ds.name.lower()
        kind = "movielens" if name.startswith("ml-") else "kuairand" if name.startswith("kuairand") else ""
        if not kind:
            raise ConfigError(f"fedpa: no feature recipe for dataset {ds.name!r}; FedPA supports MovieLens "
                              "(with user attributes) and KuaiRand")
    if kind == "movielens":
        threshold = 4.0 if label_threshold is None else label_threshold
        return _movielens(ds, threshold)
    if kind == "kuairand":
        threshold = 1.0 if label_threshold is None else label_threshold
        return _kuairand(ds, threshold)
    raise ConfigError(f"fedpa: unknown feature kind {kind!r}; expected auto, movielens, kuairand")


# ---- field encoders ------------------------------------------------------------------------------


def categorical(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Codes 1.. for the distinct non-missing values in sorted order (numbers numerically), 0 = missing."""
    missing = values.isna().to_numpy()
    present = values[~missing]
    uniques = pd.unique(present)
    try:
        ordered = sorted(uniques)
    except TypeError:
        ordered = sorted(uniques, key=str)
    index = {v: k + 1 for k, v in enumerate(ordered)}
    codes = np.zeros(len(values), dtype=np.int64)
    codes[~missing] = present.map(index).to_numpy(dtype=np.int64)
    return codes, [UNKNOWN, *(_name(v) for v in ordered)]


def banded(values: pd.Series, edges, names) -> tuple[np.ndarray, list[str]]:
    """Codes 1..len(names) for the bands ``[edges[k], edges[k+1])``, 0 = missing or not a number."""
    x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    codes = np.searchsorted(np.asarray(edges, dtype=np.float64), x, side="right").astype(np.int64)
    codes[np.isnan(x)] = 0
    return codes, [UNKNOWN, *names]


def bag(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """A multi-valued field (tuples/lists of names): codes [n, width] padded with PAD.

    An empty or missing value becomes the single code 0 (unknown).
    """
    lists = [tuple(v) if isinstance(v, (list, tuple, np.ndarray)) else (() if _missing(v) else (v,))
             for v in values]
    ordered = sorted({str(x) for lst in lists for x in lst})
    index = {v: k + 1 for k, v in enumerate(ordered)}
    width = max([1, *(len(lst) for lst in lists)])
    codes = np.full((len(lists), width), PAD, dtype=np.int64)
    for row, lst in enumerate(lists):
        if lst:
            codes[row, :len(lst)] = [index[str(x)] for x in lst]
        else:
            codes[row, 0] = 0
    return codes, [UNKNOWN, *ordered]


def log_bin_edges(values: np.ndarray, n_bins: int = 100) -> np.ndarray:
    """The released code's bin edges over log1p(values): [min−1] + linspace(p1, p99, n_bins−1) + [max+1]."""
    x = np.log1p(np.asarray(values, dtype=np.float64))
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return np.array([-1.0, 1.0])
    p1, p99 = np.percentile(x, [1, 99])
    return np.concatenate([[x.min() - 1], np.linspace(p1, p99, n_bins - 1), [x.max() + 1]])


def log_binned(values: pd.Series, edges: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Codes 1..len(edges)−1 for log1p(values) in right-closed bins (edges[k], edges[k+1]]; 0 = missing."""
    x = np.log1p(pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan))
    n_bins = len(edges) - 1
    codes = np.searchsorted(edges, x, side="left").clip(1, n_bins).astype(np.int64)
    codes[~np.isfinite(x)] = 0
    return codes, [UNKNOWN, *(f"bin{k}" for k in range(n_bins))]


def _missing(v) -> bool:
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _name(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _zip_prefix(z) -> str | None:
    if _missing(z) or not str(z):
        return None
    first = str(z).strip()[:1]
    return first if first.isdigit() else "other"


# ---- recipes -------------------------------------------------------------------------------------


def _need(table: pd.DataFrame, columns, what: str, ds: Dataset) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ConfigError(f"fedpa: dataset {ds.name!r} has no {what} attribute(s) {', '.join(missing)}")


def _movielens(ds: Dataset, threshold: float) -> FeatureTable:
    _need(ds.users, ("age", "gender", "occupation", "zip_code"), "user", ds)
    _need(ds.items, ("genres", "year"), "item", ds)
    users, items = ds.users, ds.items
    vocab: dict[str, list[str]] = {}
    cols = {}
    cols["age"], vocab["age"] = banded(users["age"], AGE_EDGES, AGE_NAMES)
    cols["gender"], vocab["gender"] = categorical(users["gender"].astype("object"))
    cols["occupation"], vocab["occupation"] = categorical(users["occupation"].map(_name).astype("object"))
    cols["zip"], vocab["zip"] = categorical(users["zip_code"].map(_zip_prefix).astype("object"))
    user_fields = ["age", "gender", "occupation", "zip"]
    genres, vocab["genres"] = bag(items["genres"])
    year, vocab["year"] = banded(items["year"].astype("Float64"), YEAR_EDGES, YEAR_NAMES)
    return FeatureTable(
        user_fields=user_fields, item_fields=["genres", "year"], item_widths=[genres.shape[1], 1], vocab=vocab,
        user_codes=np.stack([cols[f] for f in user_fields], axis=1),
        item_codes=np.concatenate([genres, year[:, None]], axis=1),
        label=(ds.interactions["rating"].to_numpy() >= threshold).astype(np.float32), kind="movielens")


def _kuairand(ds: Dataset, threshold: float) -> FeatureTable:
    _need(ds.users, KUAIRAND_USER_FIELDS, "user", ds)
    _need(ds.items, (*KUAIRAND_ITEM_FIELDS, *KUAIRAND_BINNED), "item", ds)
    vocab: dict[str, list[str]] = {}
    ucols = []
    for f in KUAIRAND_USER_FIELDS:
        codes, vocab[f] = categorical(ds.users[f].astype("object"))
        ucols.append(codes)
    icols = []
    for f in KUAIRAND_ITEM_FIELDS:
        codes, vocab[f] = categorical(ds.items[f].astype("object"))
        icols.append(codes)
    for f in KUAIRAND_BINNED:
        edges = log_bin_edges(ds.items[f].to_numpy(dtype=np.float64, na_value=np.nan))
        codes, vocab[f] = log_binned(ds.items[f], edges)
        icols.append(codes)
    item_fields = [*KUAIRAND_ITEM_FIELDS, *KUAIRAND_BINNED]
    return FeatureTable(
        user_fields=list(KUAIRAND_USER_FIELDS), item_fields=item_fields, item_widths=[1] * len(item_fields),
        vocab=vocab, user_codes=np.stack(ucols, axis=1), item_codes=np.stack(icols, axis=1),
        label=(ds.interactions["rating"].to_numpy() >= threshold).astype(np.float32), kind="kuairand")


# ---- public / private users and the per-user split ---------------------------------------------


def select_public(ds: Dataset, feats: FeatureTable, *, attribute: str | None = None, values=(),
                  fraction: float = 0.2, fraction_in: float = 0.8, fraction_out: float = 0.2,
                  seed: int = 0) -> np.ndarray:
    """Boolean mask [num_users]: the public (Open_Train) users; the others are private (clients).

    With ``attribute`` (the released code's ``divide_users``): ``fraction_in`` of the users whose
    value is in ``values`` plus ``fraction_out`` of the others, each drawn at random. ``attribute``
    is a feature field (its values are matched against the field's vocabulary names, e.g. age band
    "18-24") or a raw user column (matched as strings). Without it: a random ``fraction`` of all users.
    The draws use ``numpy.random.default_rng(seed)`` (not the released ``random.seed(0)`` stream).
    """
    rng = np.random.default_rng(seed)
    n = ds.num_users
    mask = np.zeros(n, dtype=bool)
    if attribute is None:
        _fraction(fraction, "public_fraction")
        mask[rng.choice(n, size=round(fraction * n), replace=False)] = True
        return mask
    _fraction(fraction_in, "public_fraction_in")
    _fraction(fraction_out, "public_fraction_out")
    wanted = {str(v) for v in values}
    if not wanted:
        raise ConfigError("fedpa.public_values: give the attribute values whose users are mostly public")
    if attribute in feats.user_fields:
        names = np.asarray(feats.vocab[attribute], dtype=object)
        raw = names[feats.user_codes[:, feats.user_field(attribute)]]
    elif attribute in ds.users.columns:
        raw = ds.users[attribute].map(_name).to_numpy(dtype=object)
    else:
        raise ConfigError(f"fedpa.public_attribute: users have no attribute {attribute!r}")
    match = np.array([str(v) in wanted for v in raw], dtype=bool)
    for members, frac in ((np.flatnonzero(match), fraction_in), (np.flatnonzero(~match), fraction_out)):
        mask[rng.choice(members, size=round(frac * len(members)), replace=False)] = True
    return mask


def _fraction(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"fedpa.{name}: must be in [0, 1], got {value}")


@dataclass
class UserSplit:
    """Row indices into ``ds.interactions`` (each in time order) and the users of each role."""

    public_users: np.ndarray
    private_users: np.ndarray
    """The private users that become clients (enough interactions)."""
    dropped_users: np.ndarray
    """Private users with fewer than ``min_interactions`` interactions: no client, no evaluation."""
    public_rows: np.ndarray
    train_rows: np.ndarray
    valid_rows: np.ndarray
    test_rows: np.ndarray


def split_users(ds: Dataset, public: np.ndarray, *, ratios=(0.6, 0.2, 0.2), min_interactions: int = 5) -> UserSplit:
    """Public users keep all their interactions (Open_Train); each private user's are split by time.

    Per private user with n interactions: the last ⌊r_test·n⌋ are test, the ⌊r_valid·n⌋ before them
    valid, the rest train (the released ``split_data``). The released code asserts every user is in
    all three parts; here users with fewer than ``min_interactions`` (default 5, the least n that
    gives each part one row with 60/20/20) are dropped explicitly and listed in ``dropped_users``.
    """
    public = np.asarray(public, dtype=bool)
    if public.shape != (ds.num_users,):
        raise ValueError(f"public mask must have shape ({ds.num_users},), got {public.shape}")
    r = np.asarray(ratios, dtype=np.float64)
    if len(r) != 3 or (r < 0).any() or r.sum() <= 0:
        raise ConfigError(f"fedpa.split ratios must be three non-negative numbers, got {list(ratios)}")
    _, r_valid, r_test = r / r.sum()
    inter = ds.interactions
    users = inter["user"].to_numpy()
    size = np.bincount(users, minlength=ds.num_users)
    pos = inter.groupby("user", sort=False).cumcount().to_numpy()
    n = size[users]
    n_test = np.floor(r_test * n).astype(np.int64)
    n_valid = np.floor(r_valid * n).astype(np.int64)
    part = np.where(pos >= n - n_test, 2, np.where(pos >= n - n_test - n_valid, 1, 0))
    private_all = np.flatnonzero(~public & (size > 0))
    enough = size >= min_interactions
    keep_user = ~public & enough
    kept = keep_user[users]
    return UserSplit(
        public_users=np.flatnonzero(public & (size > 0)),
        private_users=private_all[enough[private_all]],
        dropped_users=private_all[~enough[private_all]],
        public_rows=np.flatnonzero(public[users]),
        train_rows=np.flatnonzero(kept & (part == 0)),
        valid_rows=np.flatnonzero(kept & (part == 1)),
        test_rows=np.flatnonzero(kept & (part == 2)),
    )
