"""Loaders of the datasets users download (Amazon 2018/2023, GoodReads, MicroLens, KuaiRand).

Each test writes a small file set in the exact public layout (real file names, keys, headers,
gzip where the release is gzipped), loads it, and checks content; the bad-input tests check that
the error names the file, the line and the problem, and that skip mode keeps the other rows.
"""

from __future__ import annotations

import gzip
import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fellrec.data.amazon import load_amazon2018, load_amazon2023
from fellrec.data.goodreads import load_goodreads, parse_date
from fellrec.data.io import BadLines
from fellrec.data.kuairand import load_kuairand
from fellrec.data.microlens import load_microlens
from fellrec.data.registry import load_dataset
from fellrec.errors import ConfigError, DataError

# ----------------------------------------------------------------------------------------- helpers


def write_lines(path: Path, lines: list[str], gz: bool = False) -> Path:
    text = "".join(line + "\n" for line in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_json(path: Path, objects: list[dict | str], gz: bool = True) -> Path:
    """One JSON object per line; a str is written as is (to plant a malformed line)."""
    return write_lines(path, [o if isinstance(o, str) else json.dumps(o) for o in objects], gz)


def truncate(path: Path) -> None:
    """Cut a gzip file in the middle of its compressed stream."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def rows(ds) -> list[tuple]:
    """(user_id, item_id, timestamp, rating) in the Dataset's order, with the source's ids."""
    inter = ds.interactions
    users = ds.users["user_id"].to_numpy()[inter["user"].to_numpy()]
    items = ds.items["item_id"].to_numpy()[inter["item"].to_numpy()]
    return list(zip(users.tolist(), items.tolist(), inter["timestamp"].tolist(), inter["rating"].tolist(),
                    strict=True))


def titles(ds) -> dict:
    return dict(zip(ds.items["item_id"].tolist(), ds.items["title"].tolist(), strict=True))


def item_row(ds, item_id) -> dict:
    return ds.items.loc[ds.items["item_id"] == item_id].iloc[0].to_dict()


# ------------------------------------------------------------------------------------ Amazon 2018


def review18(user: str, asin: str, overall, when, **extra) -> dict:
    """A review line with the 2018 release's keys."""
    return {"overall": overall, "verified": True, "reviewTime": "10 17, 2015", "reviewerID": user,
            "asin": asin, "reviewerName": f"name of {user}", "reviewText": "Fun.", "summary": "Good",
            "unixReviewTime": when, **extra}


def meta18(asin: str, title: str | None, **extra) -> dict:
    obj = {"category": ["Video Games", "PC", "Games"], "tech1": "", "description": ["A game."], "fit": "",
           "also_buy": ["B0000X"], "tech2": "", "brand": "Acme", "feature": [],
           "rank": "1,234 in Video Games (", "also_view": [], "main_cat": "Video Games", "similar_item": "",
           "date": "", "price": "$19.99", "asin": asin, "imageURL": [], "imageURLHighRes": [], **extra}
    if title is not None:
        obj["title"] = title
    return obj


def amazon18_files(tmp_path: Path, reviews: list | None = None, meta: list | None = None) -> Path:
    reviews = reviews if reviews is not None else [
        review18("A1", "B0001", 5.0, 1445040000),
        review18("A1", "B0002", 3.0, 1445040000, vote="2", style={"Format:": " Video Game"}),
        review18("A2", "B0001", 4.0, 1300000000),
        review18("A3", "B0002", 1.0, 1500000000),
    ]
    meta = meta if meta is not None else [
        meta18("B0001", "Halo &amp; Friends", brand="Micro &amp; Soft"),
        meta18("B0002", None, category=[], brand="", price=""),
        meta18("B0003", "Never reviewed"),
        meta18("B0001", "Duplicate line, ignored"),
    ]
    write_json(tmp_path / "meta_Video_Games.json.gz", meta)
    return write_json(tmp_path / "Video_Games_5.json.gz", reviews)


def test_amazon2018_loads_reviews_and_meta(tmp_path):
    ds = load_amazon2018(amazon18_files(tmp_path), bad=BadLines())
    assert ds.name == "amazon2018-Video_Games"
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (3, 2, 4)
    # time order, and the two reviews of A1 with the same second keep the file order (B0001, B0002)
    assert rows(ds) == [("A2", "B0001", 1300000000.0, 4.0), ("A1", "B0001", 1445040000.0, 5.0),
                        ("A1", "B0002", 1445040000.0, 3.0), ("A3", "B0002", 1500000000.0, 1.0)]
    assert titles(ds) == {"B0001": "Halo & Friends", "B0002": "item B0002"}  # entities decoded; no title: id
    first = item_row(ds, "B0001")
    assert first["brand"] == "Micro & Soft"
    assert first["categories"] == ("Video Games", "PC", "Games")
    assert first["main_cat"] == "Video Games" and first["price"] == "$19.99"
    assert item_row(ds, "B0002")["categories"] == ()


def test_amazon2018_full_file_plain_json_and_explicit_meta(tmp_path):
    write_json(tmp_path / "Books.json", [review18("A1", "1", 2.0, 100)])
    meta = write_json(tmp_path / "elsewhere.json", [meta18("1", "A Book")])
    ds = load_dataset("amazon2018", tmp_path / "Books.json", meta=meta, bad=BadLines())
    assert ds.name == "amazon2018-Books"
    assert rows(ds) == [("A1", "1", 100.0, 2.0)]
    assert titles(ds) == {"1": "A Book"}


def test_amazon2018_meta_found_without_gz(tmp_path):
    write_json(tmp_path / "Beauty_5.json", [review18("A1", "B1", 5.0, 7)])
    write_json(tmp_path / "meta_Beauty.json", [meta18("B1", "Soap")])
    assert titles(load_dataset("amazon2018", tmp_path / "Beauty_5.json")) == {"B1": "Soap"}


# (what to break, the file it breaks, line, message) -- one bad line each, so skip mode keeps 3 of 4 reviews
AMAZON18_BAD = {
    "malformed JSON line": ("reviews", 2, "malformed JSON"),
    "missing key": ("reviews", 2, "missing key 'asin'"),
    "non-numeric timestamp": ("reviews", 2, "'unixReviewTime': 'yesterday' is not a number"),
    "non-numeric rating": ("reviews", 2, "'overall': 'five' is not a number"),
    "unknown item": ("reviews", 2, "unknown item 'B0404' \\(not in the item file\\)"),
    "malformed meta line": ("meta", 3, "malformed JSON"),
}


def broken_amazon18(tmp_path: Path, case: str) -> Path:
    good = [review18("A1", "B0001", 5.0, 10), None, review18("A2", "B0002", 4.0, 20),
            review18("A3", "B0001", 3.0, 30)]
    line2 = {
        "malformed JSON line": '{"overall": 5.0, "reviewerID": "A9", "asin": "B0001",',
        "missing key": {k: v for k, v in review18("A9", "B0001", 5.0, 10).items() if k != "asin"},
        "non-numeric timestamp": review18("A9", "B0001", 5.0, "yesterday"),
        "non-numeric rating": review18("A9", "B0001", "five", 10),
        "unknown item": review18("A9", "B0404", 5.0, 10),
    }.get(case, review18("A9", "B0002", 2.0, 15))
    good[1] = line2
    meta = [meta18("B0001", "One"), meta18("B0002", "Two")]
    if case == "malformed meta line":
        meta.insert(2, "{not json")
    return amazon18_files(tmp_path, good, meta)


@pytest.mark.parametrize("case", sorted(AMAZON18_BAD))
def test_amazon2018_bad_line_is_named_and_skippable(tmp_path, case):
    path = broken_amazon18(tmp_path, case)
    which, line, problem = AMAZON18_BAD[case]
    name = r"Video_Games_5\.json\.gz" if which == "reviews" else r"meta_Video_Games\.json\.gz"
    with pytest.raises(DataError, match=rf"{name}:{line}: {problem}"):
        load_amazon2018(path, bad=BadLines())
    bad = BadLines(skip=True)
    ds = load_amazon2018(path, bad=bad)
    assert bad.total == 1
    assert len(ds.interactions) == (4 if which == "meta" else 3)
    assert any(f"skipped 1 bad line(s), first at line {line}" in s for s in bad.summary())


def test_amazon2018_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"Video_Games_5\.json\.gz: reviews file not found"):
        load_amazon2018(tmp_path / "Video_Games_5.json.gz", bad=BadLines(skip=True))
    write_json(tmp_path / "Video_Games_5.json.gz", [review18("A1", "B1", 5.0, 1)])
    with pytest.raises(DataError, match=r"meta_Video_Games\.json\.gz: meta file not found"):
        load_amazon2018(tmp_path / "Video_Games_5.json.gz", bad=BadLines(skip=True))


