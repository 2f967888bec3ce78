"""The parts of a FedPA run (``model.backbone: ctr``), built from its config: attribute features and
labels, public / private users, the foundation model (Open_Train: central pre-training on the
public users; checkpoint ``foundation.safetensors``), the federation's options and its results.
``fellrec.run`` (embedded) and ``fellrec.runtime.flower.fedpa`` run the rounds (Fed_Train).

``overall`` holds the pooled test metrics (AUC, per-user GAUC, logloss, weighted precision,
recall, F1) at the best validation round; ``rounds`` the pooled validation and test metrics of
every round; ``communication`` the bytes the clients sent and received.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from fellrec.config import Config
from fellrec.data.tables import Dataset
from fellrec.errors import ConfigError
from fellrec.fedpa.features import FeatureTable, UserSplit, build_features, select_public, split_users
from fellrec.fedpa.model import CTRModel
from fellrec.fedpa.pretrain import load_pretrained, pretrain, save_pretrained
from fellrec.fedpa.trainer import pooled_selection
from fellrec.files import save_tensors


def fedpa_world(cfg: Config, ds: Dataset) -> tuple[FeatureTable, np.ndarray, UserSplit]:
    """The features, the public users and the per-user split: what the server and every client
    derive alike from the dataset and the seed."""
    f = cfg.fedpa
    feats = build_features(ds)
    for attr in (*f.group_attributes, *([f.public_attribute] if f.public_attribute else [])):
        if attr not in feats.user_fields:
            raise ConfigError(f"fedpa: {attr!r} is not a user attribute of {ds.name}; it has "
                              f"{', '.join(feats.user_fields)}")
    public = select_public(ds, feats, attribute=f.public_attribute, values=tuple(f.public_values),
                           fraction=f.public_fraction, fraction_in=f.public_fraction_in,
                           fraction_out=f.public_fraction_out, seed=cfg.seed)
    split = split_users(ds, public, ratios=tuple(f.ratios), min_interactions=f.min_interactions)
    return feats, public, split


def foundation(cfg: Config, ds: Dataset, feats: FeatureTable, split: UserSplit, out: Path) -> tuple[CTRModel, dict]:
    """Open_Train on the public users (saved as ``out/foundation.safetensors``), or the checkpoint
    ``fedpa.pretrain_path``; the model and what to report of its training."""
    f = cfg.fedpa
    started = time.time()
    if f.pretrain_path:
        base, _ = load_pretrained(Path(f.pretrain_path), feats)
        pre: dict[str, Any] = {"loaded": f.pretrain_path}
    else:
        users, items = ds.interactions["user"].to_numpy(), ds.interactions["item"].to_numpy()
        res = pretrain(feats, users, items, split.public_rows, epochs=f.pretrain_epochs, dim=f.dim,
                       hidden=tuple(f.hidden), lr=f.pretrain_lr, seed=cfg.seed)
        save_pretrained(out / "foundation.safetensors", res.model, feats)
        base = res.model
        pre = {"epochs": f.pretrain_epochs, "kept_epoch": res.epoch, "history": res.history}
    pre["time_s"] = round(time.time() - started, 1)
    return base, pre


def federation_options(cfg: Config) -> dict[str, Any]:
    """``build_federation``'s settings from the config."""
    f = cfg.fedpa
    return {"algorithm": f.algorithm, "group_attributes": tuple(f.group_attributes), "rank": f.rank,
            "alpha": f.alpha, "zero_init": f.zero_init, "lr": f.lr, "batch_size": f.batch_size,
            "local_epochs": f.local_epochs, "ldp_scale": f.ldp_scale, "weighting": f.weighting,
            "select_by": "logloss", "seed": cfg.seed}


def fed_rounds(cfg: Config) -> int:
    return 0 if cfg.fedpa.algorithm == "frozen" else cfg.train.rounds


def fedpa_results(cfg: Config, ds: Dataset, public: np.ndarray, split: UserSplit, pre: dict, runtime,
                  strategy, trainers: list) -> dict[str, Any]:
    """The run's results (see the module doc) after ``runtime`` ran; ``trainers`` are the clients in
    order, each with ``rounds``, ``predictions(r, part)`` and ``data`` (``FedPATrainer`` or a view)."""
    f = cfg.fedpa
    out = runtime.run_dir
    if strategy.state():
        save_tensors(out / "adapters" / "server.safetensors", strategy.state())
    sel = pooled_selection(dict(enumerate(trainers)), select_by=f.select_by)
    up = list(runtime.bytes_up.values())
    return {
        "algorithm": f"fedpa:{f.algorithm}",
        "overall": sel["test"],
        "valid": sel["valid"],
        "best_round": sel["best_round"],
        "rounds": fed_rounds(cfg),
        "per_round": sel["rounds"],
        "clients": {},
        "imbalance": {},
        "select_by": f.select_by,
        "users": {"public": int(public.sum()), "private": len(split.private_users),
                  "left_out": [str(u) for u in ds.users["user_id"].to_numpy()[split.dropped_users]]},
        "pretrain": pre,
        "communication": {"bytes_up": int(sum(up)), "bytes_down": int(sum(runtime.bytes_down.values())),
                          "per_client_mean_up": float(np.mean(up)) if up else 0.0},
        "train_time_s": round(runtime.elapsed, 1),
        "samples": {"train": len(split.train_rows), "valid": len(split.valid_rows),
                    "test": len(split.test_rows)},
    }
