"""The canonical data model every loader produces and everything downstream reads.

Three tables, with dense integer ids inside and the dataset's own ids kept for output:

- ``interactions``: ``user``, ``item`` (dense int64), ``timestamp`` (float64 Unix seconds),
  ``rating`` (float64; 1.0 where the source has no rating), in time order. Ties in time keep
  the order of the source file (a stable sort), so a user's sequence is reproducible even where
  half of the timestamps are shared (MovieLens-100K).
- ``items``: ``item`` (dense, equal to the row position), ``item_id`` (original), ``title`` (str),
  then the source's item attributes (genres, year, brand, categories, ...). An item whose source
  gives no title (empty, blank or absent) keeps a fallback made from its id, ``"item <item_id>"``,
  and a note on the Dataset says how many items had none and where the first one is.
- ``users``: ``user`` (dense, equal to the row position), ``user_id`` (original), then the user
  attributes the source has (age, gender, occupation, ...).

Datasets loaded together for a cross-domain federation carry a ``domain`` column in all three
tables; a user id seen in two domains is two users (each domain holds its own data).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fellrec.errors import DataError


@dataclass
class Dataset:
    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    """What loading did that the user should know (skipped lines, dropped rows, missing titles)."""
    skipped: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Bad lines skipped while loading (``data.skip_bad_lines``): file -> (count, first problem)."""

    @property
    def num_skipped(self) -> int:
        """How many bad input lines loading skipped, over all files."""
        return sum(n for n, _ in self.skipped.values())

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @classmethod
    def from_raw(
        cls,
        name: str,
        interactions: pd.DataFrame,
        items: pd.DataFrame,
        users: pd.DataFrame | None = None,
        source: str = "",
        item_source: str = "",
    ) -> Dataset:
        """Build a Dataset from a loader's tables keyed by the source's own ids.

        ``interactions`` has ``user_id``, ``item_id``, ``timestamp`` and optionally ``rating``, in
        file order; ``items`` has ``item_id``, ``title`` and attribute columns; ``users`` has
        ``user_id`` and attribute columns (None: users are known only by their interactions).
        Items and users that no interaction mentions are dropped. Dense ids follow the sorted
        original ids, so they do not depend on file order.

        ``source`` (the interactions file) and ``item_source`` (the item file) name where a problem
        is; an item without a title gets ``"item <item_id>"``, and one note counts such items and
        names the first one's ``item_source`` line (from ``items['_line']`` when the loader has it).
        """
        inter = interactions.drop(columns=[c for c in ("_line",) if c in interactions]).copy()
        if "rating" not in inter:
            inter["rating"] = 1.0
        for col in ("user_id", "item_id", "timestamp"):
            if col not in inter:
                raise DataError(source or name, None, f"interactions lack the {col!r} column")
        if users is None:
            users = pd.DataFrame({"user_id": inter["user_id"].unique()})
        tables = {}
        for what, table in (("item", items), ("user", users)):
            key = f"{what}_id"
            table = table.drop_duplicates(key, keep="first")
            unknown = ~inter[key].isin(table[key])
            if unknown.any():
                raise DataError(source or name, None,
                                f"{int(unknown.sum())} interaction(s) with an unknown {what}, e.g. "
                                f"{inter.loc[unknown, key].tolist()[0]!r}")
            tables[what] = table
        items, notes = _fill_titles(tables["item"], inter["item_id"], item_source)
        items = items.drop(columns=[c for c in ("_line",) if c in items])
        users = tables["user"].drop(columns=[c for c in ("_line",) if c in tables["user"]])
        return cls._densify(name, inter, items, users, notes)

    @classmethod
    def _densify(cls, name, inter, items, users, notes=None, skipped=None) -> Dataset:
        """Keep only users/items that have interactions; number them 0..n-1 by original id."""
        keys_u = ["domain", "user_id"] if "domain" in inter else ["user_id"]
        keys_i = ["domain", "item_id"] if "domain" in inter else ["item_id"]
        users = _restrict(users, inter, keys_u).sort_values(keys_u, kind="stable").reset_index(drop=True)
        items = _restrict(items, inter, keys_i).sort_values(keys_i, kind="stable").reset_index(drop=True)
        users.insert(0, "user", np.arange(len(users), dtype=np.int64))
        items.insert(0, "item", np.arange(len(items), dtype=np.int64))
        inter = inter.merge(users[[*keys_u, "user"]], on=keys_u, how="left", sort=False)
        inter = inter.merge(items[[*keys_i, "item"]], on=keys_i, how="left", sort=False)
        cols = ["user", "item", "timestamp", "rating", *(["domain"] if "domain" in inter else [])]
        inter = inter[cols].astype({"user": np.int64, "item": np.int64, "timestamp": np.float64,
                                    "rating": np.float64})
        inter = inter.sort_values("timestamp", kind="stable").reset_index(drop=True)
        return cls(name, inter, items, users, list(notes or []), dict(skipped or {}))

    def subset(self, keep: np.ndarray | pd.Series, note: str | None = None) -> Dataset:
        """A new Dataset with only the interactions where ``keep`` is true, ids made dense again."""
        keep = np.asarray(keep, dtype=bool)
        inter = self.interactions.loc[keep]
        inter = inter.assign(user_id=self.users["user_id"].to_numpy()[inter["user"].to_numpy()],
                             item_id=self.items["item_id"].to_numpy()[inter["item"].to_numpy()])
        inter = inter.drop(columns=["user", "item"])
        notes = [*self.notes, *([note] if note else [])]
        return Dataset._densify(self.name, inter, self.items.drop(columns="item"),
                                self.users.drop(columns="user"), notes, self.skipped)

    def summary(self) -> dict:
        """Sizes, density, time span and the share of same-user timestamp ties.

        ``density`` is the share of the user x item matrix that has at least one interaction: it counts
        distinct (user, item) ``pairs``, so a pair seen several times (a re-rating, a video watched
        again) counts once; ``repeated_pairs`` is how many interactions repeat an earlier pair.
        """
        inter = self.interactions
        n = len(inter)
        per_user = inter.groupby("user").size()
        ties = inter.duplicated(["user", "timestamp"], keep=False).mean() if n else 0.0
        pairs = int((~inter.duplicated(["user", "item"])).sum()) if n else 0
        return {
            "users": self.num_users,
            "items": self.num_items,
            "interactions": n,
            "pairs": pairs,
            "repeated_pairs": n - pairs,
            "density": pairs / max(1, self.num_users * self.num_items),
            "per_user_min": int(per_user.min()) if n else 0,
            "per_user_median": float(per_user.median()) if n else 0.0,
            "per_user_max": int(per_user.max()) if n else 0,
            "time_first": float(inter["timestamp"].min()) if n else None,
            "time_last": float(inter["timestamp"].max()) if n else None,
            "same_timestamp_share": float(ties),
        }


