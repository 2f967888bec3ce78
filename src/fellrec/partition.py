"""Partitions: which client (a group of users) each user belongs to.

Every method takes the Dataset and its TRAIN interactions (``user``, ``item`` dense ids) and
returns a :class:`Partition`: ``client_of_user[u]`` is the client of user ``u`` (0..M-1, every
client non-empty), or -1 for a user with no training interaction (such users take no part).

Methods (``make_partition`` picks one by name):

- ``kmeans``: FELLRec's partition — BPR-MF user embeddings clustered by k-means.
- ``attribute``: one client per value (or numeric band) of a user attribute.
- ``user``: one client per user (cross-device federation).
- ``dirichlet``: label skew over item categories with a Dirichlet(α) concentration.
- ``domain``: one client per dataset of a multi-dataset load.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from fellrec.data.tables import Dataset
from fellrec.errors import ConfigError
from fellrec.mf import train_bpr

NO_CLIENT = -1


@dataclass(frozen=True)
class Partition:
    """Users grouped into clients."""

    client_of_user: np.ndarray
    """int64 [num_users]: the client of each user, -1 for users without training data."""
    names: list[str]
    """A readable name for each client (attribute value, domain, cluster number, ...)."""
    method: str = ""

    @property
    def num_clients(self) -> int:
        return len(self.names)

    def members(self, client: int) -> np.ndarray:
        """Dense ids of the users of ``client``, ascending."""
        return np.flatnonzero(self.client_of_user == client)

    def sizes(self) -> np.ndarray:
        """Number of users of each client."""
        assigned = self.client_of_user[self.client_of_user >= 0]
        return np.bincount(assigned, minlength=self.num_clients)


# ---------------------------------------------------------------------------------------------
# methods


def kmeans(ds: Dataset, train: pd.DataFrame, *, num_clients: int = 5, seed: int = 0,
           mf_options: dict | None = None, progress: bool = False) -> Partition:
    """FELLRec's partition: cluster users by their collaborative taste.

    Trains BPR-MF (:func:`fellrec.mf.train_bpr`, ``mf_options`` overriding its defaults) on the
    training interactions, then runs ``KMeans(n_clusters=num_clients, random_state=seed,
    n_init=10)`` on the embeddings of the users that have training data. Clients are numbered by
    their lowest user id, so the numbering does not depend on k-means' arbitrary label order.
    """
    active = _active_users(ds, train)
    _need_clients(num_clients, len(active), "kmeans")
    options = {"seed": seed, "progress": progress, **(mf_options or {})}
    try:
        result = train_bpr(train["user"].to_numpy(), train["item"].to_numpy(), ds.num_users,
                           ds.num_items, **options)
    except TypeError as err:
        raise ConfigError(f"partition kmeans: bad mf_options ({err})") from None
    labels = KMeans(n_clusters=num_clients, random_state=seed, n_init=10).fit_predict(
        result.user_emb[active])
    client = np.full(ds.num_users, NO_CLIENT, dtype=np.int64)
    client[active] = labels
    client, _ = _renumber(client)
    return Partition(client, [f"cluster-{c}" for c in range(client.max() + 1)], "kmeans")


def attribute(ds: Dataset, train: pd.DataFrame, *, column: str,
              bins: Sequence[float] | None = None) -> Partition:
    """One client per value of the user attribute ``column`` (e.g. ``occupation``, ``gender``).

    With ``bins`` (ascending edges), a numeric attribute is banded instead: band ``k`` holds
    values in ``[bins[k], bins[k+1])`` and is named like ``"18-24"`` for integer edges
    (``"<18"`` / ``"56+"`` where an edge is ±inf). Bands and values no training user has make no
    client. Clients follow the sorted values (bands: ascending). Raises ConfigError if the
    column is missing or a training user has no value (or one outside the bins).
    """
    if column not in ds.users.columns or column == "user":
        available = [c for c in ds.users.columns if c != "user"]
        raise ConfigError(f"partition attribute: users have no {column!r} column; "
                          f"available: {', '.join(available) or 'none'}")
    active = _active_users(ds, train)
    values = ds.users[column].iloc[active].reset_index(drop=True)
    missing = values.isna()
    if missing.any():
        example = ds.users["user_id"].iloc[active[missing.to_numpy()][0]]
        raise ConfigError(f"partition attribute: {int(missing.sum())} user(s) with training data have "
                          f"no {column!r} value, e.g. user {example!r}")
    if bins is not None:
        codes, names = _band(values, column, list(bins))
    else:
        codes, names = _factorize(values)
    client = np.full(ds.num_users, NO_CLIENT, dtype=np.int64)
    client[active] = codes
    client, kept = _renumber(client, order="label")
    return Partition(client, [names[k] for k in kept], "attribute")


def user(ds: Dataset, train: pd.DataFrame) -> Partition:
    """One client per user with training data (cross-device), in user-id order, named by user_id."""
    active = _active_users(ds, train)
    client = np.full(ds.num_users, NO_CLIENT, dtype=np.int64)
    client[active] = np.arange(len(active))
    names = [str(v) for v in ds.users["user_id"].iloc[active]]
    return Partition(client, names, "user")


def dirichlet(ds: Dataset, train: pd.DataFrame, *, num_clients: int = 5, alpha: float = 0.5,
              seed: int = 0, category: str | None = None, min_users: int = 1,
              max_tries: int = 100) -> Partition:
    """Label-skewed clients: each category's users are dealt out in Dirichlet(α) proportions.

    A user's label is the most frequent category among their training items (ties: the
    category first in sorted order), an item's category being the first element of its
    attribute ``category`` (default: the first of ``genres``/``categories`` the items have; a
    plain string counts as one category; items without one are skipped, and a user with no
    categorised item gets the label ``"<none>"``). For each label, in sorted order, client
    shares are drawn from Dir(α·1_M) and the label's users, shuffled, are split in those shares.
    Small α concentrates each label on few clients; large α approaches an even mix. Draws are
    repeated (up to ``max_tries``) until every client has at least ``min_users`` users.
    """
    _need_clients(num_clients, None, "dirichlet")
    if not alpha > 0:
        raise ConfigError(f"partition dirichlet: alpha must be positive, got {alpha}")
    if min_users < 1:
        raise ConfigError(f"partition dirichlet: min_users must be at least 1, got {min_users}")
    active = _active_users(ds, train)
    if len(active) < num_clients * min_users:
        raise ConfigError(f"partition dirichlet: {len(active)} users with training data cannot fill "
                          f"{num_clients} clients with at least {min_users} each; lower num_clients")
    labels = user_labels(ds, train, category)
    groups = [np.asarray(g, dtype=np.int64) for _, g in
              pd.Series(active).groupby(labels.iloc[active].to_numpy(), sort=True)]
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        client = _deal(groups, num_clients, alpha, rng, ds.num_users)
        if np.bincount(client[client >= 0], minlength=num_clients).min() >= min_users:
            return Partition(client, [f"client-{c}" for c in range(num_clients)], "dirichlet")
    raise ConfigError(f"partition dirichlet: no draw in {max_tries} gave every one of {num_clients} "
                      f"clients at least {min_users} user(s) (alpha={alpha}); raise alpha or lower "
                      f"num_clients")


def domain(ds: Dataset, train: pd.DataFrame) -> Partition:
    """One client per ``domain`` (datasets loaded together), clients in sorted domain order."""
    if "domain" not in ds.users.columns:
        raise ConfigError(f"partition domain: dataset {ds.name!r} has no 'domain' column; load several "
                          f"datasets together to partition by domain")
    return replace(attribute(ds, train, column="domain"), method="domain")


# ---------------------------------------------------------------------------------------------
# dispatcher

METHODS: dict[str, Callable[..., Partition]] = {
    "kmeans": kmeans,
    "attribute": attribute,
    "user": user,
    "dirichlet": dirichlet,
    "domain": domain,
}


def make_partition(method: str, ds: Dataset, train: pd.DataFrame, *, num_clients: int = 5,
                   seed: int = 0, **options) -> Partition:
    """Partition with the method called ``method``; ``options`` are that method's own arguments.

    ``num_clients`` and ``seed`` are passed to the methods that use them (kmeans, dirichlet) and
    ignored by the others, whose number of clients follows from the data. Raises ConfigError for
    an unknown method or an option the method does not take.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown partition method {method!r}; valid: {', '.join(METHODS)}")
    func = METHODS[method]
    params = inspect.signature(func).parameters
    accepted = [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"partition {method}: unknown option(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(accepted) or 'none'}")
    missing = [name for name in accepted if params[name].default is inspect.Parameter.empty
               and name not in options]
    if missing:
        raise ConfigError(f"partition {method}: missing option(s) {', '.join(missing)}")
    shared = {k: v for k, v in (("num_clients", num_clients), ("seed", seed)) if k in accepted}
    return func(ds, train, **shared, **options)


