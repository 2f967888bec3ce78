"""The parts of a FedPA run (``model.backbone: ctr``), built from its config: the foundation model
(Open_Train: central pre-training on the public users; checkpoint ``foundation.safetensors``), the
federation's options, one client (``client_data``, ``client_parts``), the server's part
(``FedPAServer``) and the results. ``fellrec.run`` (embedded) and the Flower runtime run the rounds
(Fed_Train) from them; the data protocol is ``fellrec.pipeline.prepare_ctr``.

``overall`` holds the pooled test metrics (AUC, per-user GAUC, logloss, weighted precision,
recall, F1) at the best validation round; ``rounds`` the pooled validation and test metrics of
every round; ``communication`` the bytes the clients sent and received.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from fellrec.config import Config
from fellrec.data.tables import Dataset
from fellrec.fedpa.features import FeatureTable, UserSplit
from fellrec.fedpa.model import CTRModel, FedPAModel
from fellrec.fedpa.pretrain import load_pretrained, pretrain, save_pretrained
from fellrec.fedpa.trainer import client_data as every_user_data
from fellrec.fedpa.trainer import pooled_selection, user_trainer, variant_of
from fellrec.files import save_tensors
from fellrec.pipeline import prepare_ctr
from fellrec.results import record
from fellrec.strategies import Tensors, make_strategy
from fellrec.trainer import ClientParts


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


# ---- one client (a private user), as a runtime outside this process builds it ---------------------


def client_data(cfg: Config, client: str) -> dict:
    """What private user number ``client`` (in the order of ``pipeline.prepare_ctr``) keeps of the
    data: its interactions, attribute codes and what its model needs of the item table."""
    c = prepare_ctr(cfg, echo=False)
    ds, feats, split = c.dataset, c.features, c.split
    users = [int(u) for u in split.private_users]
    i = int(client)
    if not 0 <= i < len(users):
        raise ValueError(f"node config client-id={client}: this FedPA run has clients 0..{len(users) - 1} "
                         f"(one per private user)")
    u = users[i]
    groups = list(cfg.fedpa.group_attributes)
    return {"user": str(ds.users["user_id"].to_numpy()[u]), "num_clients": len(users), "dataset": ds.name,
            "clientdata": every_user_data(ds, feats, split)[u], "user_codes": np.array(feats.user_codes[u]),
            "item_codes": np.array(feats.item_codes), "cards": {a: len(feats.vocab[a]) for a in groups},
            "groups": {a: int(feats.user_codes[u, feats.user_field(a)]) for a in groups},
            "fields": [feats.user_fields, feats.item_fields, feats.user_cards, feats.item_cards, feats.item_widths]}


def client_parts(cfg: Config, client: str, data: dict, setup: Path | None, cache=None) -> ClientParts:
    """The user's ``FedPATrainer`` over the foundation model the server sent at setup (``setup``: the
    file the client keeps it in; None before the setup message)."""
    if setup is None:
        raise RuntimeError(f"client {client}: no foundation model yet (the server sends it in the setup query)")
    base, meta = load_pretrained(setup)
    c = meta["config"]
    have = [meta.get("user_fields"), meta.get("item_fields"), c["user_cards"], c["item_cards"], c["item_widths"]]
    if have != data["fields"]:
        raise ValueError("the foundation model the server sent was built for other features than this "
                         "client's dataset")
    opts = federation_options(cfg)
    algorithm = opts.pop("algorithm")
    variant, _ = variant_of(algorithm)
    fedpa_cfg = cfg.fedpa
    groups = data["cards"] if variant == "fedpa" else {}
    model = FedPAModel(base, torch.from_numpy(data["item_codes"]), group_cards=groups, rank=fedpa_cfg.rank,
                       alpha=fedpa_cfg.alpha, zero_init=fedpa_cfg.zero_init)
    initial = model.shared_initial(variant, cfg.seed)
    own_groups = {a: v for a, v in data["groups"].items() if a in groups}
    for k in ("group_attributes", "rank", "alpha", "zero_init", "weighting"):
        opts.pop(k)
    trainer = user_trainer(data["user"], model, data["clientdata"], torch.from_numpy(data["user_codes"]), algorithm,
                           initial, own_groups, **opts)
    d = data["clientdata"]
    info = {"name": data["user"], "num-clients": data["num_clients"], "dataset": data["dataset"],
            "groups": json.dumps(data["groups"])}
    counts = {"train": len(d.train_items), "valid": len(d.valid_items), "test": len(d.test_items),
              "steps-per-round": int(trainer.steps_per_round)}
    return ClientParts(trainer, initial, info, counts)


# ---- the server's part -----------------------------------------------------------------------------


SETUP_NEEDED = True  # a client is built from what the server sends at setup (the foundation model)


class FedPAServer:
    """What a FedPA server does besides the rounds: Open_Train on the public users (their data is the
    server's in FedPA), the foundation model for every client's setup, the strategy from the clients'
    group attributes, and the results from every client's predictions of every evaluated round."""

    setup_needed = True
    send_adapters = False

    def __init__(self, cfg: Config, out: Path):
        self.cfg = cfg
        c = prepare_ctr(cfg)
        self.ds, self.feats, self.public, self.split = c.dataset, c.features, c.public, c.split
        self.base, self.pre = foundation(cfg, self.ds, self.feats, self.split, out)

    def setup(self) -> tuple[Tensors, dict[str, str]]:
        """The setup query's tensors and config: the foundation model."""
        meta = json.dumps({"config": self.base.config, "user_fields": self.feats.user_fields,
                           "item_fields": self.feats.item_fields})
        return {k: v.detach() for k, v in self.base.state_dict().items()}, {"fedpa": meta}

    def names(self, info: dict[str, dict]) -> dict[str, str]:
        """fellrec client name (the user's id) -> client-id of its node, in the clients' order."""
        return {str(info[i]["name"]): i for i in sorted(info, key=int)}

    def strategy(self, initial: Tensors, info: dict[str, dict]):
        """The strategy over the users of ``info`` (keyed by user id, in order)."""
        fedpa_cfg = self.cfg.fedpa
        _, server = variant_of(self.cfg.train.algorithm)
        groups = {u: {a: int(x) for a, x in json.loads(str(v["groups"])).items()} for u, v in info.items()}
        return make_strategy(server, initial, list(info),
                             client_groups=groups if server == "fedpa" else {}, weighting=fedpa_cfg.weighting,
                             ldp_scale=fedpa_cfg.ldp_scale)

    def rounds(self) -> int:
        return fed_rounds(self.cfg)

    def eval_every(self) -> int:
        return max(1, self.cfg.eval.every)

    def results(self, tested: dict[str, dict], rounds_, strategy, info: dict[str, dict], **parts: Any):
        """(results, None): the pooled metrics of the best pooled validation round (no per-user file)."""
        views = [predictions_view(tested[u]["scores"]) for u in info]
        return fedpa_results(self.cfg, self.ds, self.public, self.split, self.pre, rounds_, strategy, views,
                             **parts), None


def predictions_view(scores: dict[str, np.ndarray]) -> SimpleNamespace:
    """What ``pooled_selection`` reads of a trainer, from what its ``test`` returned."""
    rounds = [int(r) for r in np.asarray(scores["rounds"]).reshape(-1)]
    stores = {part: np.asarray(scores[part], dtype=np.float32) for part in ("valid", "test") if part in scores}

    def predictions(rnd: int, part: str = "test") -> np.ndarray:
        return stores[part][rounds.index(rnd)]

    return SimpleNamespace(rounds=rounds, predictions=predictions,
                           data=SimpleNamespace(valid_labels=torch.as_tensor(scores["valid-labels"]),
                                                test_labels=torch.as_tensor(scores["test-labels"])))