def fallback_title(item_id) -> str:
    """The text that stands for the title of an item whose source gives none."""
    return f"item {item_id}"


def _fill_titles(items: pd.DataFrame, used: pd.Series, source: str) -> tuple[pd.DataFrame, list[str]]:
    """``items`` with every missing title replaced by ``fallback_title``, and the note that says so.

    The note counts only the items some interaction in ``used`` mentions (the others are dropped)
    and names the first of them: its line of ``source`` where ``items`` has ``_line``.
    """
    fallback = items["item_id"].map(fallback_title)
    used_rows = items["item_id"].isin(used).to_numpy()
    if "title" not in items:
        items = items.copy()
        items.insert(items.columns.get_loc("item_id") + 1, "title", fallback)
        n = int(used_rows.sum())
        example = fallback[used_rows].iloc[0] if n else ""
        return items, ([f"the items have no titles in this format; all {n} are named by their id instead "
                        f"({example!r}, ...)"] if n else [])
    title = items["title"]
    missing = (title.isna() | title.astype(str).str.strip().eq("")).to_numpy()
    if not missing.any():
        return items, []
    items = items.copy()
    items["title"] = title.where(~missing, fallback)
    gap = items.loc[missing & used_rows]
    if gap.empty:
        return items, []
    if "_line" in gap:
        gap = gap.sort_values("_line", kind="stable")
        where = f"{source or 'the item file'}:{int(gap['_line'].iloc[0])}"
    else:
        where = f"{source}, item {gap['item_id'].iloc[0]!r}" if source else f"item {gap['item_id'].iloc[0]!r}"
    example = fallback_title(gap["item_id"].iloc[0])
    if len(gap) == 1:
        return items, [f"1 item has no title and is named by its id instead ({example!r}); it is at {where}"]
    return items, [f"{len(gap)} items have no title and are named by their id instead ({example!r}, ...); "
                   f"the first is at {where}"]