def test_amazon2018_truncated_gzip_always_raises(tmp_path):
    reviews = [review18(f"A{i}", "B0001", 5.0, i) for i in range(3000)]
    path = amazon18_files(tmp_path, reviews)
    truncate(path)
    for bad in (BadLines(), BadLines(skip=True)):
        with pytest.raises(DataError, match=r"Video_Games_5\.json\.gz:\d+: truncated gzip file"):
            load_amazon2018(path, bad=bad)


# ------------------------------------------------------------------------------------ Amazon 2023


def review23(user: str, parent: str, rating, ms, **extra) -> dict:
    return {"rating": rating, "title": "Nice", "text": "Works well.", "images": [], "asin": parent + "-v",
            "parent_asin": parent, "user_id": user, "timestamp": ms, "helpful_vote": 0,
            "verified_purchase": True, **extra}


def meta23(parent: str, title: str | None, **extra) -> dict:
    obj = {"main_category": "All Beauty", "average_rating": 4.1, "rating_number": 12,
           "features": ["Soft"], "description": [], "price": 9.5, "images": [], "videos": [],
           "store": "Acme", "categories": ["Beauty", "Skin Care"], "details": {"Brand": "Acme"},
           "parent_asin": parent, "bought_together": None, **extra}
    if title is not None:
        obj["title"] = title
    return obj


def amazon23_files(tmp_path: Path, gz: bool, reviews: list | None = None) -> Path:
    ext = ".jsonl.gz" if gz else ".jsonl"
    reviews = reviews if reviews is not None else [
        review23("U1", "P1", 5.0, 1588687728923),
        review23("U1", "P2", 4.0, 1588687728923),
        review23("U2", "P1", 1.0, 1588687728000),
    ]
    write_json(tmp_path / f"meta_All_Beauty{ext}",
               [meta23("P1", "Face Cream"), meta23("P2", None, price=None, details=None, store=None)], gz=gz)
    return write_json(tmp_path / f"All_Beauty{ext}", reviews, gz=gz)


