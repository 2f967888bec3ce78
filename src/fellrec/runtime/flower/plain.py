"""A client and a server over Flower, for every backbone (the LLM recommenders and FedPA): each
SuperNode trains, validates and tests its client as the embedded run does, and the ServerApp drives
the rounds.

Client (``ClientNode``): a SuperNode starts a fresh ClientApp process for every message, so each
message builds the client from the run's config (its data from ``data.pkl`` beside its state after
the first message; what the server sent at setup from ``setup.safetensors``), loads the trainer's
state from the client's disk, does its work and writes the state back before it replies
(``fellrec.runtime.flower.state``). What a client is made of comes from ``kind``:
``fellrec.build`` (the LLM backbones) or ``fellrec.fedpa.build`` (FedPA's users).

Server (``serve``): setup (every client's counts, names and initial tensors, checked equal), the
rounds, the test, and the same run folder as ``fellrec run``; ``task`` (``fellrec.build.RankingServer``
or ``fellrec.fedpa.build.FedPAServer``) gives what differs: the setup content, the strategy, the
results. Split mode gives its own clients (``make_clients``).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fellrec.config import Config, config_from_text
from fellrec.files import atomic, save_tensors
from fellrec.rundir import finish
from fellrec.runtime.flower.nodes import Nodes, setup
from fellrec.runtime.flower.records import (
    from_arrays,
    read_check,
    read_payload,
    read_test,
    test_content,
    to_arrays,
    update_content,
)
from fellrec.runtime.flower.runtime import FlowerClients
from fellrec.runtime.flower.state import CONFIG_KEY, ClientState, ProcessCache, run_key
from fellrec.runtime.rounds import Rounds

log = logging.getLogger("fellrec.flower")

SETUP = "setup.safetensors"
FIT, EVAL, TEST = 0, 1, 2  # the phases of a round, in order: a message starts from the state before its own


# ---- the client ---------------------------------------------------------------------------------


class ClientNode:
    """Client ``client`` of the run whose config is ``config_text``, with its state under ``root``;
    ``kind`` builds it (``client_data(cfg, client)``, ``client_parts(cfg, client, data, setup, cache)``)."""

    def __init__(self, config_text: str, client: str, root: Path, cache: ProcessCache, kind):
        cfg = config_from_text(config_text, f"run config {CONFIG_KEY}")
        self.cfg, self.client, self.cache, self.kind = cfg, client, cache, kind
        self.state = ClientState(root / run_key(config_text, cfg.name) / f"client-{client}")
        self.data = self._data()
        self.parts = None
        if (self.state.folder / SETUP).exists() or not getattr(kind, "SETUP_NEEDED", False):
            self._build()

    def _data(self) -> dict[str, Any]:
        path = self.state.folder / "data.pkl"
        if path.exists():
            with open(path, "rb") as fh:
                return pickle.load(fh)
        data = self.kind.client_data(self.cfg, self.client)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                pickle.dump(data, fh, protocol=pickle.HIGHEST_PROTOCOL)

        atomic(path, write)
        return data

    def _build(self) -> None:
        path = self.state.folder / SETUP
        self.parts = self.kind.client_parts(self.cfg, self.client, self.data, path if path.exists() else None,
                                            self.cache)
        tensors, meta = self.parts.trainer.state()
        self.fresh = ({k: v.clone() for k, v in tensors.items()}, dict(meta))  # the state before round 1

    @property
    def trainer(self):
        return self.parts.trainer

    @property
    def backbone(self):
        return self.parts.backbone

    @property
    def test_samples(self):
        return self.parts.test_samples

    def start(self, rnd: int, phase: int) -> None:
        """The trainer's state as it was before phase ``phase`` of round ``rnd``: a message delivered
        again after a crash starts from the same state and gives the same reply."""
        found = self.state.before(rnd, phase)
        tensors, meta = found if found is not None else self.fresh
        self.trainer.load_state({k: v.clone() for k, v in tensors.items()}, dict(meta))

    def done(self, rnd: int, phase: int) -> None:
        self.state.save_phase(rnd, phase, *self.trainer.state())

    def saved_caches(self) -> None:
        """Write what this message computed of the frozen blocks to the client's cache (the item-token
        backbone), so the next message, often a fresh process, starts with it."""
        save = getattr(self.backbone, "save_cache", None) if self.parts is not None else None
        if save is not None:
            save()

    # ---- handlers ------------------------------------------------------------------------------

    def setup(self, msg: Message) -> RecordDict:
        if "arrays" in msg.content:  # what the server sent for every client (FedPA: the foundation model)
            config = msg.content["config"] if "config" in msg.content else {}  # noqa: SIM401
            save_tensors(self.state.folder / SETUP, from_arrays(msg.content["arrays"]),
                         {str(k): str(v) for k, v in dict(config).items()})
            self._build()
        p = self.parts
        info = {"client-id": self.client, **p.info}
        return RecordDict({"arrays": to_arrays(p.initial), "info": ConfigRecord(info),
                           "metrics": MetricRecord(dict(p.counts))})

    def fit(self, msg: Message) -> RecordDict:
        rnd, payload = read_payload(msg)
        check = read_check(msg, payload)
        if check is not None:  # the previous round's validation came with this message: first, as it was due
            scores = self.validate(*check)
        self.start(rnd, FIT)
        update = self.trainer.fit(payload, rnd)
        self.done(rnd, FIT)
        content = update_content(self.client, update)
        if check is not None:
            content["validation"] = MetricRecord({k: float(v) for k, v in scores.items()})
        return content

    def evaluate(self, msg: Message) -> RecordDict:
        scores = self.validate(*read_payload(msg))
        return RecordDict({"metrics": MetricRecord({k: float(v) for k, v in scores.items()}),
                           "info": ConfigRecord({"client-id": self.client})})

    def validate(self, rnd: int, payload) -> dict[str, float]:
        self.start(rnd, EVAL)
        scores = self.trainer.evaluate(payload, rnd)
        self.done(rnd, EVAL)
        return scores

    def test(self, msg: Message) -> RecordDict:
        rounds = int(msg.content["config"]["round"])
        self.start(rounds, TEST)
        samples = self.test_samples
        scores = self.trainer.test(samples) if samples is None or len(samples) else {}
        return self.tested(scores, bool(msg.content["config"].get("send-adapter", True)))

    def tested(self, scores: dict, send_adapter: bool) -> RecordDict:
        """The test reply, after keeping the tested adapter on the client's disk."""
        t = self.trainer
        selected = t.selected()
        if selected:
            save_tensors(self.state.folder / "adapter.safetensors", selected)
        return test_content(self.client, scores, self.test_samples, t.best_round,
                            selected if send_adapter else None)


