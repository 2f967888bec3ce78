"""Plain mode over Flower: each SuperNode trains, validates and tests its client's adapter as the
embedded runtime's ``AdapterTrainer`` does, and the ServerApp drives the rounds.

Client: a SuperNode starts a fresh ClientApp process for every message, so each message builds the
client from the run's config (its data from ``data.pkl`` beside its state after the first message,
the base model with a fresh LoRA adapter, its ``AdapterTrainer``), loads the client's private state
from its disk (``fellrec.runtime.flower.state``), does its work and writes the state back before it
replies: ``fit-<r>`` (its private adapter after training in round r), ``eval-<r>`` (its best
validated adapter, score and round), ``adapter.safetensors`` (the adapter its test used).

Server: setup (every client's counts, names and initial adapter, checked equal), the rounds, the
test, and the same run folder as ``fellrec run`` (``serve``).
"""

from __future__ import annotations

import gc
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fellrec.build import (
    build_backbone,
    catalogue,
    client_samples,
    pick_test,
    private_names,
    protocol_warnings,
    selection_metric,
    trainer_options,
)
from fellrec.config import Config, config_from_text, to_dict
from fellrec.files import atomic, save_tensors
from fellrec.pipeline import prepare
from fellrec.results import ranking_summary, record, rounds
from fellrec.rundir import finish
from fellrec.runtime.flower.nodes import Nodes, setup
from fellrec.runtime.flower.records import (
    from_arrays,
    read_payload,
    read_scores,
    scores_content,
    to_arrays,
    update_content,
)
from fellrec.runtime.flower.runtime import FlowerClients
from fellrec.runtime.flower.state import CONFIG_KEY, ClientState, ProcessCache, run_key
from fellrec.runtime.rounds import Rounds
from fellrec.storage.replay import ReplayTransport
from fellrec.strategies import make_strategy
from fellrec.trainer import AdapterTrainer, read_full

log = logging.getLogger("fellrec.flower")


# ---- the client ---------------------------------------------------------------------------------


class ClientNode:
    """Client ``client`` of the run whose config is ``config_text``, built as the embedded runtime
    builds it, with its state under ``root``."""

    def __init__(self, config_text: str, client: str, root: Path, cache: ProcessCache):
        cfg = config_from_text(config_text, f"run config {CONFIG_KEY}")
        self.cfg, self.client = cfg, client
        self.state = ClientState(root / run_key(config_text, cfg.name) / f"client-{client}")
        self.data = self._data()
        self.split = cfg.storage.k is not None
        self.backbone, self.initial = cache.get("backbone", config_text, lambda: _backbone(cfg, self.data))
        self.trainer = AdapterTrainer(client, self.backbone, self.data["train"], self.data["valid"],
                                      **trainer_options(cfg, self.initial, private_names(cfg, self.backbone)))
        self.test_samples = self.data["test"]

    def _data(self) -> dict[str, Any]:
        path = self.state.folder / "data.pkl"
        if path.exists():
            with open(path, "rb") as fh:
                return pickle.load(fh)
        p = prepare(self.cfg, progress=False)
        samples = client_samples(p)
        if self.client not in samples:
            raise ValueError(f"node config client-id={self.client}: this run has clients 0..{len(samples) - 1}")
        test = pick_test(p)
        titles, dataset = catalogue(p)
        data = {"train": samples[self.client][0], "valid": samples[self.client][1],
                "test": test.take(np.flatnonzero(p.client_of(test.user) == int(self.client))),
                "titles": titles, "dataset": dataset, "name": str(p.partition.names[int(self.client)]),
                "num_clients": int(p.num_clients)}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                pickle.dump(data, fh, protocol=pickle.HIGHEST_PROTOCOL)

        atomic(path, write)
        return data

    def load(self, private_at_most: int, best_at_most: int) -> None:
        """The state a round starts from: the private adapter of the newest training ≤ ``private_at_most``
        and the best adapter of the newest validation ≤ ``best_at_most``."""
        t = self.trainer
        found = self.state.latest("fit", private_at_most)
        t.private = found[0] if found else {k: v.clone() for k, v in self.initial.items()}
        found = self.state.latest("eval", best_at_most)
        if found:
            t.best, t.best_score, t.best_round = found[0], found[1]["best_score"], found[1]["best_round"]
        else:
            t.best, t.best_score, t.best_round = {k: v.clone() for k, v in self.initial.items()}, None, 0

    def saved_caches(self) -> None:
        """Write what this message computed of the frozen blocks to the client's cache (the item-token
        backbone), so the next message, often a fresh process, starts with it."""
        save = getattr(self.backbone, "save_cache", None)
        if save is not None:
            save()

    # ---- handlers ------------------------------------------------------------------------------

    def setup(self, msg: Message) -> RecordDict:
        t, d = self.trainer, self.data
        info = {"client-id": self.client, "name": d["name"], "num-clients": d["num_clients"], "dataset": d["dataset"]}
        counts = {"train": len(t.train), "valid": len(t.valid), "test": len(self.test_samples),
                  "steps-per-round": int(t.steps_per_round)}
        if self.split:  # the server builds the base model too: the tiny test model's tokenizer needs the titles
            info["titles"] = list(d["titles"])
        shared = {k: v for k, v in self.initial.items() if k not in t.kept}  # as the server starts
        return RecordDict({"arrays": to_arrays(shared), "info": ConfigRecord(info),
                           "metrics": MetricRecord(counts)})

    def fit(self, msg: Message) -> RecordDict:
        rnd, payload = read_payload(msg)
        self.load(rnd - 1, rnd - 1)
        update = self.trainer.fit(payload, rnd)
        self.state.save("fit", rnd, self.trainer.private)
        return update_content(self.client, update)

    def evaluate(self, msg: Message) -> RecordDict:
        rnd, payload = read_payload(msg)
        self.load(rnd, rnd - 1)
        scores = self.trainer.evaluate(payload, rnd)
        t = self.trainer
        self.state.save("eval", rnd, t.best, {"best_score": t.best_score, "best_round": t.best_round})
        return RecordDict({"metrics": MetricRecord({k: float(v) for k, v in scores.items()}),
                           "info": ConfigRecord({"client-id": self.client})})

    def test(self, msg: Message) -> RecordDict:
        rounds_ = int(msg.content["config"]["round"])
        self.load(rounds_, rounds_)
        return self.tested(self.trainer.test(self.test_samples) if len(self.test_samples) else {},
                           bool(msg.content["config"].get("send-adapter", True)))

    def tested(self, scores: dict, send_adapter: bool) -> RecordDict:
        """The test reply, after keeping the tested adapter on the client's disk."""
        t = self.trainer
        save_tensors(self.state.folder / "adapter.safetensors", t.best)
        shared = {k: v for k, v in t.best.items() if k not in t.kept} if send_adapter else None
        return scores_content(self.client, scores, self.test_samples, t.best_round, shared)