# ---------------------------------------------------------------------------------------------
# helpers


def user_labels(ds: Dataset, train: pd.DataFrame, category: str | None = None) -> pd.Series:
    """Each user's most frequent item category in ``train`` (index: dense user id, all users).

    Users without training data, or without a categorised training item, get ``"<none>"``.
    """
    column = _category_column(ds, category)
    first = ds.items[column].map(_first_category)
    cats = first.to_numpy()[train["item"].to_numpy()]
    pairs = pd.DataFrame({"user": train["user"].to_numpy(), "cat": cats}).dropna()
    counts = pairs.groupby(["user", "cat"]).size().reset_index(name="n")
    counts = counts.sort_values(["user", "n", "cat"], ascending=[True, False, True], kind="stable")
    top = counts.drop_duplicates("user").set_index("user")["cat"]
    return top.reindex(range(ds.num_users)).fillna("<none>").astype(str)


def _category_column(ds: Dataset, category: str | None) -> str:
    if category is not None:
        if category not in ds.items.columns:
            available = [c for c in ds.items.columns if c not in ("item", "item_id", "title")]
            raise ConfigError(f"partition dirichlet: items have no {category!r} column; "
                              f"available: {', '.join(available) or 'none'}")
        return category
    for name in ("genres", "categories"):
        if name in ds.items.columns:
            return name
    raise ConfigError("partition dirichlet: items have neither 'genres' nor 'categories'; "
                      "name the item attribute to use with the 'category' option")


