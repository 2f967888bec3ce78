"""Dataset formats by name: ``data.format`` in a config picks one.

Each loader is ``load(path, *, meta, bad) -> Dataset``: ``path`` is the file or directory the
format expects (see FORMATS), ``meta`` an optional second file (item metadata) where the format
has one and its usual name cannot be derived from ``path``, and ``bad`` the bad-line policy.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from fellrec.data.io import BadLines
from fellrec.data.tables import Dataset
from fellrec.errors import ConfigError

# name -> ("module:function", what `path` must point to)
FORMATS: dict[str, tuple[str, str]] = {
    "ml-100k-recbole": ("fellrec.data.movielens:load_recbole_ml100k",
                        "nothing: MovieLens-100K shipped in the installed recbole==1.2.1 package"),
    "ml-100k": ("fellrec.data.movielens:load_ml100k", "the ml-100k directory (u.data, u.item, u.user)"),
    "ml-1m": ("fellrec.data.movielens:load_ml1m",
              "the ml-1m directory (ratings.dat, movies.dat, users.dat)"),
    "ml-csv": ("fellrec.data.movielens:load_ml_csv",
               "an ml-latest / ml-latest-small / ml-25m directory (ratings.csv, movies.csv)"),
    "amazon2018": ("fellrec.data.amazon:load_amazon2018",
                   "the reviews file <Category>_5.json(.gz) or <Category>.json(.gz); "
                   "meta_<Category>.json(.gz) beside it or given as data.meta"),
    "amazon2023": ("fellrec.data.amazon:load_amazon2023",
                   "the reviews file <Category>.jsonl(.gz); meta_<Category>.jsonl(.gz) beside it "
                   "or data.meta"),
    "goodreads": ("fellrec.data.goodreads:load_goodreads",
                  "goodreads_interactions_<genre>.json(.gz); goodreads_books_<genre>.json(.gz) beside it "
                  "or data.meta"),
    "microlens": ("fellrec.data.microlens:load_microlens",
                  "the pairs CSV (MicroLens-*_pairs.csv); the titles CSV beside it or data.meta"),
    "kuairand": ("fellrec.data.kuairand:load_kuairand",
                 "the KuaiRand data directory (log_*.csv, user_features_*.csv, video_features_*.csv)"),
}


def load_dataset(fmt: str, path: str | Path | None, *, meta: str | Path | None = None,
                 bad: BadLines | None = None) -> Dataset:
    """Load one dataset in format ``fmt``; ``bad`` collects skipped lines (default: raise at the first)."""
    if fmt not in FORMATS:
        raise ConfigError(f"data.format: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    target, expects = FORMATS[fmt]
    if path is None and fmt != "ml-100k-recbole":
        raise ConfigError(f"data.path: format {fmt!r} needs a path: {expects}")
    module, func = target.split(":")
    loader = getattr(importlib.import_module(module), func)
    bad = bad or BadLines()
    ds = loader(None if path is None else Path(path).expanduser(),
                meta=None if meta is None else Path(meta).expanduser(), bad=bad)
    ds.notes.extend(bad.summary())
    ds.skipped.update({path: (n, bad.examples[path]) for path, n in bad.counts.items()})
    return ds
