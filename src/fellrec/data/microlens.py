"""MicroLens (Westlake University, "MicroLens: A Content-Driven Micro-Video Recommendation Dataset").

The user downloads from the MicroLens GitHub page's dataset links (the MicroLens-50k-Dataset and
MicroLens-100k-Dataset folders):

- the pairs CSV, ``MicroLens-50k_pairs.csv`` / ``MicroLens-100k_pairs.csv``: a header line
  ``user,item,timestamp``, then one interaction per line; ids are integers, the timestamp is Unix
  time in MILLISECONDS (13 digits), converted here to float seconds. (The release's readme names
  the columns "userID", "videoID", the files say ``user``, ``item``; both are accepted.) The
  ``_pairs.tsv`` files (one user per line with the item sequence) carry no timestamps and are
  not read.
- the titles CSV beside it: ``MicroLens-50k_titles.csv`` (header ``item,title``) or
  ``MicroLens-100k_title_en.csv`` (no header; "videoID,title" per line). Titles may contain
  commas, quoted or not, so a line is split at its FIRST comma only, and a title in double
  quotes is unquoted by the CSV rules. ``data.meta`` names another titles file (same layout).

MicroLens-1M was released for the WWW 2025 challenge in another layout, which we could not
verify; a pairs CSV with the same header and millisecond timestamps loads the same way, with its
titles file given as ``data.meta``.

Decisions: every row of the pairs file is an interaction (implicit feedback, rating 1.0); the
items table has only the title; an item whose title is empty is kept and named by its id ("item
2"), and a note on the Dataset counts such items and names the first one's line; a pair whose item
is not in the titles file is a bad line ("unknown item"). Rows keep the file order; ties in time are broken by
it downstream.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from fellrec.data import io
from fellrec.data.io import BadLines
from fellrec.data.tables import Dataset
from fellrec.errors import DataError

# header names of the pairs CSV: the files' own, then the release readme's (accepted as well)
_PAIRS_HEADERS = (("user", "item", "timestamp"), ("userID", "videoID", "timestamp"))
# first field of a titles file's header line, lower-cased (MicroLens-50k writes "item")
_HEADER_NAMES = {"item", "item_id", "itemid", "video", "video_id", "videoid", "id"}


def load_microlens(path: Path, *, meta: Path | None = None, bad: BadLines | None = None) -> Dataset:
    """A MicroLens pairs CSV (``MicroLens-50k_pairs.csv``) plus its titles CSV."""
    bad = bad or BadLines()
    path = io.check_exists(path, "pairs file")
    release = path.name.split("_pairs")[0].removesuffix(".gz").removesuffix(".csv")
    titles_file = meta or _titles_file(path, release)
    items = _read_titles(titles_file, bad)
    user, item, time = _pairs_header(path)
    pairs = io.read_csv(path, {user: "int", item: "int", time: "float"}, bad=bad)
    inter = pd.DataFrame({
        "user_id": pairs[user].to_numpy(),
        "item_id": pairs[item].to_numpy(),
        "timestamp": pairs[time].to_numpy(dtype=np.float64) / 1000.0,
        "rating": 1.0,
        "_line": pairs["_line"].to_numpy(),
    })
    inter = io.drop_unknown(inter, "item_id", items["item_id"], path, bad)
    name = release.lower() if release.lower().startswith("microlens") else f"microlens-{release.lower()}"
    return Dataset.from_raw(name, inter, items, None, source=str(path), item_source=str(titles_file))


def _pairs_header(path: Path) -> tuple[str, str, str]:
    """The (user, item, timestamp) column names the pairs file uses (``io.read_csv`` reports others)."""
    header: set[str] = set()
    for _, text in io.iter_lines(path):
        header = {name.strip().removeprefix("\ufeff") for name in text.split(",")}
        break
    for names in _PAIRS_HEADERS:
        if header.issuperset(names):
            return names
    return _PAIRS_HEADERS[0]


def _titles_file(path: Path, release: str) -> Path:
    """``<release>_titles.csv`` (50k) or ``<release>_title_en.csv`` (100k) beside the pairs file."""
    names = [f"{release}_titles.csv", f"{release}_title_en.csv"]
    for name in names:
        if (path.parent / name).exists():
            return path.parent / name
    raise DataError(path.parent / names[0], None, f"titles file not found (looked for {' or '.join(names)} "
                    f"beside {path.name}; give its path as data.meta)")


def _read_titles(path: Path, bad: BadLines) -> pd.DataFrame:
    """item_id and title of each line ``<item>,<title>``; a header line is recognised and skipped."""
    path = io.check_exists(path, "titles file")
    titles: dict[int, str] = {}
    lines: list[int] = []
    for lineno, text in io.iter_lines(path):
        if lineno == 1:
            text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
        if not text.strip():
            continue
        head, comma, rest = text.partition(",")
        if not comma:
            bad(path, lineno, "expected '<item>,<title>' (no comma)")
            continue
        if lineno == 1 and head.strip().strip('"').lower() in _HEADER_NAMES:
            continue
        try:
            item = int(head.strip().strip('"'))
        except ValueError:
            bad(path, lineno, f"item id {head!r} is not a number")
            continue
        if item not in titles:
            titles[item] = _unquote(rest.strip())
            lines.append(lineno)
    return pd.DataFrame({"item_id": np.fromiter(titles, dtype=np.int64, count=len(titles)),
                         "title": pd.Series(list(titles.values()), dtype=object),
                         "_line": np.asarray(lines, dtype=np.int64)})


def _unquote(text: str) -> str:
    """``"A, ""quoted"" title"`` -> ``A, "quoted" title``; text not in double quotes is kept as is."""
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        fields = next(csv.reader([text]))
        if len(fields) == 1:
            return fields[0].strip()
    return text
