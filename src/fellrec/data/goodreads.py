"""UCSD GoodReads ("UCSD Book Graph", Mengting Wan and Julian McAuley), the by-genre files.

The user downloads from the UCSD Book Graph page, for one genre (children, comics_graphic,
fantasy_paranormal, history_biography, mystery_thriller_crime, poetry, romance, young_adult):

- ``goodreads_interactions_<genre>.json.gz``: one JSON object per line with ``user_id`` (hex
  text), ``book_id`` (text), ``review_id``, ``is_read`` (bool), ``rating`` (0-5; 0 = shelved
  without a rating), ``review_text_incomplete``, ``date_added``, ``date_updated``, ``read_at``,
  ``started_at``. Dates are text like "Fri Aug 25 13:55:02 -0700 2017" ("" where unknown).
- ``goodreads_books_<genre>.json.gz``: one JSON object per book with ``book_id``, ``title``,
  ``title_without_series``, ``authors`` (a list of {``author_id``, ``role``}),
  ``popular_shelves`` (a list of {``count``, ``name``}, most used first), ``publication_year``
  (text, "" where unknown), ``average_rating``, ``num_pages``, ``isbn``, ``similar_books``, ... .

The whole-site files (``goodreads_interactions_dedup.json.gz`` with ``goodreads_books.json.gz``)
have the same keys and load the same way.

Decisions:

- Every row of the interactions file is an interaction: a book put on any shelf, read or not
  ("to-read" included), rated or not. The rating is kept as given, so 0 means "not rated", not
  "disliked"; filter on ``rating > 0`` downstream for explicit feedback only.
- The timestamp is ``date_added`` (when the book was shelved, which every row has), converted to
  Unix seconds with its UTC offset. An empty or unparseable ``date_added`` is a bad line.
- Items keep ``title`` and the attributes ``authors`` (tuple of author ids), ``publication_year``
  (text as given) and ``shelves`` (the names of the book's ten most used shelves). A book with no
  title (null, absent or blank) is kept and named by its id ("item 123"); a note on the Dataset
  counts such books and names the first one's line in the books file.
- A row whose ``book_id`` the books file lacks is a bad line ("unknown item").
- Rows keep the file order; ties in time are broken by it downstream.
"""

from __future__ import annotations

from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from fellrec.data import io
from fellrec.data.io import BadLines
from fellrec.data.tables import Dataset
from fellrec.errors import DataError