def _first_category(value) -> str | None:
    """The first category of an item attribute value (list/tuple/array or a single string)."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, (list, tuple, np.ndarray)):
        return str(value[0]) if len(value) else None
    if pd.isna(value):
        return None
    return str(value)


def _deal(groups: list[np.ndarray], num_clients: int, alpha: float, rng: np.random.Generator,
          num_users: int) -> np.ndarray:
    """One Dirichlet draw: split each group of users among the clients in Dir(α) shares."""
    client = np.full(num_users, NO_CLIENT, dtype=np.int64)
    for members in groups:
        shares = rng.dirichlet(np.full(num_clients, alpha))
        shuffled = rng.permutation(members)
        cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
        for c, part in enumerate(np.split(shuffled, cuts)):
            client[part] = c
    return client


def _active_users(ds: Dataset, train: pd.DataFrame) -> np.ndarray:
    """Dense ids of the users with at least one training interaction, ascending."""
    active = np.unique(train["user"].to_numpy()).astype(np.int64)
    if len(active) and (active[0] < 0 or active[-1] >= ds.num_users):
        raise ValueError("train has user ids outside the dataset")
    return active


def _need_clients(num_clients: int, available: int | None, method: str) -> None:
    """Check ``num_clients`` is a positive int and, given ``available`` users, not more than them."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError(f"partition {method}: num_clients must be a positive integer, got {num_clients!r}")
    if available is not None and num_clients > available:
        raise ConfigError(f"partition {method}: {num_clients} clients but only {available} users "
                          f"with training data; lower num_clients")


def _factorize(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Codes and names of the distinct values, in sorted order (by string where types mix)."""
    keys = values.map(lambda v: tuple(v) if isinstance(v, (list, np.ndarray)) else v)
    try:
        uniques = sorted(set(keys))
    except TypeError:
        uniques = sorted(set(keys), key=str)
    index = {v: k for k, v in enumerate(uniques)}
    return keys.map(index).to_numpy(dtype=np.int64), [str(v) for v in uniques]


def _band(values: pd.Series, column: str, edges: list[float]) -> tuple[np.ndarray, list[str]]:
    """Band numeric values into ``[edges[k], edges[k+1])``; codes and band names."""
    if len(edges) < 2 or any(b <= a for a, b in pairwise(edges)):
        raise ConfigError(f"partition attribute: bins must be at least two strictly ascending edges, "
                          f"got {edges}")
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.isna().any():
        bad = values[numeric.isna()].iloc[0]
        raise ConfigError(f"partition attribute: bins need a numeric {column!r}, found {bad!r}")
    x = numeric.to_numpy(dtype=float)
    codes = np.searchsorted(np.asarray(edges, dtype=float), x, side="right") - 1
    outside = (codes < 0) | (codes >= len(edges) - 1)
    if outside.any():
        raise ConfigError(f"partition attribute: {int(outside.sum())} user(s) have {column} outside the "
                          f"bins [{edges[0]}, {edges[-1]}), e.g. {x[outside][0]:g}")
    return codes.astype(np.int64), [_band_name(a, b) for a, b in pairwise(edges)]


def _band_name(low: float, high: float) -> str:
    """``[18, 25)`` → "18-24", ``[56, inf)`` → "56+", ``[-inf, 18)`` → "<18", else "0.5-1.5"."""
    def fmt(v: float) -> str:
        return f"{v:g}"
    if math.isinf(high):
        return f"{fmt(low)}+"
    if math.isinf(low):
        return f"<{fmt(high)}"
    if float(low).is_integer() and float(high).is_integer():
        return f"{int(low)}-{int(high) - 1}"
    return f"{fmt(low)}-{fmt(high)}"


def _renumber(client: np.ndarray, order: str = "first") -> tuple[np.ndarray, list[int]]:
    """Drop empty clients and number the rest 0..M-1.

    ``order="first"``: by the lowest user id in each client; ``"label"``: keep the labels'
    order. Returns the new array and, for each new client, its old label.
    """
    assigned = client >= 0
    old = client[assigned]
    if order == "first":
        labels, first = np.unique(old, return_index=True)
        kept = labels[np.argsort(first, kind="stable")]
    else:
        kept = np.unique(old)
    new_of_old = np.full(int(old.max()) + 1 if len(old) else 0, NO_CLIENT, dtype=np.int64)
    new_of_old[kept] = np.arange(len(kept))
    out = np.full_like(client, NO_CLIENT)
    out[assigned] = new_of_old[old]
    return out, [int(k) for k in kept]
