"""Partitions of users into clients: kmeans, attribute, user, dirichlet, domain, dispatcher."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from fellrec import partition as P
from fellrec.data.tables import Dataset, concat_domains
from fellrec.errors import ConfigError

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Western"]
OCCUPATIONS = ["artist", "doctor", "writer", "engineer"]


def planted(n_users=60, n_genres=3, per_genre=10, per_user=8, noise=1, seed=0) -> Dataset:
    """User k likes genre k % n_genres: ``per_user`` items of it plus ``noise`` random items."""
    rng = np.random.default_rng(seed)
    n_items = n_genres * per_genre
    items = pd.DataFrame({"item_id": [f"i{k:03d}" for k in range(n_items)],
                          "title": [f"Movie {k}" for k in range(n_items)],
                          "genres": [(GENRES[k // per_genre], "Extra") for k in range(n_items)]})
    rows = []
    for u in range(n_users):
        liked = rng.choice(per_genre, per_user, replace=False) + (u % n_genres) * per_genre
        picks = [*liked, *rng.choice(n_items, noise, replace=False)]
        rows += [(f"u{u:03d}", f"i{i:03d}") for i in dict.fromkeys(picks)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id"])
    inter["timestamp"] = np.arange(len(rows), dtype=float)
    users = pd.DataFrame({"user_id": [f"u{u:03d}" for u in range(n_users)],
                          "occupation": [OCCUPATIONS[u % 4] for u in range(n_users)],
                          "gender": ["F" if u % 5 < 2 else "M" for u in range(n_users)],
                          "age": [15 + (u * 7) % 50 for u in range(n_users)]})
    return Dataset.from_raw("planted", inter, items, users)


def taste(ds: Dataset, n_genres=3) -> np.ndarray:
    """The planted group of each dense user."""
    return ds.users["user_id"].str[1:].astype(int).to_numpy() % n_genres


def without_users(ds: Dataset, dense_users) -> pd.DataFrame:
    """The train split with every interaction of ``dense_users`` removed."""
    return ds.interactions[~ds.interactions["user"].isin(dense_users)]


def raw_interactions(ds: Dataset) -> pd.DataFrame:
    """The interactions keyed by original ids again, as a loader hands them to Dataset.from_raw."""
    inter = ds.interactions
    return inter.assign(user_id=ds.users["user_id"].to_numpy()[inter["user"]],
                        item_id=ds.items["item_id"].to_numpy()[inter["item"]]).drop(columns=["user", "item"])


def check_contract(p: P.Partition, ds: Dataset, train: pd.DataFrame) -> None:
    c = p.client_of_user
    assert c.dtype == np.int64 and c.shape == (ds.num_users,)
    active = np.zeros(ds.num_users, dtype=bool)
    active[train["user"].unique()] = True
    assert (c[~active] == -1).all() and (c[active] >= 0).all()
    assert c.max() == p.num_clients - 1 == len(p.names) - 1
    assert (p.sizes() > 0).all() and p.sizes().sum() == active.sum()


def label_entropy(client: np.ndarray, labels: np.ndarray) -> float:
    """Mean over clients of the entropy (nats) of their users' label distribution."""
    out = []
    for c in range(client.max() + 1):
        _, counts = np.unique(labels[client == c], return_counts=True)
        share = counts / counts.sum()
        out.append(float(-(share * np.log(share)).sum()))
    return float(np.mean(out))


# --- kmeans ----------------------------------------------------------------------------------


def test_kmeans_recovers_planted_groups():
    ds = planted()
    train = ds.interactions
    p = P.kmeans(ds, train, num_clients=3, seed=0)
    check_contract(p, ds, train)
    assert p.num_clients == 3 and p.method == "kmeans"
    assert adjusted_rand_score(taste(ds), p.client_of_user) > 0.9
    assert p.client_of_user[0] == 0  # clients are numbered by their lowest user


def test_kmeans_deterministic_and_skips_users_without_train():
    ds = planted()
    train = without_users(ds, [0, 7])
    a = P.kmeans(ds, train, num_clients=3, seed=3, mf_options={"epochs": 10})
    b = P.kmeans(ds, train, num_clients=3, seed=3, mf_options={"epochs": 10})
    check_contract(a, ds, train)
    np.testing.assert_array_equal(a.client_of_user, b.client_of_user)
    assert a.client_of_user[0] == a.client_of_user[7] == -1
    assert a.client_of_user[1] == 0