@pytest.mark.parametrize("gz", [False, True])
def test_amazon2023_loads_parent_asins_and_converts_milliseconds(tmp_path, gz):
    ds = load_dataset("amazon2023", amazon23_files(tmp_path, gz), bad=BadLines())
    assert ds.name == "amazon2023-All_Beauty"
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (2, 2, 3)
    assert rows(ds) == [("U2", "P1", 1588687728.0, 1.0), ("U1", "P1", pytest.approx(1588687728.923), 5.0),
                        ("U1", "P2", pytest.approx(1588687728.923), 4.0)]
    assert titles(ds) == {"P1": "Face Cream", "P2": "item P2"}
    p1, p2 = item_row(ds, "P1"), item_row(ds, "P2")
    assert p1["main_category"] == "All Beauty" and p1["store"] == "Acme"
    assert p1["categories"] == ("Beauty", "Skin Care") and p1["price"] == 9.5
    assert p1["details"] == {"Brand": "Acme"}
    assert math.isnan(p2["price"]) and p2["details"] == {} and p2["store"] == ""


def only_title_note(ds) -> str:
    """The one note about items without a title (there must be exactly one)."""
    (note,) = [n for n in ds.notes if "no title" in n]
    return note


def test_amazon2018_items_without_title_are_kept_named_by_id_and_counted_once(tmp_path):
    reviews = [review18("A1", "B0001", 5.0, 10), review18("A2", "B0002", 4.0, 20), review18("A3", "B0003", 3.0, 30),
               review18("A4", "B0004", 2.0, 40)]
    meta = [meta18("B0001", "One"), meta18("B0009", None),  # never reviewed: not counted
            meta18("B0003", "   "), meta18("B0002", None), meta18("B0004", "Four")]
    path = amazon18_files(tmp_path, reviews, meta)
    ds = load_amazon2018(path, bad=BadLines())
    assert ds.num_items == 4 and len(ds.interactions) == 4
    assert titles(ds) == {"B0001": "One", "B0002": "item B0002", "B0003": "item B0003", "B0004": "Four"}
    meta_file = tmp_path / "meta_Video_Games.json.gz"
    assert only_title_note(ds) == ("2 items have no title and are named by their id instead ('item B0003', ...); "
                                   f"the first is at {meta_file}:3")


def test_amazon2023_item_without_title(tmp_path):
    ds = load_amazon2023(amazon23_files(tmp_path, gz=False), bad=BadLines())
    assert titles(ds)["P2"] == "item P2"
    assert only_title_note(ds) == ("1 item has no title and is named by its id instead ('item P2'); it is at "
                                   f"{tmp_path / 'meta_All_Beauty.jsonl'}:2")


def test_amazon2023_bad_timestamp_and_unknown_item(tmp_path):
    reviews = [review23("U1", "P1", 5.0, 1000), review23("U2", "P1", 5.0, "soon"),
               review23("U3", "P9", 3.0, 2000)]
    path = amazon23_files(tmp_path, gz=True, reviews=reviews)
    with pytest.raises(DataError, match=r"All_Beauty\.jsonl\.gz:2: 'timestamp': 'soon' is not a number"):
        load_amazon2023(path, bad=BadLines())
    bad = BadLines(skip=True)
    ds = load_amazon2023(path, bad=bad)
    assert rows(ds) == [("U1", "P1", 1.0, 5.0)]
    assert bad.total == 2
    assert "first at line 2" in bad.summary()[0]


def test_amazon2023_unknown_item_message(tmp_path):
    reviews = [review23("U1", "P1", 5.0, 1), review23("U1", "PX", 2.0, 2)]
    path = amazon23_files(tmp_path, gz=False, reviews=reviews)
    with pytest.raises(DataError, match=r"All_Beauty\.jsonl:2: unknown item 'PX'"):
        load_amazon2023(path)


def test_amazon2023_truncated_gzip_and_missing_meta(tmp_path):
    path = amazon23_files(tmp_path, gz=True, reviews=[review23(f"U{i}", "P1", 5.0, i) for i in range(3000)])
    truncate(path)
    with pytest.raises(DataError, match=r"All_Beauty\.jsonl\.gz:\d+: truncated gzip file"):
        load_amazon2023(path, bad=BadLines(skip=True))
    (tmp_path / "meta_All_Beauty.jsonl.gz").unlink()
    write_json(path, [review23("U1", "P1", 5.0, 1)])
    with pytest.raises(DataError, match=r"meta_All_Beauty\.jsonl\.gz: meta file not found"):
        load_amazon2023(path)


# -------------------------------------------------------------------------------------- GoodReads


def interaction(user: str, book: str, rating: int, added: str, is_read: bool = True) -> dict:
    return {"user_id": user, "book_id": book, "review_id": f"r-{user}-{book}", "is_read": is_read,
            "rating": rating, "review_text_incomplete": "", "date_added": added, "date_updated": added,
            "read_at": "", "started_at": ""}