def _restrict(table: pd.DataFrame, inter: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    used = inter[keys].drop_duplicates()
    return table.merge(used, on=keys, how="inner", sort=False)


def concat_domains(datasets: dict[str, Dataset]) -> Dataset:
    """Several datasets as one, each row tagged with its ``domain`` (the key of ``datasets``).

    Original ids become strings (domains may mix numeric and text ids); the same id in two domains
    is two users (or items), told apart by ``domain``.
    """
    inters, items, users = [], [], []
    for domain, ds in datasets.items():
        user_ids = ds.users["user_id"].astype(str).to_numpy()
        item_ids = ds.items["item_id"].astype(str).to_numpy()
        inter = ds.interactions.assign(
            domain=domain,
            user_id=user_ids[ds.interactions["user"].to_numpy()],
            item_id=item_ids[ds.interactions["item"].to_numpy()],
        ).drop(columns=["user", "item"])
        inters.append(inter)
        items.append(ds.items.drop(columns="item").assign(domain=domain, item_id=item_ids))
        users.append(ds.users.drop(columns="user").assign(domain=domain, user_id=user_ids))
    notes = [f"{d}: {n}" for d, ds in datasets.items() for n in ds.notes]
    skipped = {path: counts for ds in datasets.values() for path, counts in ds.skipped.items()}
    name = "+".join(datasets)
    return Dataset._densify(name, pd.concat(inters, ignore_index=True), pd.concat(items, ignore_index=True),
                            pd.concat(users, ignore_index=True), notes, skipped)


def domains_by(ds: Dataset, attribute: str, values: list[str] | None = None) -> Dataset:
    """One dataset cut into domains by an item attribute: each item goes to the domain of the first
    value of its ``attribute`` (a tuple such as ``genres``, or a plain value); a user's interactions
    are split by domain, so a user seen in two domains is two users, as when datasets are loaded
    together (``concat_domains``). ``values`` keeps those domains only (items of the others are
    left out); None keeps every one. Raises ValueError for an unknown attribute or value."""
    if "domain" in ds.items:
        raise ValueError("the data already has domains (data.domains); cut one dataset only")
    if attribute not in ds.items:
        raise ValueError(f"items have no attribute {attribute!r} to cut domains by; they have "
                        f"{', '.join(c for c in ds.items.columns if c not in ('item', 'item_id', 'title'))}")

    def first(v):
        if isinstance(v, (tuple, list, np.ndarray)):
            return str(v[0]) if len(v) else None
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)

    domain = np.array([first(v) for v in ds.items[attribute]], dtype=object)
    found = sorted({d for d in domain if d is not None})
    if values:
        unknown = [v for v in values if v not in found]
        if unknown:
            raise ValueError(f"no item's first {attribute} is {', '.join(map(repr, unknown))}; "
                            f"there are {', '.join(found)}")
    keep = set(values or found)
    item_domain = domain[ds.interactions["item"].to_numpy()]
    rows = np.array([d in keep for d in item_domain], dtype=bool)
    inter = ds.interactions.loc[rows]
    user_ids = ds.users["user_id"].astype(str).to_numpy()
    item_ids = ds.items["item_id"].astype(str).to_numpy()
    inter = inter.assign(domain=item_domain[rows], user_id=user_ids[inter["user"].to_numpy()],
                         item_id=item_ids[inter["item"].to_numpy()]).drop(columns=["user", "item"])
    items = ds.items.drop(columns="item").assign(item_id=item_ids, domain=domain)
    items = items[items["domain"].isin(keep)]
    users = pd.concat([ds.users.drop(columns="user").assign(user_id=user_ids, domain=d) for d in sorted(keep)],
                      ignore_index=True)
    dropped = int((~rows).sum())
    note = (f"domains by first {attribute}: {', '.join(sorted(keep))}"
            + (f"; {dropped:,} interactions with items of other domains left out" if dropped else ""))
    return Dataset._densify(ds.name, inter, items, users, [*ds.notes, note], ds.skipped)
