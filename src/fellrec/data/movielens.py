"""MovieLens loaders: the packaged ML-100K (no network) and the GroupLens releases a user downloads.

Titles keep the release year in parentheses, "Toy Story (1995)", as the GroupLens files write
them and as LLM recommenders usually see them. Genres become a tuple of names (``genres``), the
year an integer attribute (``year``; missing where the source has none).

- ``ml-100k-recbole``: ``recbole/dataset_example/ml-100k/ml-100k.{inter,item,user}`` from the
  installed ``recbole==1.2.1`` wheel, found through ``importlib.metadata`` (never imported). RecBole
  stores the year apart from the title; we join them back. Item 267's title, misspelt "unkonwn"
  there, is read as "unknown", as in ``u.item``.
- ``ml-100k``: ``u.data`` (tab-separated user, item, rating, timestamp), ``u.item`` (pipe-separated,
  latin-1, 19 genre flags), ``u.user`` (user, age, gender, occupation, zip code).
- ``ml-1m``: ``ratings.dat``, ``movies.dat``, ``users.dat`` with ``::`` separators, latin-1; age and
  occupation are GroupLens' codes (age band lower bound, occupation number).
- ``ml-csv``: the CSV releases (ml-latest, ml-latest-small, ml-20m, ml-25m, ml-32m): ``ratings.csv``
  (userId, movieId, rating, timestamp) and ``movies.csv`` (movieId, title, genres, pipe-separated;
  "(no genres listed)" means none). These releases have no user file.

A movie with an empty title is kept: it is named by its id ("item 42"), and a note on the Dataset
counts such movies and names the first one's line (see ``Dataset.from_raw``).
"""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

import pandas as pd

from fellrec.data.io import BadLines, check_exists, drop_unknown, read_csv
from fellrec.data.tables import Dataset
from fellrec.errors import DataError

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
]
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


def recbole_ml100k_dir() -> Path:
    """The ML-100K folder inside the installed recbole wheel (without importing recbole)."""
    try:
        files = md.files("recbole") or []
    except md.PackageNotFoundError:
        raise DataError("recbole", None, "package not installed: the default dataset ML-100K comes from "
                        "it; run `pip install --no-deps recbole==1.2.1` (make demo / make test do)") from None
    for f in files:
        if f.name == "ml-100k.inter":
            return Path(f.locate()).parent
    raise DataError("recbole", None, "installed recbole has no dataset_example/ml-100k (need recbole==1.2.1)")


def load_recbole_ml100k(path: Path | None = None, *, meta: Path | None = None,
                        bad: BadLines) -> Dataset:
    """MovieLens-100K from the recbole package (``path`` may point to another copy of the folder)."""
    folder = path or recbole_ml100k_dir()
    inter_file, item_file, user_file = (folder / f"ml-100k.{x}" for x in ("inter", "item", "user"))
    items = read_csv(item_file, {"item_id:token": "int", "movie_title:token_seq": "str?",
                                 "release_year:token": "str", "class:token_seq": "str"},
                     sep="\t", quotes=False, bad=bad)
    items.columns = ["item_id", "name", "year", "genres", "_line"]
    items["name"] = items["name"].replace("unkonwn", "unknown")
    year = pd.to_numeric(items["year"], errors="coerce").astype("Int64")
    items["title"] = [f"{n} ({y})" if n.strip() and pd.notna(y) else n
                      for n, y in zip(items["name"], year, strict=True)]
    items["year"] = year
    items["genres"] = items["genres"].map(lambda s: tuple(s.split()))
    users = read_csv(user_file, {"user_id:token": "int", "age:token": "int", "gender:token": "str",
                                 "occupation:token": "str", "zip_code:token": "str"},
                     sep="\t", quotes=False, bad=bad)
    users.columns = ["user_id", "age", "gender", "occupation", "zip_code", "_line"]
    inter = read_csv(inter_file, {"user_id:token": "int", "item_id:token": "int", "rating:float": "float",
                                  "timestamp:float": "float"}, sep="\t", quotes=False, bad=bad)
    inter.columns = ["user_id", "item_id", "rating", "timestamp", "_line"]
    inter = drop_unknown(inter, "item_id", items["item_id"], inter_file, bad)
    inter = drop_unknown(inter, "user_id", users["user_id"], inter_file, bad, what="user")
    return Dataset.from_raw("ml-100k", inter, items[["item_id", "title", "year", "genres", "_line"]], users,
                            source=str(inter_file), item_source=str(item_file))


