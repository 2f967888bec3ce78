"""The data half of an experiment, top to bottom: load -> filter -> split -> samples -> clients.

``prepare(cfg)`` is what every command and, later, every run starts with; ``client_table`` and
``summary`` are what ``fellrec data stats`` prints. FedPA (``model.backbone: ctr``) has a protocol of
its own, ``prepare_ctr``: load -> k-core -> attribute features -> public / private users -> each
private user's chronological split (one client per private user).

What loading had to tell (bad lines skipped, items without a title, ...) is printed to stderr as
``fellrec: note: ...`` lines, once per load; ``fellrec data stats`` prints the same notes in its
summary instead. When skipped lines, filters or the split leave nothing to train on,
the error says so, with how many lines were skipped, before any later step fails for lack of users.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fellrec.config import Config, DataConfig
from fellrec.data.io import BadLines
from fellrec.data.registry import load_dataset
from fellrec.data.tables import Dataset, concat_domains, domains_by
from fellrec.errors import ConfigError, DataError
from fellrec.fedpa.features import FeatureTable, UserSplit, build_features, select_public, split_users
from fellrec.holdout import SampleSets, Split, build_samples, filter_min_rating, kcore, split, within_domains
from fellrec.partition import Partition, make_partition


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


def load_data(cfg: DataConfig, echo: bool = True) -> Dataset:
    """The dataset (or datasets, one domain each) the config names, before any filtering.

    With ``echo`` the Dataset's notes are printed to stderr. A dataset without a single interaction
    (every line skipped as bad, or an empty file) is a DataError that says what was skipped.
    """
    if not cfg.domains:
        ds = load_dataset(cfg.format, cfg.path, meta=cfg.meta, bad=BadLines(skip=cfg.skip_bad_lines))
    else:
        parts = {}
        for d in cfg.domains:
            parts[d.name] = load_dataset(d.format, d.path, meta=d.meta, bad=BadLines(skip=cfg.skip_bad_lines))
        ds = concat_domains(parts)
    if cfg.domain_by is not None:
        try:
            ds = domains_by(ds, cfg.domain_by, cfg.domain_values or None)
        except ValueError as err:
            raise ConfigError(f"data.domain_by: {err}") from None
    if len(ds.interactions) == 0:
        raise nothing_usable(cfg, ds, "no interaction could be read")
    if echo:
        print_notes(ds.notes)
    return ds


def print_notes(notes: list[str]) -> None:
    """Notes on the data (``Dataset.notes``), one ``fellrec: note:`` line each on stderr."""
    for note in notes:
        print(f"fellrec: note: {note}", file=sys.stderr, flush=True)


def nothing_usable(cfg: DataConfig, ds: Dataset, why: str) -> DataError:
    """The error for data that left nothing to train on: ``why``, and the bad lines skipped on the way."""
    problem = f"nothing usable is left: {why}"
    if ds.num_skipped:
        files = "; ".join(f"{n:,} in {path} (first at {first})" for path, (n, first) in ds.skipped.items())
        problem += (f"; {ds.num_skipped:,} bad line{'s were' if ds.num_skipped != 1 else ' was'} skipped "
                    f"(data.skip_bad_lines): {files}")
    return DataError(cfg.path if cfg.path and not cfg.domains else ds.name, None, problem)


def prepare(cfg: Config, progress: bool = False, echo: bool = True) -> Prepared:
    """Load, filter, split, build samples and partition.

    With ``echo`` the loading notes are printed to stderr at the end, once the data has given clients
    (an error on the way already says what it needs to, such as the skipped lines).
    """
    d = cfg.data
    ds = load_data(d, echo=False)
    loading_notes = list(ds.notes)
    read = len(ds.interactions)
    ds = filter_min_rating(ds, d.min_rating)
    rated = len(ds.interactions)
    ds = kcore(ds, d.kcore)
    if len(ds.interactions) == 0:
        steps = [f"{read:,} interaction{'s were' if read != 1 else ' was'} read"]
        if d.min_rating is not None:
            steps.append(f"data.min_rating={d.min_rating:g} kept {rated:,}")
        if rated:
            steps.append(f"the data.kcore={d.kcore} filter kept 0")
        raise nothing_usable(d, ds, ", ".join(steps))
    sp = split(ds, cfg.split.method, tuple(cfg.split.ratios))
    if len(sp.train) == 0:
        raise nothing_usable(d, ds, f"the {cfg.split.method} split of the {len(ds.interactions):,} interactions "
                             "left after filtering gives no user a training interaction")
    samples = build_samples(sp, cfg.split.history_len, cfg.split.train_stride)
    if "domain" in ds.items:  # each domain's users rank that domain's items
        samples = within_domains(samples, ds.users["domain"].to_numpy(), ds.items["domain"].to_numpy())
    partition_cfg = cfg.partition
    options = {
        "kmeans": {"progress": progress, "mf_options": {
            "dim": partition_cfg.mf_dim, "epochs": partition_cfg.mf_epochs, "lr": partition_cfg.mf_lr,
            "reg": partition_cfg.mf_reg, "batch_size": partition_cfg.mf_batch_size}},
        "attribute": {"column": partition_cfg.attribute, "bins": partition_cfg.bins},
        "dirichlet": {"alpha": partition_cfg.alpha, "category": partition_cfg.category,
                      "min_users": partition_cfg.min_users},
    }.get(partition_cfg.method, {})
    partition = make_partition(partition_cfg.method, ds, sp.train, num_clients=partition_cfg.num_clients,
                               seed=cfg.seed if partition_cfg.seed is None else partition_cfg.seed, **options)
    if echo:
        print_notes(loading_notes)
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


@dataclass
class CTRPrepared:
    """FedPA's data: the dataset, its attribute features and labels, which users are public (the
    server's, for Open_Train) and each private user's train / valid / test interactions."""

    config: Config
    dataset: Dataset
    features: FeatureTable
    public: np.ndarray
    split: UserSplit

    @property
    def num_clients(self) -> int:
        return len(self.split.private_users)


def prepare_ctr(cfg: Config, echo: bool = True) -> CTRPrepared:
    """FedPA's protocol: what the server and every client derive alike from the dataset and the seed."""
    fedpa_cfg = cfg.fedpa
    ds = kcore(load_data(cfg.data, echo=echo), cfg.data.kcore)
    feats = build_features(ds)
    for attr in (*fedpa_cfg.group_attributes, *([fedpa_cfg.public_attribute] if fedpa_cfg.public_attribute else [])):
        if attr not in feats.user_fields:
            raise ConfigError(f"fedpa: {attr!r} is not a user attribute of {ds.name}; it has "
                              f"{', '.join(feats.user_fields)}")
    public = select_public(ds, feats, attribute=fedpa_cfg.public_attribute, values=tuple(fedpa_cfg.public_values),
                           fraction=fedpa_cfg.public_fraction, fraction_in=fedpa_cfg.public_fraction_in,
                           fraction_out=fedpa_cfg.public_fraction_out, seed=cfg.seed)
    split = split_users(ds, public, ratios=tuple(fedpa_cfg.ratios), min_interactions=fedpa_cfg.min_interactions)
    return CTRPrepared(cfg, ds, feats, public, split)
