"""The server side of a Flower run: the ServerApp's main loop.

    setup     every SuperNode answers a ``query`` with its client id, name, sample counts and its
              initial adapter (all must be equal: they were built from the same config and seed)
    rounds    FlowerRuntime = EmbeddedRuntime with fit_clients/evaluate_clients sent as Flower
              messages: one message per client, each with its own payload (personalised strategies
              give each client a different adapter), all in flight at once
    test      each client tests its selected adapter on its own users and sends the per-user
              metrics (and, unless told not to, the adapter)
    files     the same run directory as ``fellrec run``: config.yaml, metrics.jsonl, results.json,
              adapters/, report.md, plots/ (written on the SuperLink's machine, under ``run-dir``)

The server holds no data and, unless in split mode, no model: what it knows of the clients comes
from their replies. In split mode (``storage.k``) it builds the base model and keeps the trunk, and
every client exchange goes through it (``fellrec.runtime.flower.split``). FedPA
(``model.backbone: ctr``) has its own setup and test (``fellrec.runtime.flower.fedpa``): its server
pre-trains the foundation model on the public users' data, which is the server's in FedPA.
A client is its ``client-id``, never a Flower node id: a restarted SuperNode gets a new node id, so
``Nodes`` asks every node it has not seen yet who it is (``query.whoami``), and a message whose node
went away (error NODE_UNAVAILABLE) is sent again to the node that now holds that client. A client
whose ClientApp raised fails the run with the client's error.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fellrec.runtime.embedded import EmbeddedRuntime
from fellrec.runtime.flower.records import client_id_of, from_arrays, payload_content, read_update
from fellrec.strategies import ClientUpdate, Payload

log = logging.getLogger("fellrec.flower")

NODE_UNAVAILABLE = 5  # flwr ErrorCode: the SuperLink lost the node (crashed, stopped)
MESSAGE_UNAVAILABLE = 3


class ClientFailed(RuntimeError):
    """A client's ClientApp raised, or the client did not answer in time."""


