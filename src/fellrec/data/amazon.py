"""Amazon Reviews 2018 and 2023 (McAuley lab, UCSD), as the user downloads them: one JSON object per
line, usually gzipped, read line by line for the keys the loaders need (one pass per file). The
reviews give the interactions; the meta file beside them (or ``data.meta``) the titles and
attributes (2018: ``brand``, ``categories``, ``main_cat``, ``price``; 2023: ``main_category``,
``store``, ``categories``, ``price``, ``details``). 2023 items are ``parent_asin`` and its
millisecond timestamps become seconds. Titles and brands have HTML entities decoded; an item
without a title is named by its id (one note); a review of an item the meta file lacks is a bad
line ("unknown item"); duplicate meta lines keep the first. Files and keys: docs/DATA.md.
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