def book(book_id: str, title: str) -> dict:
    return {"isbn": "", "text_reviews_count": "3", "series": [], "country_code": "US", "language_code": "eng",
            "popular_shelves": [{"count": str(100 - i), "name": f"shelf-{i}"} for i in range(12)],
            "asin": "", "is_ebook": "false", "average_rating": "4.09", "kindle_asin": "", "similar_books": [],
            "description": "", "format": "Paperback", "link": "",
            "authors": [{"author_id": "18540", "role": ""}, {"author_id": "21578", "role": "Illustrator"}],
            "publisher": "", "num_pages": "56", "publication_day": "", "isbn13": "", "publication_month": "",
            "edition_information": "", "publication_year": "1982", "url": "", "image_url": "",
            "book_id": book_id, "ratings_count": "15", "work_id": "1", "title": title,
            "title_without_series": title}


WATCHMEN_ADDED = "Fri Aug 25 13:55:02 -0700 2017"
WATCHMEN_SECONDS = datetime(2017, 8, 25, 20, 55, 2, tzinfo=UTC).timestamp()


def goodreads_files(tmp_path: Path, interactions: list | None = None) -> Path:
    interactions = interactions if interactions is not None else [
        interaction("u1", "100", 5, WATCHMEN_ADDED),
        interaction("u1", "200", 0, WATCHMEN_ADDED, is_read=False),  # shelved, not rated: kept, same second
        interaction("u2", "100", 3, "Mon Jan 02 00:00:00 +0000 2012"),
    ]
    write_json(tmp_path / "goodreads_books_comics_graphic.json.gz",
               [book("100", "Watchmen"), book("200", "Maus"), book("300", "Unread")])
    return write_json(tmp_path / "goodreads_interactions_comics_graphic.json.gz", interactions)


def test_goodreads_loads_every_shelved_book(tmp_path):
    ds = load_dataset("goodreads", goodreads_files(tmp_path), bad=BadLines())
    assert ds.name == "goodreads-comics_graphic"
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (2, 2, 3)
    assert rows(ds) == [("u2", "100", datetime(2012, 1, 2, tzinfo=UTC).timestamp(), 3.0),
                        ("u1", "100", WATCHMEN_SECONDS, 5.0), ("u1", "200", WATCHMEN_SECONDS, 0.0)]
    assert titles(ds) == {"100": "Watchmen", "200": "Maus"}
    watchmen = item_row(ds, "100")
    assert watchmen["authors"] == ("18540", "21578")
    assert watchmen["publication_year"] == "1982"
    assert watchmen["shelves"] == tuple(f"shelf-{i}" for i in range(10))


def test_goodreads_books_without_title_are_kept_named_by_id(tmp_path):
    path = goodreads_files(tmp_path, [interaction("u1", "100", 5, WATCHMEN_ADDED),
                                      interaction("u2", "200", 4, WATCHMEN_ADDED),
                                      interaction("u2", "300", 3, WATCHMEN_ADDED)])
    untitled = {k: v for k, v in book("300", "").items() if k != "title"}  # no title key at all
    write_json(tmp_path / "goodreads_books_comics_graphic.json.gz",
               [book("100", "Watchmen"), book("200", " "), untitled])
    ds = load_goodreads(path, bad=BadLines())
    assert titles(ds) == {"100": "Watchmen", "200": "item 200", "300": "item 300"}
    books = tmp_path / "goodreads_books_comics_graphic.json.gz"
    assert only_title_note(ds) == ("2 items have no title and are named by their id instead ('item 200', ...); "
                                   f"the first is at {books}:2")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (WATCHMEN_ADDED, WATCHMEN_SECONDS),
        ("Tue Jun 12 08:59:04 +0530 2012", datetime(2012, 6, 12, 3, 29, 4, tzinfo=UTC).timestamp()),
        ("", None), ("yesterday", None), ("Fri Aug 32 13:55:02 -0700 2017", None),
        ("Fri Foo 25 13:55:02 -0700 2017", None), ("Fri Aug 25 13:55 -0700 2017", None),
        ("Fri Aug 25 13:55:02 PDT 2017", None), (1503694502, None),
    ],
)
def test_goodreads_date_parser(text, expected):
    assert parse_date(text) == expected


GOODREADS_BAD = {
    "unparseable date": (interaction("u3", "100", 4, "last summer"),
                         r"'date_added': 'last summer' is not a date"),
    "empty date": (interaction("u3", "100", 4, ""), r"'date_added': '' is not a date"),
    "unknown book": (interaction("u3", "999", 4, WATCHMEN_ADDED), r"unknown item '999'"),
    "malformed JSON": ('{"user_id": "u3", "book_id": "100"', r"malformed JSON"),
    "missing key": ({"user_id": "u3", "book_id": "100", "rating": 4}, r"missing key 'date_added'"),
}


@pytest.mark.parametrize("case", sorted(GOODREADS_BAD))
def test_goodreads_bad_line_is_named_and_skippable(tmp_path, case):
    planted, problem = GOODREADS_BAD[case]
    path = goodreads_files(tmp_path, [interaction("u1", "100", 5, WATCHMEN_ADDED), planted,
                                      interaction("u2", "200", 2, WATCHMEN_ADDED)])
    with pytest.raises(DataError, match=rf"goodreads_interactions_comics_graphic\.json\.gz:2: {problem}"):
        load_goodreads(path, bad=BadLines())
    bad = BadLines(skip=True)
    ds = load_goodreads(path, bad=bad)
    assert [(u, i) for u, i, _, _ in rows(ds)] == [("u1", "100"), ("u2", "200")]
    assert bad.total == 1