class Nodes:
    """Which Flower node holds which fellrec client, and message exchange that survives restarts."""

    def __init__(self, grid, *, timeout_s: float = 3600.0, poll_s: float = 0.5, retries: int = 3):
        self.grid = grid
        self.timeout_s, self.poll_s, self.retries = timeout_s, poll_s, retries
        self.node_of: dict[str, int] = {}
        self.asked: set[int] = set()  # nodes whose client id we know or asked for
        self.pending_whoami: dict[str, int] = {}  # message id -> node
        self.resent = 0  # messages sent again because their node went away

    # ---- who is who ----------------------------------------------------------------------------

    def refresh(self) -> None:
        """Ask nodes we have not seen who they are; collect the answers that have come."""
        live = set(self.grid.get_node_ids())
        new = sorted(live - self.asked)
        if new:
            msgs = [Message(RecordDict({"info": ConfigRecord({})}), dst_node_id=n, message_type="query.whoami")
                    for n in new]
            for mid, n in zip(self.grid.push_messages(msgs), new, strict=True):
                self.pending_whoami[mid] = n
            self.asked.update(new)
        if self.pending_whoami:
            for rep in self.grid.pull_messages(list(self.pending_whoami)):
                node = self.pending_whoami.pop(rep.metadata.reply_to_message_id)
                if rep.has_error():
                    self.asked.discard(node)  # ask again if it is still there
                    continue
                client = client_id_of(rep)
                old = self.node_of.get(client)
                if old is not None and old != node and old in live:
                    log.warning("client %s now answers from node %s (was node %s)", client, node, old)
                self.node_of[client] = node

    def wait_for(self, clients: list[str] | None, minimum: int, timeout_s: float) -> None:
        """Until every client of ``clients`` (or at least ``minimum`` clients) has a node."""
        end = time.monotonic() + timeout_s
        while True:
            self.refresh()
            have = set(self.node_of)
            if (clients is None and len(have) >= minimum) or (clients is not None and set(clients) <= have):
                return
            if time.monotonic() > end:
                missing = sorted(set(clients) - have, key=int) if clients else f"{minimum - len(have)} more"
                raise ClientFailed(f"no SuperNode for client(s) {missing} within {timeout_s:.0f} s (connected: "
                                   f"{sorted(have, key=int)}); start them with --node-config 'client-id=N'")
            time.sleep(self.poll_s)

    # ---- exchange ------------------------------------------------------------------------------

    def exchange(self, message_type: str, contents: dict[str, Callable[[], RecordDict]],
                 group: str = "") -> dict[str, Message]:
        """Send each client its content and return each client's reply.

        ``contents`` maps a client to a function that builds its message content (a fresh
        RecordDict each time, as a message may have to be sent again to another node).
        """
        pending = dict(contents)
        where: dict[str, int] = {}  # client -> node its newest message went to
        sent: dict[str, tuple[str, int]] = {}  # message id -> (client, node)
        tries: dict[str, int] = dict.fromkeys(contents, 0)
        replies: dict[str, Message] = {}
        end = time.monotonic() + self.timeout_s
        while pending:
            self.refresh()
            out, targets = [], []
            for client in pending:
                node = self.node_of.get(client)
                if node is None or where.get(client) == node:
                    continue
                if tries[client] > self.retries:
                    raise ClientFailed(f"{message_type} for client {client}: sent {tries[client]} times, its "
                                       "node went away every time")
                if tries[client]:
                    self.resent += 1
                    log.warning("%s: sending client %s's message again, to node %s", message_type, client, node)
                tries[client] += 1
                out.append(Message(pending[client](), dst_node_id=node, message_type=message_type, group_id=group))
                targets.append((client, node))
            if out:
                for mid, (client, node) in zip(self.grid.push_messages(out), targets, strict=True):
                    sent[mid] = (client, node)
                    where[client] = node
            waiting = [mid for mid, (client, _) in sent.items() if client in pending]
            for rep in self.grid.pull_messages(waiting) if waiting else []:
                client, node = sent.pop(rep.metadata.reply_to_message_id)
                if client not in pending or where.get(client) != node:
                    continue  # the answer of a node the client has left
                if rep.has_error():
                    if rep.error.code in (NODE_UNAVAILABLE, MESSAGE_UNAVAILABLE):
                        log.warning("%s: node %s of client %s went away (%s)", message_type, node, client,
                                    rep.error.reason)
                        if self.node_of.get(client) == node:
                            del self.node_of[client]
                        self.asked.discard(node)
                        where.pop(client, None)
                        continue
                    raise ClientFailed(f"{message_type} on client {client} (node {node}) failed: {rep.error.reason}")
                replies[client] = rep
                del pending[client]
            if not pending:
                break
            if time.monotonic() > end:
                raise ClientFailed(f"{message_type}: no answer from client(s) {sorted(pending, key=int)} within "
                                   f"{self.timeout_s:.0f} s (raise round-timeout for slow clients)")
            time.sleep(self.poll_s)
        return replies


class FlowerRuntime(EmbeddedRuntime):
    """The embedded runtime, with the clients' work done by SuperNodes through ``nodes``.

    Rounds, client sampling, aggregation, bytes, the metrics log and the checkpoint are the
    embedded runtime's. The checkpoint holds the strategy's state only: each client's private state
    is on the client's disk (see ``fellrec.runtime.flower.client``).
    """

    def __init__(self, strategy, nodes: Nodes, clients: list[str], ids: dict[str, str] | None = None,
                 **options: Any):
        super().__init__(strategy, dict.fromkeys(clients), dict.fromkeys(clients), **options)
        self.nodes = nodes
        self.ids = ids or {c: c for c in clients}  # fellrec client name -> client-id of its node (FedPA: user ids)

    def _exchange(self, message_type: str, contents: dict[str, Callable[[], RecordDict]],
                  group: str) -> dict[str, Message]:
        replies = self.nodes.exchange(message_type, {self.ids[c]: f for c, f in contents.items()}, group=group)
        return {c: replies[self.ids[c]] for c in contents}

    def fit_clients(self, rnd: int, payloads: dict[str, Payload]) -> dict[str, ClientUpdate]:
        contents = {c: (lambda p=p: payload_content(rnd, p)) for c, p in payloads.items()}
        replies = self._exchange("train", contents, group=f"fit-{rnd}")
        return {c: read_update(c, replies[c]) for c in payloads}

    def evaluate_clients(self, rnd: int, payloads: dict[str, Payload]) -> dict[str, dict[str, float]]:
        contents = {c: (lambda p=p: payload_content(rnd, p)) for c, p in payloads.items()}
        replies = self._exchange("evaluate", contents, group=f"evaluate-{rnd}")
        return {c: {k: float(v) for k, v in replies[c].content["metrics"].items()} for c in payloads}

    def test_clients(self, rounds: int, send_adapter: bool) -> dict[str, Any]:
        """Each client's test content: per-user ``scores``, ``metrics`` (its best round) and, if asked,
        its selected adapter (``arrays``)."""
        replies = self._exchange("evaluate.test", {
            c: (lambda: RecordDict({"config": ConfigRecord({"round": rounds, "send-adapter": send_adapter})}))
            for c in self.trainers}, group="test")
        return {c: replies[c].content for c in self.trainers}

    def _stateful(self) -> dict[str, Any]:
        return {}  # the clients keep their own state