def load_ml100k(path: Path, *, meta: Path | None = None, bad: BadLines) -> Dataset:
    """The GroupLens ml-100k folder: ``u.data``, ``u.item``, ``u.user``."""
    folder = check_exists(path, "directory")
    item_names = ["item_id", "title", "release_date", "video_release_date", "url", *ML100K_GENRES]
    item_file = folder / "u.item"
    items = read_csv(item_file, {"item_id": "int", "title": "str?", "release_date": "str?",
                                         **{g: "int" for g in ML100K_GENRES}},
                     sep="|", names=item_names, encoding="latin-1", quotes=False, bad=bad)
    flags = items[ML100K_GENRES].to_numpy()
    items["genres"] = [tuple(g for g, f in zip(ML100K_GENRES, row, strict=True) if f) for row in flags]
    items["year"] = pd.to_numeric(items["release_date"].str[-4:], errors="coerce").astype("Int64")
    users = read_csv(folder / "u.user", {"user_id": "int", "age": "int", "gender": "str", "occupation": "str",
                                         "zip_code": "str"},
                     sep="|", names=["user_id", "age", "gender", "occupation", "zip_code"],
                     encoding="latin-1", quotes=False, bad=bad)
    data_file = folder / "u.data"
    inter = read_csv(data_file, {"user_id": "int", "item_id": "int", "rating": "float", "timestamp": "float"},
                     sep="\t", names=["user_id", "item_id", "rating", "timestamp"], quotes=False, bad=bad)
    inter = drop_unknown(inter, "item_id", items["item_id"], data_file, bad)
    inter = drop_unknown(inter, "user_id", users["user_id"], data_file, bad, what="user")
    return Dataset.from_raw("ml-100k", inter, items[["item_id", "title", "year", "genres", "_line"]], users,
                            source=str(data_file), item_source=str(item_file))


def load_ml1m(path: Path, *, meta: Path | None = None, bad: BadLines) -> Dataset:
    """The GroupLens ml-1m folder: ``ratings.dat``, ``movies.dat``, ``users.dat`` (``::``, latin-1)."""
    folder = check_exists(path, "directory")
    movies = folder / "movies.dat"
    items = read_csv(movies, {"item_id": "int", "title": "str?", "genres": "str"},
                     sep="::", names=["item_id", "title", "genres"], encoding="latin-1", quotes=False,
                     bad=bad)
    items = _title_year_genres(items)
    users = read_csv(folder / "users.dat", {"user_id": "int", "gender": "str", "age": "int",
                                            "occupation": "int", "zip_code": "str"},
                     sep="::", names=["user_id", "gender", "age", "occupation", "zip_code"],
                     encoding="latin-1", quotes=False, bad=bad)
    ratings = folder / "ratings.dat"
    inter = read_csv(ratings, {"user_id": "int", "item_id": "int", "rating": "float", "timestamp": "float"},
                     sep="::", names=["user_id", "item_id", "rating", "timestamp"], quotes=False, bad=bad)
    inter = drop_unknown(inter, "item_id", items["item_id"], ratings, bad)
    inter = drop_unknown(inter, "user_id", users["user_id"], ratings, bad, what="user")
    return Dataset.from_raw("ml-1m", inter, items, users, source=str(ratings), item_source=str(movies))


def load_ml_csv(path: Path, *, meta: Path | None = None, bad: BadLines) -> Dataset:
    """A GroupLens CSV release folder (ml-latest, ml-latest-small, ml-25m, ...): ratings.csv, movies.csv."""
    folder = check_exists(path, "directory")
    movies = meta or folder / "movies.csv"
    items = read_csv(movies, {"movieId": "int", "title": "str?", "genres": "str"}, bad=bad)
    items = _title_year_genres(items.rename(columns={"movieId": "item_id"}))
    ratings = folder / "ratings.csv"
    inter = read_csv(ratings, {"userId": "int", "movieId": "int", "rating": "float", "timestamp": "float"},
                     bad=bad).rename(columns={"userId": "user_id", "movieId": "item_id"})
    inter = drop_unknown(inter, "item_id", items["item_id"], ratings, bad)
    return Dataset.from_raw(folder.name or "movielens", inter, items, None, source=str(ratings),
                            item_source=str(movies))


def _title_year_genres(items: pd.DataFrame) -> pd.DataFrame:
    """``genres`` "A|B" -> ("A", "B") ("(no genres listed)" -> ()), ``year`` from "Title (1995)".

    An empty title stays "" here (``Dataset.from_raw`` names the item by its id and says so).
    """
    items["title"] = items["title"].str.strip()
    items["year"] = pd.to_numeric(items["title"].str.extract(_YEAR_IN_TITLE, expand=False),
                                  errors="coerce").astype("Int64")
    items["genres"] = items["genres"].map(
        lambda s: () if s == "(no genres listed)" else tuple(g for g in s.split("|") if g))
    return items[["item_id", "title", "year", "genres", "_line"]]

