"""Flexible storage (split mode, ``storage.k``) over Flower: the trunk on the ServerApp, each client's
head and tail on its SuperNode, activations up and gradients down in Flower messages.

A client cannot wait inside a message for the trunk's reply, so it replays (``fellrec.storage.replay``):
each message runs the client's normal code as a pass over the trunk replies received so far and
answers with the requests it could not get past. The client keeps each exchange (a *session*) on its
disk, with a checkpoint after every local step completed on real replies (``SessionSteps``, the
training loop's ``StepHook``). The server (``TrunkHost``) keeps the trunk and the trunk part of each
client's adapters. Message types, round trips and limits: docs/FLOWER.md.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fellrec.adapters import get_adapter, set_adapter
from fellrec.build import build_backbone
from fellrec.files import atomic, save_tensors, write_text
from fellrec.runtime.flower import plain
from fellrec.runtime.flower.nodes import ClientFailed
from fellrec.runtime.flower.records import config_record, from_arrays, read_update, to_arrays, update_content
from fellrec.storage.replay import NeedReplies, ReplayDiverged, ReplayTransport, fingerprint
from fellrec.storage.transport import Message as TrunkMessage
from fellrec.storage.transport import encode
from fellrec.storage.trunk import ConcurrentTrunkServer
from fellrec.strategies import Payload, Tensors
from fellrec.train import make_optimizer
from fellrec.trainer import derive_seed

DEFAULT_MAX_MB = 64.0  # trunk requests per Flower message (node config ``split-max-mb``)
CONTINUE = {"train": "train.split", "evaluate": "evaluate.split", "evaluate.test": "evaluate.test_split"}


# ---- trunk messages in Flower records -----------------------------------------------------------


def pack(messages: list[TrunkMessage]) -> tuple[ArrayRecord, dict[str, Any]]:
    arrays = {f"{i}.{name}": t.detach().cpu().contiguous() for i, m in enumerate(messages)
              for name, t in m.tensors.items()}
    return ArrayRecord(arrays), {"kinds": [m.kind for m in messages], "requests": [m.request for m in messages]}


def unpack(arrays: ArrayRecord, config, client: str) -> list[TrunkMessage]:
    tensors = from_arrays(arrays)
    out = [TrunkMessage(k, client, int(r)) for k, r in zip(config["kinds"], config["requests"], strict=True)]
    for key, t in tensors.items():
        i, name = key.split(".", 1)
        out[int(i)].tensors[name] = t
    return out


# ---- the client ---------------------------------------------------------------------------------


class Session:
    """One split exchange of a client on its disk (see the module doc)."""

    def __init__(self, folder: Path, client: str):
        self.folder, self.client = folder, client

    @classmethod
    def open(cls, state_folder: Path, client: str, msg: Message) -> Session:
        config = msg.content["config"]
        name, seq = str(config["split-session"]), int(config["split-seq"])
        root = state_folder / "split"
        session = cls(root / name, client)
        if seq == 0:  # a new exchange: the earlier ones are over
            if root.exists():
                shutil.rmtree(root)
            session.folder.mkdir(parents=True)
            tensors = {k: torch.as_tensor(np.array(a.numpy(), copy=True)) for k, a in msg.content["arrays"].items()} \
                if "arrays" in msg.content else {}
            meta = {k: v for k, v in config.items() if not k.startswith("split-")}
            save_tensors(session.folder / "first.safetensors", tensors, {"fellrec": json.dumps(meta)})
            return session
        if not (session.folder / "first.safetensors").exists():
            raise RuntimeError(f"split session {name}: this client has no record of its start (its state folder "
                               f"{state_folder} was lost or changed); the server must start the exchange again")
        replies = unpack(msg.content["split-replies"], config, client)
        arrays = {f"{i}.{n}": t for i, m in enumerate(replies) for n, t in m.tensors.items()}
        keys = [[m.kind, m.request] for m in replies]
        save_tensors(session.folder / f"replies-{seq}.safetensors", arrays, {"fellrec": json.dumps(keys)})
        return session

    def first(self) -> tuple[Tensors, dict[str, Any]]:
        """The first message's tensors and config."""
        from safetensors import safe_open

        with safe_open(str(self.folder / "first.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["fellrec"])  # noqa: SIM118

    def replies(self) -> dict[tuple[str, int], TrunkMessage]:
        from safetensors import safe_open

        out = {}
        for path in sorted(self.folder.glob("replies-*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                keys = json.loads(f.metadata()["fellrec"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            msgs = [TrunkMessage(kind, self.client, int(r)) for kind, r in keys]
            for key, t in tensors.items():
                i, name = key.split(".", 1)
                msgs[int(i)].tensors[name] = t
            out.update({(m.kind, m.request): m for m in msgs})
        return out

    # ---- local training's checkpoint -----------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.folder / "checkpoint.pt"

    def checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.exists():
            return None
        return torch.load(self.checkpoint_path, weights_only=False)  # the client's own file

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic(self.checkpoint_path, lambda tmp: torch.save(state, tmp))
        below = state["requests"]
        self.record_sent([], below)
        for path in self.folder.glob("replies-*.safetensors"):  # replies no pass will ask for again
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = json.loads(f.metadata()["fellrec"])
            if all(int(r) < below for _, r in keys):
                path.unlink()

    def sent(self) -> dict[tuple[str, int], dict]:
        """Fingerprints of the requests this client sent in the session (see ``ReplayTransport``)."""
        path = self.folder / "sent.json"
        if not path.exists():
            return {}
        return {(k, int(r)): fp for k, r, fp in json.loads(path.read_text(encoding="utf-8"))}

    def record_sent(self, messages: list[TrunkMessage], below: int = 0) -> None:
        sent = self.sent()
        sent.update({(m.kind, m.request): fingerprint(m) for m in messages})
        rows = [[k, r, fp] for (k, r), fp in sorted(sent.items(), key=lambda x: x[0][1]) if r >= below]
        write_text(self.folder / "sent.json", json.dumps(rows))

    def ack(self) -> int:
        """Requests numbered below this are behind the checkpoint: the server may forget their replies."""
        found = self.checkpoint()
        return int(found["requests"]) if found else 0


def run_pass(model, session: Session, work: Callable[[], Any], *, max_bytes: int) -> tuple[Any, ReplayTransport]:
    """``work()`` over the trunk replies received so far: (its result, or None if it needs more replies;
    the transport, whose ``pending`` requests go to the server)."""
    transport = ReplayTransport(session.replies(), max_bytes=max_bytes, sent=session.sent())
    model.new_exchange(transport)
    model.eval()  # as after a completed local training (a pass cut short may have left it training)
    try:
        result = work()
    except NeedReplies:
        return None, transport
    except ReplayDiverged:
        raise
    except Exception:
        if transport.placeholders:  # computed from placeholders: wait for the real replies
            return None, transport
        raise
    if transport.placeholders:
        return None, transport
    return result, transport


class SessionSteps:
    """``train_steps``'s hook (``fellrec.train.StepHook``) in split mode: before the first step, the
    state of the session's checkpoint is restored (the client's part of the adapter, the loop's
    optimizer, scheduler, sampler and random state, the ranker's negative sampling, the request
    number, the bytes so far); after every step completed with real replies, a checkpoint is written."""

    def __init__(self, node, session: Session, transport: ReplayTransport):
        self.session, self.transport = session, transport
        self.model, self.backbone = node.backbone.model, node.backbone

    def resume(self, loop) -> list[float]:
        found = self.session.checkpoint()
        if found is None:
            return []
        set_adapter(self.model, found["adapter"])
        loop.load_state(found["loop"])
        if found["backbone_rng"] is not None:
            self.backbone.set_random_state(found["backbone_rng"])
        self.model.decoder.restart(found["requests"])
        self.transport.restore_counts(tuple(found["bytes"]))
        return list(found["losses"])

    def step_done(self, loop, losses: list[float]) -> None:
        if not self.transport.clean:
            return
        rng = self.backbone.random_state() if hasattr(self.backbone, "random_state") else None
        self.session.save_checkpoint({
            "adapter": get_adapter(self.model), "loop": loop.state(), "backbone_rng": rng,
            "requests": self.model.decoder.next_request(), "losses": list(losses),
            "bytes": self.transport.counts()})


def install_public(node) -> None:
    """What the server computed from the frozen base model for this client (see ``TrunkHost``)."""
    from safetensors.torch import load_file

    backbone = node.backbone
    need = public_names(node.cfg)
    if not need:
        return
    path = node.state.folder / "public.safetensors"
    if not path.exists():
        raise RuntimeError(f"split mode: {path} is missing: the server sends it at setup (query.split)")
    tensors = load_file(path)
    if "items" in need:
        backbone.use_item_table(tensors["items"])  # the ranker's frozen item table
    if "item_emb" in need:
        backbone.use_item_embeddings(tensors["item_emb"])  # BIGRec's item embeddings (base model)


def public_names(cfg) -> list[str]:
    if cfg.model.backbone == "bigrec":
        return ["item_emb"]
    if cfg.model.backbone == "item-tokens":
        return []  # its title vectors are the client's own token embeddings
    return ["items"] if cfg.model.item_side == "frozen" else []


def max_bytes(context) -> int:
    """Trunk requests per Flower message, from the node config (``split-max-mb``)."""
    return int(float(context.node_config.get("split-max-mb", DEFAULT_MAX_MB)) * (1 << 20))


def _reply(session: Session, transport: ReplayTransport, client: str, done: dict[str, Any] | None) -> RecordDict:
    if transport.pending:
        session.record_sent(transport.pending, session.ack())
    arrays, config = pack(transport.pending)
    content = dict(done) if done else {"info": ConfigRecord({"client-id": client})}
    content["split-requests"] = arrays
    content["split"] = ConfigRecord({**config, "done": done is not None, "ack": session.ack()})
    return RecordDict(content)


class SplitNode:
    """A plain client (``fellrec.runtime.flower.plain.ClientNode``, which it wraps) whose model is cut:
    each handler runs the plain client's work as a pass over the trunk replies received so far."""

    def __init__(self, node, max_bytes: int):
        self.node, self.limit = node, max_bytes

    def setup(self, msg: Message) -> RecordDict:
        return self.node.setup(msg)

    def saved_caches(self) -> None:
        self.node.saved_caches()

    def _begin(self, msg: Message, phase: int) -> tuple[Session, int, Payload, dict]:
        """The exchange this message belongs to, with the round, the payload and the config of its
        first message; the trainer's state as it was before ``phase`` of that round."""
        session = Session.open(self.node.state.folder, self.node.client, msg)
        tensors, config = session.first()
        rnd = int(config.pop("round"))
        self.node.start(rnd, phase)
        install_public(self.node)
        return session, rnd, Payload(tensors, config), config

    def fit(self, msg: Message) -> RecordDict:
        node = self.node
        session, rnd, payload, _ = self._begin(msg, plain.FIT)
        model = node.backbone.model

        def work():  # run_pass has given the model this pass's transport
            return node.trainer.fit(payload, rnd, hook=SessionSteps(node, session, model.transport))

        update, transport = run_pass(model, session, work, max_bytes=self.limit)
        if update is None:
            return _reply(session, transport, node.client, None)
        node.done(rnd, plain.FIT)
        return _reply(session, transport, node.client, dict(update_content(node.client, update)))

    def evaluate(self, msg: Message) -> RecordDict:
        node = self.node
        session, rnd, payload, _ = self._begin(msg, plain.EVAL)
        scores, transport = run_pass(node.backbone.model, session, lambda: node.trainer.evaluate(payload, rnd),
                                     max_bytes=self.limit)
        if scores is None:
            return _reply(session, transport, node.client, None)
        node.done(rnd, plain.EVAL)
        return _reply(session, transport, node.client, {
            "metrics": MetricRecord({k: float(v) for k, v in scores.items()}),
            "info": ConfigRecord({"client-id": node.client, "best-round": int(node.trainer.best_round)})})

    def test(self, msg: Message) -> RecordDict:
        node = self.node
        session, _, _, config = self._begin(msg, plain.TEST)
        t = node.trainer
        scores, transport = run_pass(node.backbone.model, session,
                                     lambda: t.test(node.test_samples) if len(node.test_samples) else {},
                                     max_bytes=self.limit)
        if scores is None:
            return _reply(session, transport, node.client, None)
        return _reply(session, transport, node.client,
                      dict(node.tested(scores, bool(config.get("send-adapter", True)))))

    def public(self, msg: Message) -> RecordDict:
        """``query.split``: keep what the server computed from the frozen base model."""
        save_tensors(self.node.state.folder / "public.safetensors", from_arrays(msg.content["arrays"]))
        return RecordDict({"info": ConfigRecord({"client-id": self.node.client})})


# ---- the server ---------------------------------------------------------------------------------


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class TrunkHost:
    """The ServerApp's trunk: one ``ConcurrentTrunkServer`` serving every client, and the trunk part
    of each client's adapters (see the module doc)."""

    def __init__(self, cfg, titles: list[str], dataset: str):
        backbone = build_backbone(cfg, titles, dataset)  # the whole model, split in this process
        split = backbone.model
        self.public: Tensors = {}
        with torch.no_grad():
            if "items" in public_names(cfg):
                self.public["items"] = backbone.item_table().detach().cpu()
            if "item_emb" in public_names(cfg):
                self.public["item_emb"] = backbone.item_embeddings().detach().cpu()
        self.client_initial = get_adapter(split)  # the clients' part, to check theirs against
        self.server = ConcurrentTrunkServer(split.server.trunk)
        self.initial = self.server.initial
        self.names = list(self.initial)
        self.cfg = cfg
        self.steps: dict[str, int] = {}
        self.private: dict[str, Tensors] = {}  # trunk part of each client's private adapter
        self.best: dict[str, Tensors] = {}  # ... and of its best-validation adapter
        self.best_round: dict[str, int] = {}
        self.evaluated: dict[str, Tensors] = {}
        self.sessions: dict[str, dict[tuple[str, int], TrunkMessage]] = {}  # replies of each client's exchange
        self.rng: dict[str, dict[str, Any]] = {}
        self.device = self.server.params[0].device if self.server.params else torch.device("cpu")
        self.traffic: dict[str, dict[str, int]] = {}  # per kind of exchange: messages, requests, bytes

    # ---- the adapter's two parts ------------------------------------------------------------------

    def client_part(self, tensors: Tensors) -> Tensors:
        return {k: v for k, v in tensors.items() if k not in self.initial}

    def trunk_of(self, client: str, tensors: Tensors) -> Tensors:
        """The trunk part a payload gives, or the client's private one where the payload has none."""
        if any(k in self.initial for k in tensors):
            return {k: tensors[k] for k in self.names}
        return self.private.get(client, self.initial)

    # ---- exchanges ------------------------------------------------------------------------------

    def begin(self, client: str, kind: str, trunk: Tensors, train_round: int | None = None,
              prox_mu: float = 0.0) -> None:
        self.server.drop(client)
        self.server.set_adapter(client, trunk)
        if train_round is not None:
            t, steps, warm = self.cfg.train, self.steps[client], train_round == 1
            self.server.reset_optimizer(client, lambda ps: make_optimizer(ps, t, steps, warmup=warm), prox_mu)
        with self._forked():
            torch.manual_seed(derive_seed(self.cfg.seed, train_round or 0, f"trunk/{client}"))
            self.rng[client] = _rng_state(self.device)
        self.sessions[client] = {}
        self.traffic.setdefault(kind, {"messages": 0, "requests": 0, "bytes_up": 0, "bytes_down": 0})

    def answer(self, client: str, kind: str, requests: list[TrunkMessage], ack: int) -> list[TrunkMessage]:
        """The trunk's replies to a client's requests, in order (each request is run once)."""
        done = self.sessions[client]
        tally = self.traffic[kind]
        tally["messages"] += 1
        out = []
        for m in requests:
            key = (m.kind, m.request)
            if key not in done:
                m = TrunkMessage(m.kind, client, m.request, m.tensors)  # the client is who sent it
                if m.kind in ("forward", "decode"):
                    self.server.trunk.train(m.kind == "forward" and bool(m.tensors["train"].item()))
                with self._forked():  # the trunk's dropout: a random stream of its own per client
                    _set_rng_state(self.rng[client], self.device)
                    done[key] = self.server.handle(m)
                    self.rng[client] = _rng_state(self.device)
                tally["requests"] += 1
                tally["bytes_up"] += len(encode(m))
                tally["bytes_down"] += len(encode(done[key]))
            out.append(done[key])
        for key in [k for k in done if k[1] < ack]:
            del done[key]
        return out

    def _forked(self):
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def end(self, client: str) -> Tensors:
        trunk = self.server.adapter(client)
        self.server.drop(client)
        self.sessions.pop(client, None)
        return trunk

    def drive(self, nodes, message_type: str, group: str, first: dict[str, Callable[[], RecordDict]],
              rnd: int) -> dict[str, Message]:
        """Every client's exchange to its end: the first messages, then the trunk's replies to each
        client's requests, until each client says it is done. Returns each client's last reply."""
        kind = message_type
        contents, finished, seq = dict(first), {}, 0
        while contents:
            replies = nodes.exchange(message_type, contents, group=group)
            seq += 1
            contents = {}
            for client, rep in replies.items():
                split = rep.content["split"]
                answers = self.answer(client, kind, unpack(rep.content["split-requests"], split, client),
                                      int(split["ack"]))
                if bool(split["done"]):
                    finished[client] = rep
                    continue
                contents[client] = lambda a=answers, s=seq: replies_content(rnd, group, s, a)
            message_type = CONTINUE[kind]
        return finished

    # ---- checkpoints ----------------------------------------------------------------------------

    def state_of(self, client: str) -> TrunkState:
        return TrunkState(self, client)


class TrunkState:
    """What the server keeps of one client in split mode, as the runtime's checkpoint saves it."""

    def __init__(self, host: TrunkHost, client: str):
        self.host, self.client = host, client

    def state(self) -> tuple[Tensors, dict[str, Any]]:
        h, c = self.host, self.client
        tensors = {f"private/{k}": v for k, v in h.private.get(c, h.initial).items()}
        tensors.update({f"best/{k}": v for k, v in h.best.get(c, h.initial).items()})
        return tensors, {"best_round": h.best_round.get(c, 0)}

    def load_state(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        h, c = self.host, self.client
        h.private[c] = {k.removeprefix("private/"): v for k, v in tensors.items() if k.startswith("private/")}
        h.best[c] = {k.removeprefix("best/"): v for k, v in tensors.items() if k.startswith("best/")}
        h.best_round[c] = int(meta["best_round"])


def replies_content(rnd: int, group: str, seq: int, replies: list[TrunkMessage]) -> RecordDict:
    arrays, lists = pack(replies)
    return RecordDict({"split-replies": arrays, "config": ConfigRecord(
        {"round": rnd, "split-session": group, "split-seq": seq, **lists})})


def first_content(rnd: int, group: str, tensors: Tensors, config: dict[str, Any]) -> RecordDict:
    return RecordDict({"arrays": to_arrays(tensors),
                       "config": config_record({**config, "round": rnd, "split-session": group, "split-seq": 0})})


def start_host(cfg, nodes, info: dict[str, dict], initial: Tensors, clients: list[str]) -> tuple[TrunkHost, Tensors]:
    """The server's trunk, built from the titles the clients sent; their initial part checked against
    it; what the clients need from the frozen base model sent to them (``query.split``). Returns the
    host and the whole initial adapter (the clients' part and the trunk's)."""
    titles = [list(info[c].pop("titles", [])) for c in clients]
    if any(t != titles[0] for t in titles) or not titles[0]:
        raise ClientFailed("split mode: the clients sent different (or no) item catalogues at setup")
    host = TrunkHost(cfg, titles[0], str(info[clients[0]]["dataset"]))
    mine = host.client_initial
    if mine.keys() != initial.keys() or any(not torch.equal(mine[k], initial[k]) for k in mine):
        raise ClientFailed("split mode: the clients' initial adapter differs from the one the server built (not the "
                           "same fellrec, model or seed on both sides)")
    host.steps = {c: int(info[c]["steps-per-round"]) for c in clients}
    nodes.exchange("query.split", {c: (lambda: RecordDict({"arrays": to_arrays(host.public)})) for c in clients},
                   group="setup")
    return host, {**initial, **host.initial}


class SplitClients:
    """The clients as SuperNodes whose exchanges go through the trunk ``host`` keeps on this server."""

    def __init__(self, nodes, clients: list[str], host: TrunkHost):
        self.nodes, self.host = nodes, host
        self.training = self.validating = list(clients)

    def fit(self, rnd: int, payloads: dict[str, Payload]) -> dict[str, Any]:
        host, first = self.host, {}
        for c, p in payloads.items():
            host.begin(c, "train", host.trunk_of(c, p.tensors), train_round=rnd,
                       prox_mu=float(p.config.get("prox_mu", 0.0)))
            first[c] = lambda p=p: first_content(rnd, f"fit-{rnd}", host.client_part(p.tensors), p.config)
        replies = host.drive(self.nodes, "train", f"fit-{rnd}", first, rnd)
        updates = {}
        for c in payloads:
            update = read_update(c, replies[c])
            host.private[c] = host.end(c)
            if update.tensors:  # the client shares its adapter: its part and the trunk's
                update.tensors.update(host.private[c])
            updates[c] = update
        return updates

    def evaluate(self, rnd: int, payloads: dict[str, Payload]) -> dict[str, dict[str, float]]:
        host, first = self.host, {}
        for c, p in payloads.items():
            host.evaluated[c] = host.trunk_of(c, p.tensors)
            host.begin(c, "evaluate", host.evaluated[c])
            first[c] = lambda p=p: first_content(rnd, f"evaluate-{rnd}", host.client_part(p.tensors), p.config)
        replies = host.drive(self.nodes, "evaluate", f"evaluate-{rnd}", first, rnd)
        out = {}
        for c in payloads:
            host.end(c)
            if int(replies[c].content["info"]["best-round"]) == rnd:  # the client's new best adapter
                host.best[c], host.best_round[c] = host.evaluated[c], rnd
            out[c] = {k: float(v) for k, v in replies[c].content["metrics"].items()}
        return out

    def test(self, rounds: int, send_adapter: bool) -> dict[str, Any]:
        host, first = self.host, {}
        for c in self.training:
            host.begin(c, "evaluate.test", host.best.get(c, host.initial))
            first[c] = lambda: first_content(rounds, "test", {}, {"send-adapter": send_adapter})
        replies = host.drive(self.nodes, "evaluate.test", "test", first, rounds)
        out = {}
        for c in self.training:
            host.end(c)
            content = replies[c].content
            said = int(content["metrics"]["best-round"])
            if said != host.best_round.get(c, 0):
                raise RuntimeError(f"client {c} tested its round-{said} adapter, but the server kept the trunk of "
                                   f"round {host.best_round.get(c, 0)}")
            if "arrays" in content:  # the whole selected adapter: the client's part and the trunk's
                content["arrays"] = to_arrays({**from_arrays(content["arrays"]), **host.best.get(c, host.initial)})
            out[c] = content
        return out

    def stateful(self) -> dict[str, Any]:
        return {c: self.host.state_of(c) for c in self.training}

    def describe(self) -> dict[str, Any]:
        return {"split": self.host.traffic}


def split_clients(cfg, nodes, info: dict, initial: Tensors, ids: dict[str, str]):
    """``plain.serve``'s clients in split mode: the trunk built here, the clients' exchanges through it
    (an LLM run, whose client names are their nodes' client-ids)."""
    clients = list(ids)
    host, initial = start_host(cfg, nodes, info, initial, clients)
    return SplitClients(nodes, clients, host), initial, set(host.names)


def serve(cfg, run_config, out: Path, nodes, started: float, task) -> None:
    """The ServerApp of a split-mode run: ``fellrec.runtime.flower.plain.serve`` with the trunk here."""
    plain.serve(cfg, run_config, out, nodes, started, task, make_clients=split_clients)
