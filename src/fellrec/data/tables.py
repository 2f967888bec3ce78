"""The canonical data model every loader produces and everything downstream reads.

Three tables, with dense integer ids inside and the dataset's own ids kept for output:

- ``interactions``: ``user``, ``item`` (dense int64), ``timestamp`` (float64 Unix seconds),
  ``rating`` (float64; 1.0 where the source has no rating), in time order. Ties in time keep
  the order of the source file (a stable sort), so a user's sequence is reproducible even where
  half of the timestamps are shared (MovieLens-100K).
- ``items``: ``item`` (dense, equal to the row position), ``item_id`` (original), ``title`` (str),
  then the source's item attributes (genres, year, brand, categories, ...).
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
    """What loading did that the user should know (skipped lines, dropped rows)."""

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
    ) -> Dataset:
        """Build a Dataset from a loader's tables keyed by the source's own ids.

        ``interactions`` has ``user_id``, ``item_id``, ``timestamp`` and optionally ``rating``, in
        file order; ``items`` has ``item_id``, ``title`` and attribute columns; ``users`` has
        ``user_id`` and attribute columns (None: users are known only by their interactions).
        Items and users that no interaction mentions are dropped. Dense ids follow the sorted
        original ids, so they do not depend on file order.
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
            table = table.drop(columns=[c for c in ("_line",) if c in table])
            table = table.drop_duplicates(key, keep="first")
            unknown = ~inter[key].isin(table[key])
            if unknown.any():
                raise DataError(source or name, None,
                                f"{int(unknown.sum())} interaction(s) with an unknown {what}, e.g. "
                                f"{inter.loc[unknown, key].tolist()[0]!r}")
            tables[what] = table
        items, users = tables["item"], tables["user"]
        if "title" not in items:
            items = items.assign(title="")
        return cls._densify(name, inter, items, users)

    @classmethod
    def _densify(cls, name, inter, items, users, notes=None) -> Dataset:
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
        return cls(name, inter, items, users, list(notes or []))

    def subset(self, keep: np.ndarray | pd.Series, note: str | None = None) -> Dataset:
        """A new Dataset with only the interactions where ``keep`` is true, ids made dense again."""
        keep = np.asarray(keep, dtype=bool)
        inter = self.interactions.loc[keep]
        inter = inter.assign(user_id=self.users["user_id"].to_numpy()[inter["user"].to_numpy()],
                             item_id=self.items["item_id"].to_numpy()[inter["item"].to_numpy()])
        inter = inter.drop(columns=["user", "item"])
        notes = [*self.notes, *([note] if note else [])]
        return Dataset._densify(self.name, inter, self.items.drop(columns="item"),
                                self.users.drop(columns="user"), notes)

    def summary(self) -> dict:
        """Sizes, density, time span and the share of same-user timestamp ties."""
        inter = self.interactions
        n = len(inter)
        per_user = inter.groupby("user").size()
        ties = inter.duplicated(["user", "timestamp"], keep=False).mean() if n else 0.0
        return {
            "users": self.num_users,
            "items": self.num_items,
            "interactions": n,
            "density": n / max(1, self.num_users * self.num_items),
            "per_user_min": int(per_user.min()) if n else 0,
            "per_user_median": float(per_user.median()) if n else 0.0,
            "per_user_max": int(per_user.max()) if n else 0,
            "time_first": float(inter["timestamp"].min()) if n else None,
            "time_last": float(inter["timestamp"].max()) if n else None,
            "same_timestamp_share": float(ties),
        }


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
    name = "+".join(datasets)
    return Dataset._densify(name, pd.concat(inters, ignore_index=True), pd.concat(items, ignore_index=True),
                            pd.concat(users, ignore_index=True), notes)