def test_goodreads_missing_books_file_and_truncated_gzip(tmp_path):
    path = goodreads_files(tmp_path, [interaction(f"u{i}", "100", 5, WATCHMEN_ADDED) for i in range(3000)])
    truncate(path)
    with pytest.raises(DataError, match=r"goodreads_interactions_comics_graphic\.json\.gz:\d+: truncated"):
        load_goodreads(path, bad=BadLines(skip=True))
    (tmp_path / "goodreads_books_comics_graphic.json.gz").unlink()
    write_json(path, [interaction("u1", "100", 5, WATCHMEN_ADDED)])
    with pytest.raises(DataError, match=r"goodreads_books_comics_graphic\.json\.gz: books file not found"):
        load_goodreads(path)


# -------------------------------------------------------------------------------------- MicroLens

PAIRS_HEADER = "user,item,timestamp"


def microlens_50k(tmp_path: Path, pairs: list[str] | None = None) -> Path:
    pairs = pairs if pairs is not None else [
        "1,10,1583049600123",
        "1,11,1583049600123",  # same millisecond as the line above: file order decides
        "2,10,1583049500000",
    ]
    write_lines(tmp_path / "MicroLens-50k_titles.csv",
                ["item,title", '10,"Cats, dogs and a ""quoted"" word"', "11,Plain title", "12,Never watched"],
                gz=False)
    return write_lines(tmp_path / "MicroLens-50k_pairs.csv", [PAIRS_HEADER, *pairs])


def test_microlens_50k_pairs_and_titles(tmp_path):
    ds = load_dataset("microlens", microlens_50k(tmp_path), bad=BadLines())
    assert ds.name == "microlens-50k"
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (2, 2, 3)
    assert rows(ds) == [(2, 10, 1583049500.0, 1.0), (1, 10, pytest.approx(1583049600.123), 1.0),
                        (1, 11, pytest.approx(1583049600.123), 1.0)]
    assert titles(ds) == {10: 'Cats, dogs and a "quoted" word', 11: "Plain title"}


def test_microlens_100k_headerless_titles_with_bare_commas(tmp_path):
    write_lines(tmp_path / "MicroLens-100k_title_en.csv",
                ["\ufeff1,A title, with a comma", "2,", '3,"quoted, title"'])
    pairs = [PAIRS_HEADER, "7,1,1000", "7,2,2000", "8,3,3000"]
    path = write_lines(tmp_path / "MicroLens-100k_pairs.csv", pairs)
    ds = load_microlens(path, bad=BadLines())
    assert ds.name == "microlens-100k"
    assert titles(ds) == {1: "A title, with a comma", 2: "item 2", 3: "quoted, title"}
    assert [t for _, _, t, _ in rows(ds)] == [1.0, 2.0, 3.0]


def test_microlens_item_without_title_is_kept_named_by_id(tmp_path):
    write_lines(tmp_path / "MicroLens-50k_titles.csv", ["item,title", "10,Ten", "11,", '12,""'])
    path = write_lines(tmp_path / "MicroLens-50k_pairs.csv", [PAIRS_HEADER, "1,10,1000", "1,11,2000", "2,12,3000"])
    ds = load_microlens(path, bad=BadLines())
    assert titles(ds) == {10: "Ten", 11: "item 11", 12: "item 12"}
    assert only_title_note(ds) == ("2 items have no title and are named by their id instead ('item 11', ...); "
                                   f"the first is at {tmp_path / 'MicroLens-50k_titles.csv'}:3")


def test_microlens_titles_given_as_meta(tmp_path):
    meta = write_lines(tmp_path / "my_titles.csv", ["10,Ten"])
    path = write_lines(tmp_path / "pairs.csv", [PAIRS_HEADER, "1,10,5000"])
    ds = load_microlens(path, meta=meta, bad=BadLines())
    assert ds.name == "microlens-pairs" and titles(ds) == {10: "Ten"}


def test_microlens_readme_column_names_are_accepted(tmp_path):
    write_lines(tmp_path / "MicroLens-50k_titles.csv", ["item,title", "10,Ten"])
    path = write_lines(tmp_path / "MicroLens-50k_pairs.csv", ["userID,videoID,timestamp", "1,10,1500"])
    assert rows(load_microlens(path)) == [(1, 10, 1.5, 1.0)]


MICROLENS_BAD = {
    "malformed CSV line": ("1,10,1000,99", 3, "expected 3 fields, got 4"),
    "short CSV line": ("1,10", 3, "expected 3 fields, got 2"),
    "non-numeric timestamp": ("1,10,noon", 3, "column 'timestamp': 'noon' is not a number"),
    "unknown item": ("1,404,1000", 3, "unknown item 404"),
}


@pytest.mark.parametrize("case", sorted(MICROLENS_BAD))
def test_microlens_bad_line_is_named_and_skippable(tmp_path, case):
    planted, line, problem = MICROLENS_BAD[case]
    path = microlens_50k(tmp_path, ["1,10,500", planted, "2,11,700"])
    with pytest.raises(DataError, match=rf"MicroLens-50k_pairs\.csv:{line}: {problem}"):
        load_microlens(path, bad=BadLines())
    bad = BadLines(skip=True)
    ds = load_microlens(path, bad=bad)
    assert [(u, i) for u, i, _, _ in rows(ds)] == [(1, 10), (2, 11)]
    assert bad.total == 1


