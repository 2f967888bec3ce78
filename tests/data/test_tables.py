"""The canonical tables: dense ids, original ids kept, stable time order, domains."""

import pandas as pd
import pytest

from fellrec.data.tables import Dataset, concat_domains
from fellrec.errors import DataError


def make(users, items, times, name="d"):
    inter = pd.DataFrame({"user_id": users, "item_id": items, "timestamp": times})
    catalogue = pd.DataFrame({"item_id": sorted(set(items)), "title": [f"T{i}" for i in sorted(set(items))]})
    return Dataset.from_raw(name, inter, catalogue)


def test_dense_ids_follow_sorted_original_ids_and_ties_keep_file_order():
    ds = make(["u9", "u1", "u9", "u1"], [30, 10, 20, 30], [5, 5, 5, 1])
    assert ds.users.user_id.tolist() == ["u1", "u9"] and ds.users.user.tolist() == [0, 1]
    assert ds.items.item_id.tolist() == [10, 20, 30]
    # time order, and the three rows at time 5 in file order
    pairs = [(ds.users.user_id[u], ds.items.item_id[i]) for u, i in
             zip(ds.interactions.user, ds.interactions.item, strict=True)]
    assert pairs == [("u1", 30), ("u9", 30), ("u1", 10), ("u9", 20)]
    assert (ds.interactions.rating == 1.0).all()


def test_items_without_interactions_are_dropped_and_unknown_items_rejected():
    inter = pd.DataFrame({"user_id": [1], "item_id": [2], "timestamp": [0.0]})
    items = pd.DataFrame({"item_id": [2, 3], "title": ["a", "b"]})
    assert Dataset.from_raw("d", inter, items).num_items == 1
    with pytest.raises(DataError, match=r"1 interaction\(s\) with an unknown item, e.g. 7"):
        Dataset.from_raw("d", inter.assign(item_id=[7]), items, source="x.csv")


def test_subset_redensifies():
    ds = make(["a", "b", "c"], [1, 2, 3], [1, 2, 3])
    sub = ds.subset(ds.interactions.user != 1, note="dropped b")
    assert sub.users.user_id.tolist() == ["a", "c"] and sub.num_items == 2
    assert sub.interactions.user.tolist() == [0, 1]
    assert sub.notes == ["dropped b"]


def test_concat_domains_keeps_same_ids_apart():
    books = make([1, 2], [10, 11], [3, 1], name="books")
    films = make([1, 1], [10, 12], [2, 4], name="films")
    ds = concat_domains({"books": books, "films": films})
    assert ds.num_users == 3 and ds.num_items == 4  # user 1 and item 10 exist in both domains
    assert set(ds.users.domain) == {"books", "films"}
    inter = ds.interactions
    assert inter.timestamp.tolist() == [1, 2, 3, 4]
    assert inter.domain.tolist() == ["books", "films", "books", "films"]
    # every interaction's user and item belong to its own domain
    assert (ds.users.domain.to_numpy()[inter.user] == inter.domain.to_numpy()).all()
    assert (ds.items.domain.to_numpy()[inter.item] == inter.domain.to_numpy()).all()


def test_density_counts_distinct_pairs_and_reports_repeats():
    # user a saw item 1 three times and item 2 once; b saw item 1 twice: 3 distinct pairs of 2 x 2
    ds = make(["a", "a", "a", "a", "b", "b"], [1, 1, 2, 1, 1, 1], [1, 2, 3, 4, 5, 6])
    s = ds.summary()
    assert s["interactions"] == 6 and s["pairs"] == 3 and s["repeated_pairs"] == 3
    assert s["density"] == 3 / 4  # was 6 / 4 = 150%
    assert make(["a", "b"], [1, 2], [1, 2]).summary()["repeated_pairs"] == 0


def test_items_without_title_get_their_id_and_one_note():
    inter = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [2, 3, 4], "timestamp": [0.0, 1.0, 2.0]})
    items = pd.DataFrame({"item_id": [5, 4, 3, 2], "title": ["", None, " ", "Two"], "_line": [2, 3, 4, 5]})
    ds = Dataset.from_raw("d", inter, items, item_source="items.csv")
    assert ds.items.title.tolist() == ["Two", "item 3", "item 4"]  # item 5 is never seen: dropped, not counted
    assert ds.notes == ["2 items have no title and are named by their id instead ('item 4', ...); the first is "
                        "at items.csv:3"]
    # a format without titles at all: every item named by its id, said once
    bare = Dataset.from_raw("d", inter, items.drop(columns=["title", "_line"]))
    assert bare.items.title.tolist() == ["item 2", "item 3", "item 4"]
    assert bare.notes == ["the items have no titles in this format; all 3 are named by their id instead "
                          "('item 4', ...)"]  # the file's first
    assert list(bare.items.columns) == ["item", "item_id", "title"]


def test_skipped_lines_survive_filtering_and_domains():
    ds = make(["a", "b"], [1, 2], [1, 2])
    ds.skipped["r.csv"] = (3, "line 2: bad")
    assert ds.subset(ds.interactions.user == 0).num_skipped == 3
    assert concat_domains({"x": ds, "y": make(["c"], [1], [1])}).skipped == {"r.csv": (3, "line 2: bad")}
