"""The client side of a Flower run: one SuperNode is one fellrec client.

A SuperNode starts a fresh ClientApp process for every message, so nothing survives in memory
between two messages. Each handler therefore builds the client from the run's config (data, the
base model with a fresh LoRA adapter, the client's ``AdapterTrainer`` exactly as the embedded runtime
builds it), loads the client's private state from its own disk, does its work, and writes the state
back before it replies.

The state lives under ``<state-dir>/<run name>-<config hash>/client-<id>/`` (``state-dir`` from
the SuperNode's ``--node-config``), one file per kind and round:

- ``fit-<r>.safetensors``: the client's private adapter after its local training in round r;
- ``eval-<r>.safetensors``: its best-validation adapter after validating in round r (with the
  best score and round in the metadata);
- ``adapter.safetensors``: the adapter its test used.

A handler for round r reads the newest file of a round before r (after r for validation's private
adapter), never one of round r itself, so a message that is delivered again after a crash (the
SuperNode killed after it wrote its state but before its reply arrived) gives the same reply. The
two newest files of each kind are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fellrec.runtime.flower.records import read_payload, to_arrays, update_content

CONFIG_KEY = "fellrec-config"


def client_id(context: Context) -> str:
    """fellrec's client id: ``client-id`` of the node config; Flower's simulation only has ``partition-id``."""
    nc = context.node_config
    value = nc.get("client-id", nc.get("partition-id"))
    if value is None:
        raise ValueError("node config has no client-id: start the SuperNode with --node-config 'client-id=N'")
    return str(value)


def state_root(context: Context) -> Path:
    value = context.node_config.get("state-dir")
    if value:
        return Path(str(value)).expanduser()
    base = os.environ.get("FELLREC_CACHE", str(Path.home() / ".cache" / "fellrec"))
    return Path(base) / "flower-state"


def run_key(config_text: str, name: str) -> str:
    return f"{name}-{hashlib.sha256(config_text.encode()).hexdigest()[:10]}"


class ClientState:
    """One client's private state on disk: ``<kind>-<round>.safetensors`` files (see the module doc)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def rounds(self, kind: str) -> list[int]:
        pattern = re.compile(rf"{kind}-(\d+)\.safetensors")
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := pattern.fullmatch(p.name)))

    def latest(self, kind: str, at_most: int) -> tuple[dict, dict[str, Any]] | None:
        """(tensors, meta) of the newest ``kind`` file of a round ≤ ``at_most``, or None."""
        from safetensors import safe_open

        found = [r for r in self.rounds(kind) if r <= at_most]
        if not found:
            return None
        with safe_open(str(self.folder / f"{kind}-{found[-1]}.safetensors"), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fellrec", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        return tensors, meta

    def save(self, kind: str, rnd: int, tensors: dict, meta: dict[str, Any] | None = None) -> None:
        from fellrec.files import save_tensors

        save_tensors(self.folder / f"{kind}-{rnd}.safetensors", tensors, {"fellrec": json.dumps(meta or {})})
        for old in self.rounds(kind)[:-2]:
            (self.folder / f"{kind}-{old}.safetensors").unlink(missing_ok=True)


class ClientNode:
    """One client of the run whose config is ``config_text``, built as the embedded runtime builds it.

    The client's own data (its train, validation and test samples, the item catalogue, its name) is
    taken from the dataset once and kept in ``data.pkl`` beside its state, so later messages skip
    reading and partitioning the dataset.
    """

    def __init__(self, config_text: str, client: str, root: Path):
        from fellrec.client import AdapterTrainer
        from fellrec.config import config_from_text
        from fellrec.run import private_names, trainer_options

        cfg = config_from_text(config_text, f"run config {CONFIG_KEY}")
        self.cfg, self.client = cfg, client
        self.state = ClientState(root / run_key(config_text, cfg.name) / f"client-{client}")
        self.data = self._data()
        self.split = cfg.storage.k is not None
        self.backbone, self.initial = _backbone(config_text, cfg, self.data)
        self.trainer = AdapterTrainer(client, self.backbone, self.data["train"], self.data["valid"],
                                      **trainer_options(cfg, self.initial, private_names(cfg, self.backbone)))
        self.test_samples = self.data["test"]

    def _data(self) -> dict[str, Any]:
        import pickle

        from fellrec.files import atomic

        path = self.state.folder / "data.pkl"
        if path.exists():
            with open(path, "rb") as fh:
                return pickle.load(fh)
        from fellrec.pipeline import prepare
        from fellrec.run import catalogue, client_samples, pick_test

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

    # ---- the state a round starts from ---------------------------------------------------------

    def load(self, private_at_most: int, best_at_most: int) -> None:
        t = self.trainer
        found = self.state.latest("fit", private_at_most)
        t.private = found[0] if found else {k: v.clone() for k, v in self.initial.items()}
        found = self.state.latest("eval", best_at_most)
        if found:
            t.best, t.best_score, t.best_round = found[0], found[1]["best_score"], found[1]["best_round"]
        else:
            t.best, t.best_score, t.best_round = {k: v.clone() for k, v in self.initial.items()}, None, 0

    # ---- handlers ------------------------------------------------------------------------------

    def setup(self, msg: Message | None = None) -> RecordDict:
        t = self.trainer
        d = self.data
        info = {"client-id": self.client, "name": d["name"], "num-clients": d["num_clients"], "dataset": d["dataset"]}
        counts = {"train": len(t.train), "valid": len(t.valid), "test": len(self.test_samples),
                  "steps-per-round": int(t.steps_per_round)}
        if self.split:  # the server builds the base model too: the tiny test model's tokenizer needs the titles
            info["titles"] = list(d["titles"])
        shared = {k: v for k, v in self.initial.items() if k not in self.trainer.kept}  # as the server starts
        return RecordDict({"arrays": to_arrays(shared), "info": ConfigRecord(info),
                           "metrics": MetricRecord(counts)})

    def fit(self, msg: Message, context: Context | None = None) -> RecordDict:
        if self.split:
            from fellrec.runtime.flower.split import client_fit, max_bytes

            return client_fit(self, msg, max_bytes(context))
        rnd, payload = read_payload(msg)
        self.load(rnd - 1, rnd - 1)
        update = self.trainer.fit(payload, rnd)
        self.state.save("fit", rnd, self.trainer.private)
        return update_content(self.client, update)

    def evaluate(self, msg: Message, context: Context | None = None) -> RecordDict:
        if self.split:
            from fellrec.runtime.flower.split import client_evaluate, max_bytes

            return client_evaluate(self, msg, max_bytes(context))
        rnd, payload = read_payload(msg)
        self.load(rnd, rnd - 1)
        scores = self.trainer.evaluate(payload, rnd)
        t = self.trainer
        self.state.save("eval", rnd, t.best, {"best_score": t.best_score, "best_round": t.best_round})
        return RecordDict({"metrics": MetricRecord({k: float(v) for k, v in scores.items()}),
                           "info": ConfigRecord({"client-id": self.client})})

    def test(self, msg: Message, context: Context | None = None) -> RecordDict:
        from fellrec.files import save_tensors

        if self.split:
            from fellrec.runtime.flower.split import client_test, max_bytes

            return client_test(self, msg, max_bytes(context))
        rounds = int(msg.content["config"]["round"])
        self.load(rounds, rounds)
        t = self.trainer
        scores = t.test(self.test_samples) if len(self.test_samples) else {}
        save_tensors(self.state.folder / "adapter.safetensors", t.best)
        content = {"scores": to_arrays({k: _tensor(v) for k, v in with_users(scores, self.test_samples).items()}),
                   "info": ConfigRecord({"client-id": self.client}),
                   "metrics": MetricRecord({"best-round": int(t.best_round)})}
        if bool(msg.content["config"].get("send-adapter", True)):
            content["arrays"] = to_arrays({k: v for k, v in t.best.items() if k not in t.kept})
        return RecordDict(content)


_BACKBONES: dict[str, tuple[Any, dict]] = {}


def _backbone(config_text: str, cfg, data: dict[str, Any]) -> tuple[Any, dict]:
    """The run's backbone and its initial adapter, built once per process: Flower's simulation serves
    several clients from one process, which then share one model, as in the embedded runtime (each
    client loads its own adapter into it before it works)."""
    from fellrec.client import read_full
    from fellrec.run import build_backbone

    if config_text not in _BACKBONES:
        _BACKBONES.clear()
        backbone = build_backbone(cfg, data["titles"], data["dataset"])
        if cfg.storage.k is not None:  # keep the client's part alone: the trunk is the ServerApp's (``split``)
            import gc

            from fellrec.storage.replay import ReplayTransport

            backbone.model = backbone.model.client_half(ReplayTransport())
            gc.collect()
        _BACKBONES[config_text] = (backbone, read_full(backbone.model))
    return _BACKBONES[config_text]


def with_users(scores: dict, samples) -> dict:
    """The per-user test scores and whose they are (``user``: the dataset's dense user ids), so that
    the server can write test_users.csv and runs can be paired by user."""
    return {**scores, "user": np.asarray(samples.user)} if scores else scores


def _tensor(values: np.ndarray):
    import torch

    return torch.as_tensor(np.asarray(values, dtype=np.float64))


_NODES: dict[tuple[str, str, str], Any] = {}


def node_for(context: Context):
    """This process's client of the run (built once: Flower's simulation keeps the process): a
    ``ClientNode``, or for ``model.backbone: ctr`` a ``fellrec.runtime.flower.fedpa.FedPANode``."""
    text = str(context.run_config[CONFIG_KEY])
    key = (text, client_id(context), str(state_root(context)))
    if key not in _NODES:
        _NODES.clear()
        from fellrec.config import config_from_text

        kind = ClientNode
        if config_from_text(text, f"run config {CONFIG_KEY}").model.backbone == "ctr":
            from fellrec.runtime.flower.fedpa import FedPANode as kind
        _NODES[key] = kind(text, key[1], Path(key[2]))
    return _NODES[key]


def keep_states(node, content: RecordDict) -> RecordDict:
    """``content``, after writing the frozen blocks' states this message computed to the client's cache
    (the item-token backbone): the next message, often a fresh process, starts with them."""
    save = getattr(getattr(node, "backbone", None), "save_cache", None)
    if save is not None:
        save()
    return content


def reply(msg: Message, content: RecordDict) -> Message:
    return Message(content, reply_to=msg)


def handle_whoami(msg: Message, context: Context) -> Message:
    return reply(msg, RecordDict({"info": ConfigRecord({"client-id": client_id(context)})}))


def handle_setup(msg: Message, context: Context) -> Message:
    return reply(msg, node_for(context).setup(msg))


def handle_train(msg: Message, context: Context) -> Message:
    """``train``, and in split mode ``train.split`` (the same exchange, one message further)."""
    node = node_for(context)
    return reply(msg, keep_states(node, node.fit(msg, context)))


def handle_evaluate(msg: Message, context: Context) -> Message:
    """``evaluate``, and in split mode ``evaluate.split``."""
    node = node_for(context)
    return reply(msg, keep_states(node, node.evaluate(msg, context)))


def handle_test(msg: Message, context: Context) -> Message:
    """``evaluate.test``, and in split mode ``evaluate.test_split``."""
    node = node_for(context)
    return reply(msg, keep_states(node, node.test(msg, context)))


def handle_split_setup(msg: Message, context: Context) -> Message:
    """``query.split`` (split mode): what the server computed from the frozen base model for the client."""
    from fellrec.runtime.flower.split import client_public

    return reply(msg, client_public(node_for(context), msg))