def test_microlens_missing_column_missing_titles_and_bad_title_line(tmp_path):
    path = write_lines(tmp_path / "MicroLens-50k_pairs.csv", ["user,item,time", "1,10,5"])
    with pytest.raises(DataError, match=r"MicroLens-50k_titles\.csv: titles file not found"):
        load_microlens(path)
    write_lines(tmp_path / "MicroLens-50k_titles.csv", ["item,title", "10,Ten", "x1,Bad id", "no comma"])
    with pytest.raises(DataError, match=r"MicroLens-50k_titles\.csv:3: item id 'x1' is not a number"):
        load_microlens(path)
    with pytest.raises(DataError, match=r"MicroLens-50k_pairs\.csv:1: missing column\(s\) 'timestamp'"):
        load_microlens(path, bad=BadLines(skip=True))  # a missing column raises even in skip mode
    bad = BadLines(skip=True)
    write_lines(path, [PAIRS_HEADER, "1,10,5"])
    assert titles(load_microlens(path, bad=bad)) == {10: "Ten"}
    assert bad.total == 2  # the bad id and the line without a comma


# --------------------------------------------------------------------------------------- KuaiRand

# the header lines of the KuaiRand-Pure files, as the release writes them
LOG_HEADER = ("user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,"
              "is_hate,long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,"
              "is_profile_enter,is_rand,tab")
USER_HEADER = ("user_id,user_active_degree,is_lowactive_period,is_live_streamer,is_video_author,"
               "follow_user_num,follow_user_num_range,fans_user_num,fans_user_num_range,friend_user_num,"
               "friend_user_num_range,register_days,register_days_range,"
               + ",".join(f"onehot_feat{i}" for i in range(18)))
BASIC_HEADER = ("video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,"
                "server_width,server_height,music_id,music_type,tag")
STAT_HEADER = (
    "video_id,counts,show_cnt,show_user_num,play_cnt,play_user_num,play_duration,complete_play_cnt,"
    "complete_play_user_num,valid_play_cnt,valid_play_user_num,long_time_play_cnt,long_time_play_user_num,"
    "short_time_play_cnt,short_time_play_user_num,play_progress,comment_stay_duration,like_cnt,like_user_num,"
    "click_like_cnt,double_click_cnt,cancel_like_cnt,cancel_like_user_num,comment_cnt,comment_user_num,"
    "direct_comment_cnt,reply_comment_cnt,delete_comment_cnt,delete_comment_user_num,comment_like_cnt,"
    "comment_like_user_num,follow_cnt,follow_user_num,cancel_follow_cnt,cancel_follow_user_num,share_cnt,"
    "share_user_num,download_cnt,download_user_num,report_cnt,report_user_num,reduce_similar_cnt,"
    "reduce_similar_user_num,collect_cnt,collect_user_num,cancel_collect_cnt,cancel_collect_user_num,"
    "direct_comment_user_num,reply_comment_user_num,share_all_cnt,share_all_user_num,outsite_share_all_cnt")
STAT_COLUMNS = STAT_HEADER.split(",")[1:]


def log_line(user: int, video: int, time_ms: int, click: int, is_rand: int = 0) -> str:
    return f"{user},{video},20220410,1600,{time_ms},{click},0,0,0,0,0,{click},1500,9000,0,0,0,{is_rand},1"


def user_line(user: int, degree: str = "full_active") -> str:
    return f"{user},{degree},0,0,1,5,\"(0,10]\",312,\"[100,1k)\",0,0,3624,730+," + ",".join("1" * 18)


def basic_line(video: int, tag: str = "12") -> str:
    return f"{video},441,NORMAL,2020-07-08,ShortImport,1,17200.0,720,1280,989206467,4,\"{tag}\""


def stat_line(video: int, show: float) -> str:
    return f"{video},66,{show}," + ",".join(["0.5"] * (len(STAT_COLUMNS) - 2))


def kuairand_files(folder: Path, version: str = "pure", logs: dict[str, list[str]] | None = None,
                   basic: list[str] | None = None) -> Path:
    """A KuaiRand data folder: three logs, user features, basic and statistic video features."""
    folder.mkdir(parents=True, exist_ok=True)
    logs = logs if logs is not None else {
        "log_standard_4_08_to_4_21": [log_line(1, 100, 1649408076860, 1), log_line(2, 101, 1649408076000, 0)],
        "log_standard_4_22_to_5_08": [log_line(1, 101, 1650600000000, 0)],
        "log_random_4_22_to_5_08": [log_line(1, 102, 1650600000000, 1, is_rand=1)],  # ties the line above
    }
    for stem, lines in logs.items():
        write_lines(folder / f"{stem}_{version}.csv", [LOG_HEADER, *lines])
    write_lines(folder / f"user_features_{version}.csv", [USER_HEADER, user_line(1), user_line(2, "UNKNOWN"),
                                                         user_line(3)])
    if basic is None:
        basic = [basic_line(100, "12,65"), basic_line(101), "102,7,AD,2021-01-01,LongImport,1,,720,1280,5,,",
                 basic_line(103)]
    write_lines(folder / f"video_features_basic_{version}.csv", [BASIC_HEADER, *basic])
    write_lines(folder / f"video_features_statistic_{version}.csv",
                [STAT_HEADER, stat_line(100, 75.212), stat_line(101, 3.0)])
    return folder