def setup(nodes: Nodes, wait_s: float, content: Callable[[], RecordDict] = RecordDict) -> tuple[dict[str, dict], dict]:
    """Every client's info and counts, and the initial adapter (checked equal across clients).
    ``content`` builds the setup query's content (FedPA: the foundation model)."""
    nodes.wait_for(None, 1, wait_s)
    first = nodes.exchange("query", {c: content for c in list(nodes.node_of)[:1]}, group="setup")
    expected = int(next(iter(first.values())).content["info"]["num-clients"])
    clients = [str(c) for c in range(expected)]
    nodes.wait_for(clients, expected, wait_s)
    replies = {**first, **nodes.exchange("query", {c: content for c in clients if c not in first}, "setup")}
    info, initial = {}, None
    for c in clients:
        content = replies[c].content
        info[c] = {**dict(content["info"]), **{k: int(v) for k, v in content["metrics"].items()}}
        tensors = from_arrays(content["arrays"])
        if initial is None:
            initial, first_client = tensors, c
        elif tensors.keys() != initial.keys() or any(not torch.equal(tensors[k], initial[k]) for k in tensors):
            raise ClientFailed(f"client {c}'s initial adapter differs from client {first_client}'s: the SuperNodes "
                               "do not run the same fellrec, model or seed")
    return info, initial


def server_main(grid, context) -> None:
    """The ServerApp: one fellrec run over the SuperNodes, into ``run-dir``."""
    from fellrec.config import config_from_text, dump
    from fellrec.errors import ConfigError
    from fellrec.rundir import begun, is_finished, is_resumable

    rc = context.run_config
    cfg = config_from_text(str(rc["fellrec-config"]), "run config fellrec-config")
    t = cfg.train
    if cfg.model.backbone not in ("item-tokens", "ranker", "bigrec", "ctr"):
        raise ConfigError(f"model.backbone: {cfg.model.backbone} does not run on Flower (item-tokens, ranker, "
                          "bigrec and ctr do)")
    if t.algorithm == "centralized" and cfg.model.backbone != "ctr":
        raise ConfigError("train.algorithm: centralized pools every client's data; it has no Flower form")
    if str(rc.get("run-dir", "")) == "":
        raise ConfigError("run config run-dir: empty; say where the ServerApp writes the run")
    out = Path(str(rc["run-dir"])).expanduser()
    if is_finished(out):
        raise ConfigError(f"run-dir: {out} already holds a finished run")
    if is_resumable(out) and not bool(rc.get("resume", False)):
        raise ConfigError(f"run-dir: {out} holds an unfinished run; continue it with resume=true")
    with begun(out, dump(cfg)):
        _serve(cfg, rc, out, grid)