def _backbone(cfg: Config, data: dict[str, Any]) -> tuple[Any, dict]:
    """The run's backbone and its initial adapter; in split mode only the client's part of the model
    (the trunk is the ServerApp's)."""
    backbone = build_backbone(cfg, data["titles"], data["dataset"])
    if cfg.storage.k is not None:
        keep_client_half(backbone)
    return backbone, read_full(backbone.model)


def keep_client_half(backbone) -> None:
    """Replace the backbone's whole split model by the client's half (talking to the trunk through
    message replays, ``fellrec.storage.replay``), so that no trunk weight is left in this process."""
    backbone.model = backbone.model.client_half(ReplayTransport())
    gc.collect()


# ---- the server ---------------------------------------------------------------------------------

MakeClients = Callable[[Config, Nodes, dict, dict, list], tuple[Any, dict, set]]


def flower_clients(cfg: Config, nodes: Nodes, info: dict, initial: dict, clients: list[str]):
    """(the clients as the rounds see them, the whole initial adapter, the tensors kept on the server)."""
    return FlowerClients(nodes, clients), initial, set()


def serve(cfg: Config, run_config, out: Path, nodes: Nodes, started: float,
          make_clients: MakeClients = flower_clients) -> None:
    """The rounds, the test and the results of one run, into ``out`` (split mode gives its own
    ``make_clients``)."""
    training, evaluation = cfg.train, cfg.eval
    info, initial = setup(nodes, float(run_config.get("wait-timeout", 300.0)))
    clients = sorted(info, key=int)
    workers, initial, kept = make_clients(cfg, nodes, info, initial, clients)
    log.info("clients: %s", {c: info[c]["name"] for c in clients})
    strategy = make_strategy(training.algorithm, initial, clients, prox_mu=training.prox_mu, **to_dict(cfg)["fellrec"])
    runtime = Rounds(strategy, workers, rounds=training.rounds, client_fraction=training.client_fraction,
                     eval_every=evaluation.every, seed=cfg.seed, run_dir=out, progress=False, kept_on_server=kept)
    runtime.run()

    tested = workers.test(training.rounds, bool(run_config.get("collect-adapters", True)))
    per_user: dict[str, list[np.ndarray]] = {}
    client_of, users, best_round = [], [], {}
    for c in clients:
        scores, mine = read_scores(tested[c])
        for k, v in scores.items():
            per_user.setdefault(k, []).append(v)
        client_of.append(np.full(len(mine), int(c)))
        users.append(mine)
        best_round[c] = int(tested[c]["metrics"]["best-round"])
        if "arrays" in tested[c]:
            save_tensors(out / "adapters" / f"client-{c}.safetensors", from_arrays(tested[c]["arrays"]))
    if strategy.global_tensors() is not None:
        save_tensors(out / "adapters" / "global.safetensors", strategy.global_tensors())
    per_user = {k: np.concatenate(v) for k, v in per_user.items()}
    client_of_, users_ = np.concatenate(client_of), np.concatenate(users)
    results = record(
        cfg, dataset=info[clients[0]]["dataset"], summary=ranking_summary(per_user, client_of_),
        client_names={c: info[c]["name"] for c in clients},
        warnings=protocol_warnings([info[c]["name"] for c in clients], [info[c]["valid"] for c in clients],
                                   [info[c]["test"] for c in clients], cfg.split.method),
        **rounds(runtime, cfg, select_by=selection_metric(cfg),
                 steps_per_round={c: info[c]["steps-per-round"] for c in clients}, best_round=best_round,
                 samples={k: sum(info[c][k] for c in clients) for k in ("train", "valid", "test")}),
        runtime={"kind": "flower", "messages_resent": nodes.resent, **workers.describe()})
    finish(out, started - runtime.restored_elapsed, results, (per_user, client_of_, users_))
    log.info("run finished: %s", out)
