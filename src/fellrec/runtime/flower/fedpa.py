"""FedPA over Flower (``model.backbone: ctr``): one private user is one fellrec client.

    server    reads the dataset for its public users only: Open_Train on them (or the checkpoint
              ``fedpa.pretrain_path``), then sends the foundation model to every client in the
              setup query; the strategy (FedPA, FedAvg of an adapter, Local) is built from what
              the clients answer: their user id, their group attribute values, their initial
              shared tensors (checked equal)
    client    Flower client i is the i-th private user of the run (the order of
              ``fedpa.features.split_users``); it keeps its own interactions, the foundation it
              was sent, and, round-indexed on its disk, its private tensors (user embedding rows,
              user adapter) and its predictions of each evaluated round
    rounds    ``FlowerClients``, with the users' ids as fellrec client names
    test      every client sends its per-round validation and test predictions with their labels;
              the server pools them and reports the test metrics of the best pooled validation
              round, as ``fellrec run`` does

The same run embedded and over Flower gives the same numbers (tests/runtime/flower/test_flower.py).
A private user is a SuperNode, so a deployment has one SuperNode per private user; the simulation
engine runs as many virtual ones as the run has private users (``fedpa.public_fraction`` and
``fedpa.min_interactions`` set how many that is).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fellrec.config import config_from_text, dump
from fellrec.fedpa.build import fed_rounds, federation_options, fedpa_results, foundation
from fellrec.fedpa.model import FedPAModel
from fellrec.fedpa.pretrain import load_pretrained
from fellrec.fedpa.trainer import client_data, user_trainer, variant_of
from fellrec.files import atomic, save_tensors
from fellrec.pipeline import prepare_ctr
from fellrec.rundir import finish
from fellrec.runtime.flower.nodes import setup
from fellrec.runtime.flower.records import from_arrays, read_payload, to_arrays, update_content
from fellrec.runtime.flower.runtime import FlowerClients
from fellrec.runtime.flower.state import CONFIG_KEY, ClientState, ProcessCache, run_key
from fellrec.runtime.rounds import Rounds
from fellrec.strategies import make_strategy

FOUNDATION = "foundation.safetensors"


def world(cfg, cache: ProcessCache | None = None) -> tuple:
    """(dataset, features, public users, user split, every private user's ClientData) of the run,
    kept in ``cache`` (Flower's simulation serves many clients from one process)."""

    def build() -> tuple:
        c = prepare_ctr(cfg)
        return c.dataset, c.features, c.public, c.split, client_data(c.dataset, c.features, c.split)

    return build() if cache is None else cache.get("fedpa-world", dump(cfg), build)


# ---- the client -----------------------------------------------------------------------------------


class FedPANode:
    """Private user ``client`` (an index) of the FedPA run whose config is ``config_text``.

    Its own data (interactions, attribute codes, what its model needs of the item table) is taken
    from the dataset once and kept in ``data.pkl``; the foundation model arrives with the setup
    query and is kept in ``foundation.safetensors``; both beside its state.
    """

    def __init__(self, config_text: str, client: str, root: Path, cache: ProcessCache):
        self.cache = cache
        self.cfg = config_from_text(config_text, f"run config {CONFIG_KEY}")
        self.text, self.client = config_text, client
        self.state = ClientState(root / run_key(config_text, self.cfg.name) / f"client-{client}")
        self.data = self._data()
        self.trainer = None
        if (self.state.folder / FOUNDATION).exists():
            self._build()

    def _data(self) -> dict[str, Any]:
        import pickle

        path = self.state.folder / "data.pkl"
        if path.exists():
            with open(path, "rb") as fh:
                return pickle.load(fh)
        ds, feats, _, split, per_user = world(self.cfg, self.cache)
        users = [int(u) for u in split.private_users]
        i = int(self.client)
        if not 0 <= i < len(users):
            raise ValueError(f"node config client-id={self.client}: this FedPA run has clients 0..{len(users) - 1} "
                             f"(one per private user)")
        u = users[i]
        groups = list(self.cfg.fedpa.group_attributes)
        data = {"user": str(ds.users["user_id"].to_numpy()[u]), "num_clients": len(users), "dataset": ds.name,
                "clientdata": per_user[u], "user_codes": np.array(feats.user_codes[u]),
                "item_codes": np.array(feats.item_codes), "cards": {a: len(feats.vocab[a]) for a in groups},
                "groups": {a: int(feats.user_codes[u, feats.user_field(a)]) for a in groups},
                "fields": [feats.user_fields, feats.item_fields, feats.user_cards, feats.item_cards,
                           feats.item_widths]}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                pickle.dump(data, fh, protocol=pickle.HIGHEST_PROTOCOL)

        atomic(path, write)
        return data

    def _build(self) -> None:
        base, meta = load_pretrained(self.state.folder / FOUNDATION)
        c = meta["config"]
        have = [meta.get("user_fields"), meta.get("item_fields"), c["user_cards"], c["item_cards"], c["item_widths"]]
        if have != self.data["fields"]:
            raise ValueError("the foundation model the server sent was built for other features than this "
                             "client's dataset")
        opts = federation_options(self.cfg)
        algorithm = opts.pop("algorithm")
        variant, _ = variant_of(algorithm)
        f = self.cfg.fedpa
        d = self.data
        groups = d["cards"] if variant == "fedpa" else {}
        model = FedPAModel(base, torch.from_numpy(d["item_codes"]), group_cards=groups, rank=f.rank, alpha=f.alpha,
                           zero_init=f.zero_init)
        self.initial = model.shared_initial(variant, self.cfg.seed)
        own_groups = {a: v for a, v in d["groups"].items() if a in groups}
        for k in ("group_attributes", "rank", "alpha", "zero_init", "weighting"):
            opts.pop(k)
        self.trainer = user_trainer(d["user"], model, d["clientdata"], torch.from_numpy(d["user_codes"]), algorithm,
                                    self.initial, own_groups, **opts)

    # ---- state: private tensors after training, predictions after evaluating ---------------------

    def load(self, own_at_most: int, preds_at_most: int) -> None:
        """The private tensors of the newest training ≤ ``own_at_most`` and the predictions (and
        best round) of the newest evaluation ≤ ``preds_at_most``."""
        t = self.trainer
        t.own = None  # none yet: made from the foundation's rows and the client's seed on first use
        fit = self.state.latest("fit", own_at_most)
        if fit:
            t.load_state({"own": fit[0]["own"]}, {**fit[1], "rounds": []})
        t.rounds, t.valid_preds, t.test_preds, t.best_round, t.best_score = [], [], [], 0, None
        ev = self.state.latest("eval", preds_at_most)
        if ev:
            tensors, meta = ev
            t.rounds = list(meta["rounds"])
            if t.rounds:
                t.valid_preds, t.test_preds = list(tensors["valid"].numpy()), list(tensors["test"].numpy())
            t.best_round, t.best_score = meta["best_round"], meta["best_score"]

    def saved_caches(self) -> None:
        """Nothing to keep beyond the state files (see ``plain.ClientNode.saved_caches``)."""

    def save(self, kind: str, rnd: int) -> None:
        tensors, meta = self.trainer.state()
        self.state.save(kind, rnd, tensors, meta)

    # ---- handlers ------------------------------------------------------------------------------

    def setup(self, msg: Message) -> RecordDict:
        meta = str(msg.content["config"]["fedpa"])
        save_tensors(self.state.folder / FOUNDATION, from_arrays(msg.content["arrays"]), {"fedpa": meta})
        self._build()
        t, d = self.trainer, self.data
        info = {"client-id": self.client, "name": d["user"], "num-clients": d["num_clients"], "dataset": d["dataset"],
                "groups": json.dumps(d["groups"])}
        counts = {"train": len(d["clientdata"].train_items), "valid": len(d["clientdata"].valid_items),
                  "test": len(d["clientdata"].test_items), "steps-per-round": int(t.steps_per_round)}
        return RecordDict({"arrays": to_arrays(self.initial), "info": ConfigRecord(info),
                           "metrics": MetricRecord(counts)})

    def fit(self, msg: Message) -> RecordDict:
        rnd, payload = read_payload(msg)
        self.load(rnd - 1, rnd - 1)
        update = self.trainer.fit(payload, rnd)
        self.save("fit", rnd)
        return update_content(self.client, update)

    def evaluate(self, msg: Message) -> RecordDict:
        rnd, payload = read_payload(msg)
        self.load(rnd, rnd - 1)
        scores = self.trainer.evaluate(payload, rnd)
        self.save("eval", rnd)
        return RecordDict({"metrics": MetricRecord({k: float(v) for k, v in scores.items()}),
                           "info": ConfigRecord({"client-id": self.client})})

    def test(self, msg: Message) -> RecordDict:
        rounds = int(msg.content["config"]["round"])
        self.load(rounds, rounds)
        t = self.trainer
        d = t.data
        arrays = {"valid-labels": d.valid_labels, "test-labels": d.test_labels}
        if t.rounds:
            arrays["valid"] = torch.from_numpy(np.stack(t.valid_preds))
            arrays["test"] = torch.from_numpy(np.stack(t.test_preds))
        return RecordDict({"scores": to_arrays(arrays), "info": ConfigRecord({"client-id": self.client}),
                           "config": ConfigRecord({"rounds": json.dumps(t.rounds)}),
                           "metrics": MetricRecord({"best-round": int(t.best_round)})})


# ---- the server -----------------------------------------------------------------------------------


def predictions_view(content: RecordDict) -> SimpleNamespace:
    """What ``pooled_selection`` reads of a trainer, from a client's test reply."""
    arrays = from_arrays(content["scores"])
    rounds = json.loads(str(content["config"]["rounds"]))
    stores = {part: arrays[part].numpy() for part in ("valid", "test") if part in arrays}

    def predictions(rnd: int, part: str = "test") -> np.ndarray:
        return stores[part][rounds.index(rnd)]

    return SimpleNamespace(rounds=rounds, predictions=predictions,
                           data=SimpleNamespace(valid_labels=arrays["valid-labels"], test_labels=arrays["test-labels"]))


def serve(cfg, run_config, out: Path, nodes, started: float) -> None:
    """The ServerApp of a FedPA run (see the module doc); writes the run into ``out``."""
    fedpa_cfg = cfg.fedpa
    c = prepare_ctr(cfg)
    ds, feats, public, split = c.dataset, c.features, c.public, c.split
    base, pre = foundation(cfg, ds, feats, split, out)  # Open_Train: the public users' data is the server's
    meta = json.dumps({"config": base.config, "user_fields": feats.user_fields, "item_fields": feats.item_fields})
    state = {k: v.detach() for k, v in base.state_dict().items()}
    info, initial = setup(nodes, float(run_config.get("wait-timeout", 300.0)),
                          lambda: RecordDict({"arrays": to_arrays(state), "config": ConfigRecord({"fedpa": meta})}))
    index = sorted(info, key=int)
    users = [str(info[i]["name"]) for i in index]
    groups = {str(info[i]["name"]): {a: int(v) for a, v in json.loads(str(info[i]["groups"])).items()} for i in index}
    _, server = variant_of(cfg.train.algorithm)
    strategy = make_strategy(server, initial, users, client_groups=groups if server == "fedpa" else {},
                             weighting=fedpa_cfg.weighting, ldp_scale=fedpa_cfg.ldp_scale)
    clients = FlowerClients(nodes, users, ids=dict(zip(users, index, strict=True)))
    runtime = Rounds(strategy, clients, rounds=fed_rounds(cfg), client_fraction=cfg.train.client_fraction,
                     eval_every=max(1, cfg.eval.every), seed=cfg.seed, run_dir=out, progress=False)
    runtime.run()
    tested = clients.test(fed_rounds(cfg), False)
    views = [predictions_view(tested[u]) for u in users]
    results = fedpa_results(cfg, ds, public, split, pre, runtime, strategy, views,
                            runtime={"kind": "flower", "messages_resent": nodes.resent})
    finish(out, started - runtime.restored_elapsed, results)
