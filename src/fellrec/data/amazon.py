"""Amazon Reviews 2018 and 2023 (McAuley lab, UCSD), as the user downloads them.

Both releases are one JSON object per line, usually gzipped; the loaders read only the keys they
need, line by line, so a category with millions of reviews loads in one pass per file.

``amazon2018`` -- "Amazon Review Data (2018)" (Jianmo Ni's page at UCSD):

- reviews: ``<Category>_5.json.gz`` (the 5-core subset) or ``<Category>.json.gz`` (all reviews),
  keys ``reviewerID``, ``asin``, ``overall`` (the 1-5 rating), ``unixReviewTime`` (Unix seconds),
  plus ``reviewTime``, ``reviewerName``, ``reviewText``, ``summary``, ``verified``, ``vote``,
  ``style``, ``image`` that are not read.
- meta: ``meta_<Category>.json.gz`` keyed by ``asin``, with ``title``, ``brand``, ``category`` (a
  list, root first), ``main_cat``, ``price`` (text such as "$12.99" or ""), ``also_buy``, ... .
  Kept: ``title`` and the attributes ``brand``, ``categories`` (tuple), ``main_cat``, ``price``.

``amazon2023`` -- "Amazon Reviews'23" (McAuley lab; also on Hugging Face as
McAuley-Lab/Amazon-Reviews-2023):

- reviews: ``<Category>.jsonl`` or ``<Category>.jsonl.gz`` with ``user_id``, ``parent_asin``,
  ``asin``, ``rating`` (1-5), ``timestamp`` in MILLISECONDS, ``title``/``text`` (of the review),
  ``helpful_vote``, ``verified_purchase``. Items are ``parent_asin`` (a product with its
  variants), as in the lab's own benchmark files; timestamps become float seconds.
- meta: ``meta_<Category>.jsonl(.gz)`` keyed by ``parent_asin``, with ``title``,
  ``main_category``, ``store``, ``categories`` (a list), ``price`` (a number or null),
  ``details`` (a dict), ``features``, ``description``, ... . Kept: ``title`` and the attributes
  ``main_category``, ``store``, ``categories`` (tuple), ``price`` (float, NaN where null),
  ``details`` (dict).

What a user should know:

- The meta file is found beside the reviews file (``Video_Games_5.json.gz`` ->
  ``meta_Video_Games.json.gz``, gzipped or not) unless ``data.meta`` names it.
- Titles and brands keep their text, with HTML entities decoded ("&amp;" -> "&"), which the 2018
  meta files are full of. An item whose meta has no title (null, absent or blank) is kept and named
  by its id ("item B0002"); a note on the Dataset counts such items and names the first one's line.
- A review of an item that the meta file lacks is a bad line ("unknown item"). The real files do
  have some of these (the lab notes that some items lack metadata), so a full category usually
  needs the skip-bad-lines mode, which drops and counts them.
- Duplicate meta lines (the 2018 files have a few) keep the first.
- Rows keep the file order; ties in time are broken by it downstream.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fellrec.data import io
from fellrec.data.io import BadLines
from fellrec.data.tables import Dataset
from fellrec.errors import DataError

# (user key, item key, rating key, time key) in the reviews files
_KEYS_2018 = ("reviewerID", "asin", "overall", "unixReviewTime")
_KEYS_2023 = ("user_id", "parent_asin", "rating", "timestamp")


def load_amazon2018(path: Path, *, meta: Path | None = None, bad: BadLines | None = None) -> Dataset:
    """Amazon Reviews 2018: ``<Category>[_5].json(.gz)`` plus ``meta_<Category>.json(.gz)``."""
    bad = bad or BadLines()
    path = io.check_exists(path, "reviews file")
    category = _category(path)
    meta = meta or _beside(path, [f"meta_{category}.json.gz", f"meta_{category}.json"])
    inter = _read_reviews(path, _KEYS_2018, units_per_second=1.0, bad=bad)
    items = _read_meta(meta, "asin", set(inter["item_id"]), _attributes_2018, bad)
    inter = io.drop_unknown(inter, "item_id", items["item_id"], path, bad)
    return Dataset.from_raw(f"amazon2018-{category}", inter, items, None, source=str(path), item_source=str(meta))


def load_amazon2023(path: Path, *, meta: Path | None = None, bad: BadLines | None = None) -> Dataset:
    """Amazon Reviews 2023: ``<Category>.jsonl(.gz)`` plus ``meta_<Category>.jsonl(.gz)``."""
    bad = bad or BadLines()
    path = io.check_exists(path, "reviews file")
    category = _category(path)
    meta = meta or _beside(path, [f"meta_{category}.jsonl.gz", f"meta_{category}.jsonl"])
    inter = _read_reviews(path, _KEYS_2023, units_per_second=1000.0, bad=bad)
    items = _read_meta(meta, "parent_asin", set(inter["item_id"]), _attributes_2023, bad)
    inter = io.drop_unknown(inter, "item_id", items["item_id"], path, bad)
    return Dataset.from_raw(f"amazon2023-{category}", inter, items, None, source=str(path), item_source=str(meta))


def _category(path: Path) -> str:
    """``Video_Games_5.json.gz`` -> ``Video_Games``: the file name without suffixes and 5-core mark."""
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name.removesuffix("_5")


def _beside(path: Path, names: list[str]) -> Path:
    """The first of ``names`` that exists in ``path``'s folder; a DataError naming the first if none does."""
    for name in names:
        if (path.parent / name).exists():
            return path.parent / name
    raise DataError(path.parent / names[0], None,
                    f"meta file not found (looked beside {path.name}; give its path as data.meta)")