_PREFIX = "goodreads_interactions_"
_MONTHS = {m: i for i, m in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_TOP_SHELVES = 10
_KEYS = ("user_id", "book_id", "rating", "date_added")
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def load_goodreads(path: Path, *, meta: Path | None = None, bad: BadLines | None = None) -> Dataset:
    """``goodreads_interactions_<genre>.json(.gz)`` plus ``goodreads_books_<genre>.json(.gz)``."""
    bad = bad or BadLines()
    path = io.check_exists(path, "interactions file")
    genre = _genre(path)
    meta = meta or _books_file(path, genre)
    inter = _read_interactions(path, bad)
    items = _read_books(meta, set(inter["item_id"]), bad)
    inter = io.drop_unknown(inter, "item_id", items["item_id"], path, bad)
    return Dataset.from_raw(f"goodreads-{genre}", inter, items, None, source=str(path), item_source=str(meta))


def parse_date(text: Any) -> float | None:
    """Unix seconds of a GoodReads date ("Fri Aug 25 13:55:02 -0700 2017"), or None if it is not one.

    Hand-parsed, with the calendar day and the UTC offset cached: ``datetime.strptime`` is several
    times slower, and a genre has millions of rows but only thousands of distinct days.
    """
    if type(text) is not str:
        return None
    parts = text.split()
    if len(parts) != 6:
        return None
    _, month, day, clock, zone, year = parts
    hms = clock.split(":")
    if len(hms) != 3:
        return None
    try:
        hours, minutes, seconds = int(hms[0]), int(hms[1]), int(hms[2])
        days = _epoch_day(year, month, day)
        offset = _utc_offset(zone)
    except (ValueError, KeyError):
        return None
    if not (0 <= hours < 24 and 0 <= minutes < 60 and 0 <= seconds < 61):
        return None
    return float(days * 86400 + hours * 3600 + minutes * 60 + seconds - offset)


@lru_cache(maxsize=65536)
def _epoch_day(year: str, month: str, day: str) -> int:
    """Days since 1970-01-01 of ("2017", "Aug", "25"); KeyError or ValueError if there is no such day."""
    return date(int(year), _MONTHS[month], int(day)).toordinal() - _EPOCH_ORDINAL


@lru_cache(maxsize=256)
def _utc_offset(zone: str) -> int:
    """"-0700" -> -25200 seconds; ValueError if it is not a ±HHMM offset."""
    if len(zone) != 5 or zone[0] not in "+-" or not zone[1:].isdigit():
        raise ValueError(zone)
    seconds = int(zone[1:3]) * 3600 + int(zone[3:5]) * 60
    return -seconds if zone[0] == "-" else seconds


def _genre(path: Path) -> str:
    """``goodreads_interactions_comics_graphic.json.gz`` -> ``comics_graphic``."""
    name = path.name
    for suffix in (".gz", ".json"):
        name = name.removesuffix(suffix)
    return name.removeprefix(_PREFIX) or name


def _books_file(path: Path, genre: str) -> Path:
    """The books file beside ``path``: ``goodreads_books_<genre>`` (``goodreads_books`` for dedup)."""
    stem = "goodreads_books" if genre == "dedup" else f"goodreads_books_{genre}"
    for name in (f"{stem}.json.gz", f"{stem}.json"):
        if (path.parent / name).exists():
            return path.parent / name
    raise DataError(path.parent / f"{stem}.json.gz", None,
                    f"books file not found (looked beside {path.name}; give its path as data.meta)")


def _read_interactions(path: Path, bad: BadLines) -> pd.DataFrame:
    """user_id, item_id, timestamp (seconds), rating and _line of every good row, in file order.

    The loop body is the hot path: plain lookups and type checks, with the shared ``io`` helpers
    called only for a line that has a problem.
    """
    users: list[str] = []
    books: list[str] = []
    times: list[float] = []
    ratings: list[float] = []
    lines: list[int] = []
    for lineno, obj in io.iter_json(path, bad):
        user, book = obj.get("user_id"), obj.get("book_id")
        rating, added = obj.get("rating"), obj.get("date_added")
        if user is None or book is None or rating is None or added is None:
            for key in _KEYS:
                if io.require(obj, key, path, lineno, bad) is None:
                    break
            continue
        if type(rating) is not int:
            rating = io.as_number(rating, "rating", path, lineno, bad)
            if rating is None:
                continue
        seconds = parse_date(added)
        if seconds is None:
            bad(path, lineno, f"'date_added': {added!r} is not a date like 'Fri Aug 25 13:55:02 -0700 2017'")
            continue
        users.append(user if type(user) is str else str(user))
        books.append(book if type(book) is str else str(book))
        ratings.append(rating)
        times.append(seconds)
        lines.append(lineno)
    return io.interaction_frame(users, books, times, ratings, lines)


def _read_books(path: Path, wanted: set[str], bad: BadLines) -> pd.DataFrame:
    """item_id, title, authors, publication_year, shelves, _line of the books in ``wanted`` (first line wins)."""
    rows: dict[str, dict[str, Any]] = {}
    for lineno, obj in io.iter_json(path, bad):
        book = io.require(obj, "book_id", path, lineno, bad)
        if book is None:
            continue
        book = str(book)
        if book in wanted and book not in rows:
            rows[book] = {
                "item_id": book,
                "title": _text(obj.get("title")),
                "authors": _names(obj.get("authors"), "author_id"),
                "publication_year": _text(obj.get("publication_year")),
                "shelves": _names(obj.get("popular_shelves"), "name")[:_TOP_SHELVES],
                "_line": lineno,
            }
    columns = ["item_id", "title", "authors", "publication_year", "shelves", "_line"]
    return pd.DataFrame(list(rows.values()), columns=columns)


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _names(value: Any, key: str) -> tuple[str, ...]:
    """``[{key: "a"}, {key: "b"}]`` -> ("a", "b"); anything malformed is left out."""
    if not isinstance(value, list):
        return ()
    return tuple(str(v[key]) for v in value if isinstance(v, dict) and v.get(key) not in (None, ""))
