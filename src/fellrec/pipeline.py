"""The data half of an experiment, top to bottom: load -> filter -> split -> samples -> clients.

``prepare(cfg)`` is what every command and, later, every run starts with; ``client_table`` and
``summary`` are what ``fellrec data stats`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fellrec.config import Config, DataConfig
from fellrec.data.io import BadLines
from fellrec.data.registry import load_dataset
from fellrec.data.tables import Dataset, concat_domains
from fellrec.partition import Partition, make_partition
from fellrec.split import SampleSets, Split, build_samples, filter_min_rating, kcore, split


@dataclass
class Prepared:
    config: Config
    dataset: Dataset
    split: Split
    samples: SampleSets
    partition: Partition

    @property
    def num_clients(self) -> int:
        return len(self.partition.names)

    def client_of(self, user: np.ndarray) -> np.ndarray:
        """The client of each user id in ``user`` (-1 for users outside every client)."""
        return self.partition.client_of_user[np.asarray(user, dtype=np.int64)]


def load_data(cfg: DataConfig) -> Dataset:
    """The dataset (or datasets, one domain each) the config names, before any filtering."""
    bad = BadLines(skip=cfg.skip_bad_lines)
    if not cfg.domains:
        return load_dataset(cfg.format, cfg.path, meta=cfg.meta, bad=bad)
    parts = {}
    for d in cfg.domains:
        parts[d.name] = load_dataset(d.format, d.path, meta=d.meta, bad=BadLines(skip=cfg.skip_bad_lines))
    return concat_domains(parts)


def prepare(cfg: Config, progress: bool = False) -> Prepared:
    ds = load_data(cfg.data)
    ds = filter_min_rating(ds, cfg.data.min_rating)
    ds = kcore(ds, cfg.data.kcore)
    sp = split(ds, cfg.split.method, tuple(cfg.split.ratios))
    samples = build_samples(sp, cfg.split.history_len)
    p = cfg.partition
    options = {
        "kmeans": {"progress": progress, "mf_options": {
            "dim": p.mf_dim, "epochs": p.mf_epochs, "lr": p.mf_lr, "reg": p.mf_reg,
            "batch_size": p.mf_batch_size}},
        "attribute": {"column": p.attribute, "bins": p.bins},
        "dirichlet": {"alpha": p.alpha, "category": p.category, "min_users": p.min_users},
    }.get(p.method, {})
    partition = make_partition(p.method, ds, sp.train, num_clients=p.num_clients,
                               seed=cfg.seed if p.seed is None else p.seed, **options)
    return Prepared(cfg, ds, sp, samples, partition)


def client_table(p: Prepared) -> pd.DataFrame:
    """Per client: users, train/valid/test samples, distinct items in its train interactions."""
    rows = []
    train_client = p.client_of(p.split.train["user"].to_numpy())
    counts = {}
    for name in ("train", "valid", "test"):
        clients = p.client_of(getattr(p.samples, name).user)
        counts[name] = np.bincount(clients + 1, minlength=p.num_clients + 1)[1:]
    users = np.bincount(p.partition.client_of_user + 1, minlength=p.num_clients + 1)[1:]
    train_items = p.split.train["item"].to_numpy()
    for c, name in enumerate(p.partition.names):
        rows.append({
            "client": c,
            "name": name,
            "users": int(users[c]),
            "train": int(counts["train"][c]),
            "valid": int(counts["valid"][c]),
            "test": int(counts["test"][c]),
            "items": len(np.unique(train_items[train_client == c])),
        })
    return pd.DataFrame(rows)


def summary(p: Prepared) -> dict:
    """Dataset, split and sample sizes (what ``fellrec data stats`` prints above the client table)."""
    s = p.dataset.summary()
    sp = p.split
    return {
        "dataset": p.dataset.name,
        **s,
        "split": sp.method,
        "split_cuts": list(sp.cuts) if sp.cuts else None,
        "interactions_train": len(sp.train),
        "interactions_valid": len(sp.valid),
        "interactions_test": len(sp.test),
        "samples_train": len(p.samples.train),
        "samples_valid": len(p.samples.valid),
        "samples_test": len(p.samples.test),
        "history_len": p.config.split.history_len,
        "partition": p.config.partition.method,
        "clients": p.num_clients,
        "users_in_clients": int((p.partition.client_of_user >= 0).sum()),
        "notes": list(p.dataset.notes),
    }