def test_kuairand_pure_logs_users_and_video_features(tmp_path):
    release = tmp_path / "KuaiRand-Pure"
    kuairand_files(release / "data")
    ds = load_dataset("kuairand", release, bad=BadLines())  # the release folder: data/ is found
    assert ds.name == "kuairand-pure"
    assert (ds.num_users, ds.num_items, len(ds.interactions)) == (2, 3, 4)
    # standard logs first, then the random log: the tie at 1650600000000 keeps that order
    assert rows(ds) == [(2, 101, 1649408076.0, 0.0), (1, 100, 1649408076.86, 1.0),
                        (1, 101, 1650600000.0, 0.0), (1, 102, 1650600000.0, 1.0)]
    assert titles(ds) == {100: "item 100", 101: "item 101", 102: "item 102"}  # videos have no titles
    assert [n for n in ds.notes if "title" in n] == [
        "the items have no titles in this format; all 3 are named by their id instead ('item 100', ...)"]
    v100, v101, v102 = item_row(ds, 100), item_row(ds, 101), item_row(ds, 102)
    assert v100["tag"] == "12,65" and v100["author_id"] == 441 and v100["video_type"] == "NORMAL"
    assert v100["show_cnt"] == 75.212 and v101["show_cnt"] == 3.0 and v100["outsite_share_all_cnt"] == 0.5
    assert v102["video_type"] == "AD" and math.isnan(v102["show_cnt"])  # no statistics: NaN
    assert math.isnan(v102["video_duration"])  # empty field: NaN
    assert list(ds.items.columns) == ["item", "item_id", "title", *BASIC_HEADER.split(",")[1:], *STAT_COLUMNS]
    assert list(ds.users.columns) == ["user", *USER_HEADER.split(",")]
    u2 = ds.users.loc[ds.users["user_id"] == 2].iloc[0]
    assert u2["user_active_degree"] == "UNKNOWN" and u2["follow_user_num_range"] == "(0,10]"
    assert u2["register_days"] == 3624 and u2["onehot_feat17"] == 1
    assert any("1 of 4 interactions come from the random-exposure log" in n for n in ds.notes)


def test_kuairand_27k_parts_are_read_in_order(tmp_path):
    folder = kuairand_files(tmp_path, "27k", logs={"log_random_4_22_to_5_08": [log_line(1, 100, 9000, 1, 1)]})
    write_lines(folder / "log_standard_4_08_to_4_21_27k_part2.csv", [LOG_HEADER, log_line(2, 101, 5000, 0)])
    write_lines(folder / "log_standard_4_08_to_4_21_27k_part1.csv", [LOG_HEADER, log_line(1, 101, 5000, 1)])
    write_lines(folder / "log_standard_4_22_to_5_08_27k_part1.csv", [LOG_HEADER, log_line(1, 103, 8000, 0)])
    stats = folder / "video_features_statistic_27k.csv"
    stats.rename(folder / "video_features_statistic_27k_part1.csv")
    write_lines(folder / "video_features_statistic_27k_part2.csv",
                [STAT_HEADER, stat_line(103, 9.0)])
    ds = load_kuairand(folder, bad=BadLines())
    assert ds.name == "kuairand-27k"
    assert rows(ds) == [(1, 101, 5.0, 1.0), (2, 101, 5.0, 0.0), (1, 103, 8.0, 0.0), (1, 100, 9.0, 1.0)]
    assert item_row(ds, 103)["show_cnt"] == 9.0


def test_kuairand_1k_and_detection_errors(tmp_path):
    assert load_kuairand(kuairand_files(tmp_path / "one", "1k")).name == "kuairand-1k"
    with pytest.raises(DataError, match=r"no KuaiRand log found"):
        load_kuairand(tmp_path)
    kuairand_files(tmp_path / "both", "pure")
    kuairand_files(tmp_path / "both", "1k")
    with pytest.raises(DataError, match=r"several KuaiRand releases \(pure, 1k\)"):
        load_kuairand(tmp_path / "both")
    with pytest.raises(ConfigError, match=r"data\.meta"):
        load_kuairand(tmp_path / "one", meta=tmp_path / "x.csv")


def test_kuairand_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: KuaiRand folder not found"):
        load_kuairand(tmp_path / "nowhere")
    folder = kuairand_files(tmp_path)
    (folder / "video_features_statistic_pure.csv").unlink()
    with pytest.raises(DataError, match=r"video_features_statistic_pure\.csv: file not found"):
        load_kuairand(folder, bad=BadLines(skip=True))
    kuairand_files(folder)
    (folder / "log_random_4_22_to_5_08_pure.csv").unlink()
    with pytest.raises(DataError, match=r"log_random_4_22_to_5_08_pure\.csv: file not found"):
        load_kuairand(folder)


KUAIRAND_BAD = {
    "malformed CSV line": (log_line(2, 101, 5, 0) + ",extra", "expected 19 fields, got 20"),
    "non-numeric time_ms": (log_line(2, 101, 5, 0).replace(",5,", ",soon,"),
                            "column 'time_ms': 'soon' is not a number"),
    "unknown video": (log_line(2, 999, 5, 0), "unknown item 999"),
    "unknown user": (log_line(9, 101, 5, 0), "unknown user 9"),
}