def _serve(cfg, rc, out: Path, grid) -> None:
    """The rounds, the test and the results of one run, into ``out``."""
    from fellrec.config import to_dict
    from fellrec.evaluate import test_summary
    from fellrec.files import save_tensors
    from fellrec.run import finish, protocol_warnings, selection_metric
    from fellrec.rundir import write_test_users
    from fellrec.strategies import make_strategy

    t, e = cfg.train, cfg.eval
    started = time.time()
    nodes = Nodes(grid, timeout_s=float(rc.get("round-timeout", 3600.0)), poll_s=float(rc.get("poll-s", 0.5)),
                  retries=int(rc.get("retries", 3)))
    if cfg.model.backbone == "ctr":  # FedPA and its baselines: one client per private user
        from fellrec.runtime.flower.fedpa import serve_fedpa

        serve_fedpa(cfg, nodes, rc, out, started)
        log.info("run finished: %s", out)
        return
    info, initial = setup(nodes, float(rc.get("wait-timeout", 300.0)))
    clients = sorted(info, key=int)
    host = None
    if cfg.storage.k is not None:  # split mode: the trunk lives here (fellrec.runtime.flower.split)
        from fellrec.runtime.flower.split import SplitFlowerRuntime, start_host

        host, initial = start_host(cfg, nodes, info, initial, clients)
    log.info("clients: %s", {c: info[c]["name"] for c in clients})
    strategy = make_strategy(t.algorithm, initial, clients, prox_mu=t.prox_mu, **to_dict(cfg)["fellrec"])
    options = {"rounds": t.rounds, "client_fraction": t.client_fraction, "eval_every": e.every, "seed": cfg.seed,
               "run_dir": out, "progress": False}
    runtime = (SplitFlowerRuntime(strategy, nodes, clients, host, **options) if host is not None
               else FlowerRuntime(strategy, nodes, clients, **options))
    runtime.run()

    tested = runtime.test_clients(t.rounds, bool(rc.get("collect-adapters", True)))
    per_user: dict[str, list[np.ndarray]] = {}
    client_of: list[np.ndarray] = []
    best_round = {}
    for c in clients:
        content = tested[c]
        scores = {k: v.numpy() for k, v in from_arrays(content["scores"]).items()}
        n = len(next(iter(scores.values()))) if scores else 0
        for k, v in scores.items():
            per_user.setdefault(k, []).append(v)
        client_of.append(np.full(n, int(c)))
        best_round[c] = int(content["metrics"]["best-round"])
        if "arrays" in content:
            save_tensors(out / "adapters" / f"client-{c}.safetensors", from_arrays(content["arrays"]))
    if strategy.global_tensors() is not None:
        save_tensors(out / "adapters" / "global.safetensors", strategy.global_tensors())
    per_user = {k: np.concatenate(v) for k, v in per_user.items()}
    users = per_user.pop("user", np.zeros(0)).astype(np.int64)
    client_of = np.concatenate(client_of)
    results = {
        "name": cfg.name, "algorithm": t.algorithm, "backbone": cfg.model.backbone,
        "dataset": info[clients[0]]["dataset"],
        **test_summary(per_user, client_of),
        "client_names": {c: info[c]["name"] for c in clients},
        "warnings": protocol_warnings([info[c]["name"] for c in clients], [info[c]["valid"] for c in clients],
                                      [info[c]["test"] for c in clients], cfg.split.method),
        "communication": {
            "bytes_up": int(sum(runtime.bytes_up.values())), "bytes_down": int(sum(runtime.bytes_down.values())),
            "per_client": {c: {"bytes_up": runtime.bytes_up[c], "bytes_down": runtime.bytes_down[c]}
                           for c in clients}},
        "train_time_s": round(runtime.elapsed, 1),
        "rounds": t.rounds,
        "steps_per_round": {c: info[c]["steps-per-round"] for c in clients},
        "select_by": selection_metric(cfg),
        "best_round": best_round,
        "samples": {k: sum(info[c][k] for c in clients) for k in ("train", "valid", "test")},
        "runtime": {"kind": "flower", "messages_resent": nodes.resent,
                    **({"split": host.traffic} if host is not None else {})},
    }
    started -= runtime.restored_elapsed
    write_test_users(out, per_user, client_of, users)
    finish(cfg, out, started, results)
    log.info("run finished: %s", json.dumps(results["overall"]))