def test_kmeans_errors():
    ds = planted(n_users=6, n_genres=3, per_genre=3, per_user=2)
    with pytest.raises(ConfigError, match="only 6 users"):
        P.kmeans(ds, ds.interactions, num_clients=7)
    with pytest.raises(ConfigError, match="positive integer"):
        P.kmeans(ds, ds.interactions, num_clients=0)
    with pytest.raises(ConfigError, match="mf_options"):
        P.kmeans(ds, ds.interactions, num_clients=2, mf_options={"learning_rate": 1})


# --- attribute -------------------------------------------------------------------------------


def test_attribute_matches_groupby():
    ds = planted()
    train = without_users(ds, [5])
    p = P.attribute(ds, train, column="occupation")
    check_contract(p, ds, train)
    assert p.names == sorted(OCCUPATIONS)
    expected = ds.users[ds.users["user"] != 5].groupby("occupation")["user"].apply(sorted)
    for k, name in enumerate(p.names):
        assert p.members(k).tolist() == expected[name]
    gender = P.attribute(ds, train, column="gender")
    assert gender.names == ["F", "M"] and gender.sizes().tolist() == [23, 36]  # user 5 is F


def test_attribute_bins():
    ds = planted(n_users=12)
    ages = ds.users["age"].to_numpy()  # 15, 22, 29, ..., 57, 64, 21, ...
    p = P.attribute(ds, ds.interactions, column="age", bins=[0, 18, 25, 35, 50, float("inf")])
    check_contract(p, ds, ds.interactions)
    assert p.names == ["0-17", "18-24", "25-34", "35-49", "50+"]
    for u, age in enumerate(ages):
        band = 0 if age < 18 else 1 if age < 25 else 2 if age < 35 else 3 if age < 50 else 4
        assert p.client_of_user[u] == band, (u, age)


def test_attribute_bins_drop_empty_bands():
    ds = planted(n_users=12)
    p = P.attribute(ds, ds.interactions, column="age", bins=[10, 20, 30, 1000, 2000])
    assert p.names == ["10-19", "20-29", "30-999"]  # no user is 1000 or older
    check_contract(p, ds, ds.interactions)


def test_attribute_errors():
    ds = planted(n_users=12)
    with pytest.raises(ConfigError, match=r"no 'zip' column; available: user_id, occupation, gender, age"):
        P.attribute(ds, ds.interactions, column="zip")
    with pytest.raises(ConfigError, match="outside the bins"):
        P.attribute(ds, ds.interactions, column="age", bins=[18, 30, 40])
    with pytest.raises(ConfigError, match="ascending"):
        P.attribute(ds, ds.interactions, column="age", bins=[0, 50, 40])
    with pytest.raises(ConfigError, match="numeric 'gender'"):
        P.attribute(ds, ds.interactions, column="gender", bins=[0, 1])
    users = ds.users.drop(columns="user").assign(gender=[None, *ds.users["gender"][1:]])
    inter = raw_interactions(ds)
    holey = Dataset.from_raw("holey", inter, ds.items.drop(columns="item"), users)
    with pytest.raises(ConfigError, match=r"1 user\(s\) with training data have no 'gender' value"):
        P.attribute(holey, holey.interactions, column="gender")
    # a user lacking the value but without training data takes no part anyway
    assert P.attribute(holey, without_users(holey, [0]), column="gender").num_clients == 2


# --- user ------------------------------------------------------------------------------------


def test_user_partition():
    ds = planted(n_users=20)
    train = without_users(ds, [3])
    p = P.user(ds, train)
    check_contract(p, ds, train)
    assert p.num_clients == 19
    assert p.client_of_user[:5].tolist() == [0, 1, 2, -1, 3]
    assert p.names[3] == "u004"


# --- dirichlet -------------------------------------------------------------------------------


def test_user_labels_most_frequent_first_genre():
    ds = planted(n_users=30, noise=1)
    labels = P.user_labels(ds, ds.interactions)
    assert labels.tolist() == [GENRES[g] for g in taste(ds)]  # 8 liked + 1 noise item


def test_dirichlet_assigns_each_train_user_once():
    ds = planted(n_users=300, n_genres=6)
    train = without_users(ds, [0, 1])
    p = P.dirichlet(ds, train, num_clients=5, alpha=0.5, seed=0)
    check_contract(p, ds, train)
    assert p.num_clients == 5 and p.names[0] == "client-0"