@pytest.mark.parametrize("case", sorted(KUAIRAND_BAD))
def test_kuairand_bad_log_line_is_named_and_skippable(tmp_path, case):
    planted, problem = KUAIRAND_BAD[case]
    logs = {"log_standard_4_08_to_4_21": [log_line(1, 100, 1000, 1)],
            "log_standard_4_22_to_5_08": [log_line(1, 101, 2000, 0), planted, log_line(2, 100, 3000, 1)],
            "log_random_4_22_to_5_08": [log_line(1, 102, 4000, 1, 1)]}
    folder = kuairand_files(tmp_path, logs=logs)
    with pytest.raises(DataError, match=rf"log_standard_4_22_to_5_08_pure\.csv:3: {problem}"):
        load_kuairand(folder, bad=BadLines())
    bad = BadLines(skip=True)
    ds = load_kuairand(folder, bad=bad)
    assert [(u, i) for u, i, _, _ in rows(ds)] == [(1, 100), (1, 101), (2, 100), (1, 102)]
    assert bad.total == 1


def test_kuairand_missing_log_column(tmp_path):
    folder = kuairand_files(tmp_path)
    write_lines(folder / "log_standard_4_22_to_5_08_pure.csv", [LOG_HEADER.replace("time_ms", "time"),
                                                               log_line(1, 101, 5, 0)])
    with pytest.raises(DataError, match=r"log_standard_4_22_to_5_08_pure\.csv:1: missing column.* 'time_ms'"):
        load_kuairand(folder, bad=BadLines(skip=True))


def test_kuairand_bad_feature_line_drops_the_video_and_its_interactions(tmp_path):
    basic = [basic_line(100), basic_line(101) + ",extra", "102,7,AD,2021-01-01,LongImport,1,,720,1280,5,,",
             "abc,1,NORMAL,2020-01-01,X,1,1,1,1,1,1,1"]
    folder = kuairand_files(tmp_path, basic=basic)
    with pytest.raises(DataError, match=r"video_features_basic_pure\.csv:3: expected 12 fields, got 13"):
        load_kuairand(folder)
    bad = BadLines(skip=True)
    ds = load_kuairand(folder, bad=bad)
    assert sorted(ds.items["item_id"]) == [100, 102]
    # two bad feature lines, then the two log rows of video 101 become unknown items
    assert bad.total == 4
    assert item_row(ds, 100)["author_id"] == 441 and item_row(ds, 102)["video_type"] == "AD"


def test_kuairand_extra_field_on_the_first_feature_row_is_caught(tmp_path):
    """pandas would make such a row's first field the index and shift every column; it must be a bad line."""
    folder = kuairand_files(tmp_path, basic=[basic_line(100) + ",extra", basic_line(101), basic_line(102)])
    with pytest.raises(DataError, match=r"video_features_basic_pure\.csv:2: expected 12 fields, got 13"):
        load_kuairand(folder)
    bad = BadLines(skip=True)
    ds = load_kuairand(folder, bad=bad)
    assert sorted(ds.items["item_id"]) == [101, 102] and item_row(ds, 101)["author_id"] == 441
    assert bad.total == 2  # the feature line, then the one log row of video 100


@pytest.mark.slow
def test_fedpa_runs_on_kuairand_files(tmp_path):
    """FedPA end to end on a KuaiRand folder in the real format: is_click labels, the 23 user fields,
    the video fields and the log-binned statistics."""
    import numpy as np

    from fellrec.config import load_config
    from fellrec.run import run

    rng = np.random.default_rng(0)
    videos = list(range(100, 130))
    lines = [log_line(u, int(v), 1649408076000 + 60_000 * (u * 50 + i), int(rng.random() < 0.4))
             for u in range(1, 31) for i, v in enumerate(rng.choice(videos, 12, replace=False))]
    degrees = ["full_active", "high_active", "middle_active"]
    folder = kuairand_files(tmp_path / "KuaiRand-Pure" / "data", logs={"log_standard_4_08_to_4_21": lines[:180],
                                                                             "log_standard_4_22_to_5_08": lines[180:],
                                                                             "log_random_4_22_to_5_08": []},
                            basic=[basic_line(v, str(v % 4)) for v in videos])
    write_lines(folder / "user_features_pure.csv", [USER_HEADER, *(user_line(u, degrees[u % 3]) for u in range(1, 31))])
    write_lines(folder / "video_features_statistic_pure.csv",
                [STAT_HEADER, *(stat_line(v, float(rng.exponential(500))) for v in videos)])
    cfg = load_config(None, ["model.backbone=ctr", "data.format=kuairand", f"data.path={folder}", "data.kcore=0",
                             "fedpa.group_attributes=[user_active_degree]", "fedpa.pretrain_epochs=2",
                             "train.rounds=2", "name=k"])
    out = run(cfg, tmp_path / "runs", progress=False)
    r = json.loads((out / "results.json").read_text())
    assert r["users"]["private"] + r["users"]["public"] == 30 and r["users"]["left_out"] == []
    assert r["samples"]["train"] + r["samples"]["valid"] + r["samples"]["test"] + 12 * r["users"]["public"] == 360
    assert 0 <= r["overall"]["auc"] <= 1 and r["communication"]["bytes_up"] > 0
