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
from fellrec.fedpa.features import FeatureTable, UserSplit
from fellrec.fedpa.model import CTRModel
from fellrec.fedpa.pretrain import load_pretrained, pretrain, save_pretrained
from fellrec.fedpa.trainer import pooled_selection
from fellrec.files import save_tensors
from fellrec.results import record


def foundation(cfg: Config, ds: Dataset, feats: FeatureTable, split: UserSplit, out: Path) -> tuple[CTRModel, dict]:
    """Open_Train on the public users (saved as ``out/foundation.safetensors``), or the checkpoint
    ``fedpa.pretrain_path``; the model and what to report of its training."""
    fedpa_cfg = cfg.fedpa
    started = time.time()
    if fedpa_cfg.pretrain_path:
        base, _ = load_pretrained(Path(fedpa_cfg.pretrain_path), feats)
        pre: dict[str, Any] = {"loaded": fedpa_cfg.pretrain_path}
    else:
        users, items = ds.interactions["user"].to_numpy(), ds.interactions["item"].to_numpy()
        res = pretrain(feats, users, items, split.public_rows, epochs=fedpa_cfg.pretrain_epochs, dim=fedpa_cfg.dim,
                       hidden=tuple(fedpa_cfg.hidden), lr=fedpa_cfg.pretrain_lr, seed=cfg.seed)
        save_pretrained(out / "foundation.safetensors", res.model, feats)
        base = res.model
        pre = {"epochs": fedpa_cfg.pretrain_epochs, "kept_epoch": res.epoch, "history": res.history}
    pre["time_s"] = round(time.time() - started, 1)
    return base, pre


def federation_options(cfg: Config) -> dict[str, Any]:
    """``build_federation``'s settings from the config."""
    fedpa_cfg, training = cfg.fedpa, cfg.train
    return {"algorithm": training.algorithm, "group_attributes": tuple(fedpa_cfg.group_attributes),
            "rank": fedpa_cfg.rank, "alpha": fedpa_cfg.alpha, "zero_init": fedpa_cfg.zero_init, "lr": training.lr,
            "batch_size": training.batch_size,
            "local_epochs": training.local_epochs, "ldp_scale": fedpa_cfg.ldp_scale, "weighting": fedpa_cfg.weighting,
            "select_by": "logloss", "seed": cfg.seed}


def fed_rounds(cfg: Config) -> int:
    return 0 if cfg.train.algorithm == "frozen" else cfg.train.rounds


def fedpa_results(cfg: Config, ds: Dataset, public: np.ndarray, split: UserSplit, pre: dict, rounds_,
                  strategy, trainers: list, **parts: Any) -> dict[str, Any]:
    """The run's results (``fellrec.results``, task ``ctr``) after the rounds ``rounds_`` ran; ``trainers`` are the
    clients in order, each with ``rounds``, ``predictions(r, part)`` and ``data`` (``FedPATrainer`` or a
    view); ``parts`` are added as they are."""
    out = rounds_.run_dir
    if strategy.state():
        save_tensors(out / "adapters" / "server.safetensors", strategy.state())
    sel = pooled_selection(dict(enumerate(trainers)), select_by=cfg.eval.select_by)
    up = list(rounds_.bytes_up.values())
    summary = {"overall": sel["test"], "clients": {}, "imbalance": {}, "intervals": {}}
    return record(
        cfg, dataset=ds.name, summary=summary, task="ctr",
        valid=sel["valid"],
        best_round=sel["best_round"],
        rounds=fed_rounds(cfg),
        per_round=sel["rounds"],
        select_by=cfg.eval.select_by,
        users={"public": int(public.sum()), "private": len(split.private_users),
               "left_out": [str(u) for u in ds.users["user_id"].to_numpy()[split.dropped_users]]},
        pretrain=pre,
        communication={"bytes_up": int(sum(up)), "bytes_down": int(sum(rounds_.bytes_down.values())),
                       "per_client_mean_up": float(np.mean(up)) if up else 0.0},
        train_time_s=round(rounds_.elapsed, 1),
        samples={"train": len(split.train_rows), "valid": len(split.valid_rows), "test": len(split.test_rows)},
        **parts)
