"""One dataset cut into domains by an item attribute (issue 16 §5), and ranking within a domain."""

import numpy as np
import pandas as pd
import pytest

from fellrec.config import load_config
from fellrec.data.tables import Dataset, domains_by
from fellrec.errors import ConfigError
from fellrec.holdout import Samples, SampleSets, within_domains
from fellrec.pipeline import load_data, prepare


def films():
    inter = pd.DataFrame({"user_id": ["a", "a", "a", "b", "b", "c"], "item_id": [1, 2, 3, 1, 4, 3],
                          "timestamp": [1, 2, 3, 4, 5, 6]})
    items = pd.DataFrame({"item_id": [1, 2, 3, 4], "title": ["w", "x", "y", "z"],
                          "genres": [("Action", "Drama"), ("Drama",), ("Comedy", "Drama"), ()]})
    return Dataset.from_raw("films", inter, items)


def test_each_item_in_its_first_values_domain_and_each_user_split():
    ds = domains_by(films(), "genres")
    assert sorted(ds.items.domain) == ["Action", "Comedy", "Drama"]  # item 4 has no genre: left out
    pairs = sorted(zip(ds.users.user_id.to_numpy()[ds.interactions.user], ds.interactions.domain, strict=True))
    assert pairs == [("a", "Action"), ("a", "Comedy"), ("a", "Drama"), ("b", "Action"), ("c", "Comedy")]
    assert ds.num_users == 5  # a in three domains is three users
    assert (ds.users.domain.to_numpy()[ds.interactions.user] == ds.interactions.domain.to_numpy()).all()
    assert (ds.items.domain.to_numpy()[ds.interactions.item] == ds.interactions.domain.to_numpy()).all()
    assert "1 interactions with items of other domains left out" in ds.notes[-1].replace(",", "")


def test_values_keep_some_domains_and_bad_names_say_what_there_is():
    ds = domains_by(films(), "genres", ["Drama", "Comedy"])
    assert set(ds.items.domain) == {"Comedy", "Drama"} and len(ds.interactions) == 3
    with pytest.raises(ValueError, match="no item's first genres is 'Horror'; there are Action, Comedy, Drama"):
        domains_by(films(), "genres", ["Horror"])
    with pytest.raises(ValueError, match="items have no attribute 'brand' to cut domains by; they have genres"):
        domains_by(films(), "brand")


def test_movielens_by_first_genre_matches_an_independent_count():
    cfg = load_config(None, ["data.domain_by=genres", "data.domain_values=[Action, Comedy, Drama]", "data.kcore=0"])
    whole = load_data(load_config(None, ["data.kcore=0"]).data, echo=False)
    ds = load_data(cfg.data, echo=False)
    first = {row.item_id: row.genres[0] for row in whole.items.itertuples() if len(row.genres)}
    want = pd.Series([first.get(i) for i in whole.items.item_id.to_numpy()[whole.interactions.item]])
    counts = want[want.isin(["Action", "Comedy", "Drama"])].value_counts().sort_index()
    assert ds.interactions.domain.value_counts().sort_index().to_dict() == counts.to_dict()


def test_within_domains_masks_every_other_domains_items():
    user_domain, item_domain = np.array(["x", "y"]), np.array(["x", "x", "y", "y", "y"])
    s = Samples(np.array([0, 1]), [np.array([0]), np.array([2])], [np.array([1]), np.array([3])],
                [np.array([0]), np.array([2])])
    out = within_domains(SampleSets(s, s, s), user_domain, item_domain)
    assert [e.tolist() for e in out.test.exclude] == [[0, 2, 3, 4], [0, 1, 2]]
    assert out.train is s and [e.tolist() for e in out.valid.exclude] == [[0, 2, 3, 4], [0, 1, 2]]


def test_a_genre_federation_has_one_client_per_domain_ranking_its_own_items():
    cfg = load_config("configs/crossdomain-genres.yaml")
    p = prepare(cfg, echo=False)
    assert p.partition.names == ["Action", "Comedy", "Drama"]
    item_domain, user_domain = p.dataset.items.domain.to_numpy(), p.dataset.users.domain.to_numpy()
    for u, e, t in zip(p.samples.test.user, p.samples.test.exclude, p.samples.test.targets, strict=True):
        ranked = np.setdiff1d(np.arange(p.dataset.num_items), e)
        assert (item_domain[ranked] == user_domain[u]).all() and item_domain[t[0]] == user_domain[u]
        assert p.partition.names[p.client_of(np.array([u]))[0]] == user_domain[u]


def test_domain_options_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.domain_by: items have no attribute 'brand'"):
        prepare(load_config(None, ["data.domain_by=brand"]), echo=False)
    with pytest.raises(ConfigError, match=r"partition\.method.*domain needs several datasets in data\.domains, "
                                          r"or data\.domain_by"):
        load_config(None, ["partition.method=domain"])