def test_dirichlet_skew_follows_alpha():
    ds = planted(n_users=300, n_genres=6)
    labels = taste(ds, 6)
    entropy = {alpha: np.mean([label_entropy(P.dirichlet(ds, ds.interactions, num_clients=5, alpha=alpha,
                                                         seed=s).client_of_user, labels) for s in range(3)])
               for alpha in (0.1, 100.0)}
    assert entropy[0.1] < 0.5 * entropy[100.0]
    assert entropy[100.0] > 0.9 * np.log(6)  # close to a uniform mix of the 6 labels


def test_dirichlet_reproducible():
    ds = planted(n_users=300, n_genres=6)
    a = P.dirichlet(ds, ds.interactions, num_clients=5, alpha=1.0, seed=4)
    b = P.dirichlet(ds, ds.interactions, num_clients=5, alpha=1.0, seed=4)
    c = P.dirichlet(ds, ds.interactions, num_clients=5, alpha=1.0, seed=5)
    np.testing.assert_array_equal(a.client_of_user, b.client_of_user)
    assert not np.array_equal(a.client_of_user, c.client_of_user)


def test_dirichlet_min_users_and_errors():
    ds = planted(n_users=300, n_genres=6)
    p = P.dirichlet(ds, ds.interactions, num_clients=4, alpha=5.0, seed=0, min_users=40)
    assert p.sizes().min() >= 40
    with pytest.raises(ConfigError, match="raise alpha or lower num_clients"):
        P.dirichlet(ds, ds.interactions, num_clients=10, alpha=1e-3, seed=0, min_users=20, max_tries=20)
    with pytest.raises(ConfigError, match="cannot fill"):
        P.dirichlet(ds, ds.interactions, num_clients=301, alpha=1.0)
    with pytest.raises(ConfigError, match="alpha must be positive"):
        P.dirichlet(ds, ds.interactions, alpha=0)
    with pytest.raises(ConfigError, match="no 'brand' column"):
        P.dirichlet(ds, ds.interactions, category="brand")


def test_dirichlet_categories_column_and_plain_strings():
    ds = planted(n_users=60)
    items = ds.items.drop(columns=["item", "genres"]).assign(
        categories=[g[0] for g in ds.items["genres"]])  # one plain string per item
    inter = raw_interactions(ds)
    ds2 = Dataset.from_raw("cats", inter, items, ds.users.drop(columns="user"))
    assert P.user_labels(ds2, ds2.interactions).tolist() == [GENRES[g] for g in taste(ds2)]
    with pytest.raises(ConfigError, match="neither 'genres' nor 'categories'"):
        bare = Dataset.from_raw("bare", inter, items.drop(columns="categories"))
        P.dirichlet(bare, bare.interactions)


# --- domain ----------------------------------------------------------------------------------


def test_domain_partition():
    both = concat_domains({"movies": planted(n_users=12), "books": planted(n_users=9, seed=1)})
    train = without_users(both, [0])
    p = P.domain(both, train)
    check_contract(p, both, train)
    assert p.names == ["books", "movies"] and p.method == "domain"
    expected = both.users["domain"].map({"books": 0, "movies": 1}).to_numpy().copy()
    expected[0] = -1
    np.testing.assert_array_equal(p.client_of_user, expected)
    with pytest.raises(ConfigError, match="no 'domain' column"):
        P.domain(planted(n_users=6), planted(n_users=6).interactions)


# --- dispatcher ------------------------------------------------------------------------------


def test_make_partition_dispatches():
    ds = planted(n_users=300, n_genres=6)
    via = P.make_partition("dirichlet", ds, ds.interactions, num_clients=4, seed=2, alpha=0.3)
    direct = P.dirichlet(ds, ds.interactions, num_clients=4, seed=2, alpha=0.3)
    np.testing.assert_array_equal(via.client_of_user, direct.client_of_user)
    occ = P.make_partition("attribute", ds, ds.interactions, num_clients=99, seed=1, column="occupation")
    assert occ.num_clients == 4  # num_clients does not apply to attribute partitions
    assert P.make_partition("user", ds, ds.interactions).num_clients == 300


def test_make_partition_errors():
    ds = planted(n_users=12)
    with pytest.raises(ConfigError, match="'random'; valid: kmeans, attribute, user, dirichlet, domain"):
        P.make_partition("random", ds, ds.interactions)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) alpha; valid: column, bins"):
        P.make_partition("attribute", ds, ds.interactions, column="age", alpha=1)
    with pytest.raises(ConfigError, match=r"missing option\(s\) column"):
        P.make_partition("attribute", ds, ds.interactions)