def _read_reviews(path: Path, keys: tuple[str, str, str, str], units_per_second: float,
                  bad: BadLines) -> pd.DataFrame:
    """user_id, item_id, timestamp (float seconds), rating and _line of every good review, in file order.

    The loop body is the hot path (millions of lines): plain lookups and type checks, with
    ``io.require`` / ``io.as_number`` called only for a line that has a problem, so the messages
    are the shared ones.
    """
    user_key, item_key, rating_key, time_key = keys
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    ratings: list[float] = []
    lines: list[int] = []
    for lineno, obj in io.iter_json(path, bad):
        user, item = obj.get(user_key), obj.get(item_key)
        rating, time = obj.get(rating_key), obj.get(time_key)
        if user is None or item is None or rating is None or time is None:
            _require_all(obj, keys, path, lineno, bad)
            continue
        rating = _number(rating, rating_key, path, lineno, bad)
        time = _number(time, time_key, path, lineno, bad) if rating is not None else None
        if time is None:
            continue
        users.append(user if type(user) is str else str(user))
        items.append(item if type(item) is str else str(item))
        ratings.append(rating)
        times.append(time)
        lines.append(lineno)
    return io.interaction_frame(users, items, times, ratings, lines, seconds_per_unit=1.0 / units_per_second)


def _require_all(obj: dict, keys: tuple[str, ...], path: Path, lineno: int, bad: BadLines) -> None:
    """Report the first of ``keys`` that ``obj`` lacks (or has as null)."""
    for key in keys:
        if io.require(obj, key, path, lineno, bad) is None:
            return


def _number(value: Any, key: str, path: Path, lineno: int, bad: BadLines) -> float | None:
    """A finite JSON number as float; anything else goes through ``io.as_number`` (message or None)."""
    kind = type(value)
    if kind is float:
        if value - value == 0.0:  # false for inf and nan
            return value
    elif kind is int and -(2**53) <= value <= 2**53:
        return float(value)
    return io.as_number(value, key, path, lineno, bad)


def _read_meta(path: Path, key: str, wanted: set[str], attributes: Callable[[dict], dict[str, Any]],
               bad: BadLines) -> pd.DataFrame:
    """item_id, title, attributes and _line of the items in ``wanted`` (first line per item wins).

    Every line is still parsed, so a malformed line is reported even for an item no review names.
    """
    rows: dict[str, dict[str, Any]] = {}
    for lineno, obj in io.iter_json(path, bad):
        item = io.require(obj, key, path, lineno, bad)
        if item is None:
            continue
        item = str(item)
        if item in wanted and item not in rows:
            rows[item] = {"item_id": item, "title": _text(obj.get("title")), **attributes(obj), "_line": lineno}
    columns = ["item_id", "title", *attributes({}), "_line"]
    return pd.DataFrame(list(rows.values()), columns=columns)


def _attributes_2018(obj: dict) -> dict[str, Any]:
    return {
        "brand": _text(obj.get("brand")),
        "categories": _strings(obj.get("category")),
        "main_cat": _text(obj.get("main_cat")),
        "price": _text(obj.get("price")),
    }


def _attributes_2023(obj: dict) -> dict[str, Any]:
    price = obj.get("price")
    details = obj.get("details")
    return {
        "main_category": _text(obj.get("main_category")),
        "store": _text(obj.get("store")),
        "categories": _strings(obj.get("categories")),
        "price": float(price) if isinstance(price, int | float) and not isinstance(price, bool) else np.nan,
        "details": details if isinstance(details, dict) else {},
    }


def _text(value: Any) -> str:
    """A meta field as display text: "" for null, HTML entities decoded ("&amp;" -> "&")."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return html.unescape(text).strip() if "&" in text else text.strip()


def _strings(value: Any) -> tuple[str, ...]:
    """A list of names (categories) as a tuple of decoded strings; anything else as ()."""
    if not isinstance(value, list):
        return ()
    return tuple(_text(v) for v in value if isinstance(v, str) and v.strip())