# ---- the server ---------------------------------------------------------------------------------

MakeClients = Callable[[Config, Nodes, dict, dict, dict], tuple[Any, dict, set]]


def flower_clients(cfg: Config, nodes: Nodes, info: dict, initial: dict, ids: dict[str, str]):
    """(the clients as the rounds see them, the whole initial adapter, the tensors kept on the server)."""
    return FlowerClients(nodes, list(ids), ids=ids), initial, set()


def serve(cfg: Config, run_config, out: Path, nodes: Nodes, started: float, task,
          make_clients: MakeClients = flower_clients) -> None:
    """The rounds, the test and the results of one run, into ``out``."""
    tensors, config = task.setup()
    content = (lambda: RecordDict({"arrays": to_arrays(tensors), "config": ConfigRecord(config)})) if tensors \
        else RecordDict
    info, initial = setup(nodes, float(run_config.get("wait-timeout", 300.0)), content)
    ids = task.names(info)  # fellrec client name -> client-id of its node, in the clients' order
    info = {name: info[i] for name, i in ids.items()}
    workers, initial, kept = make_clients(cfg, nodes, info, initial, ids)
    log.info("clients: %s", {c: info[c]["name"] for c in ids})
    strategy = task.strategy(initial, info)
    runtime = Rounds(strategy, workers, rounds=task.rounds(), client_fraction=cfg.train.client_fraction,
                     eval_every=task.eval_every(), seed=cfg.seed, run_dir=out, progress=False, kept_on_server=kept)
    runtime.run()
    tested = {c: read_test(content) for c, content in workers.test(task.rounds(), task.send_adapters).items()}
    results, test_users = task.results(tested, runtime, strategy, info,
                                       runtime={"kind": "flower", "messages_resent": nodes.resent,
                                                **workers.describe()})
    finish(out, started - runtime.restored_elapsed, results, test_users)
    log.info("run finished: %s", out)
