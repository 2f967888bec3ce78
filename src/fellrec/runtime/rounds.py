"""The rounds of a federated run, wherever its clients work. A round, for the clients drawn for it:

    payload = strategy.configure_fit(round, client)      # tensors down
    update  = clients.fit(round, payloads)[client]       # local training; tensors up
    strategy.aggregate(round, updates)
    every eval.every rounds and after the last: each client validates strategy.configure_evaluate(client)
    one line to metrics.jsonl, then a checkpoint

Clients that can validate and train in one exchange (Flower's: ``fit_validated``) get a round's
validation with the next round's training messages, one message per client and round fewer; the round's
line is then written when its validation comes back, and the checkpoint keeps it until then. The last
round, and any round when only some clients train next, validate on their own.

Bytes are the size of the safetensors serialisation of the tensors that travel (what a real
transport carries; the Flower runtime sends the same tensors). After a crash, ``run`` continues from
the last checkpoint: the round in progress is repeated from its start, and since a client's round is
seeded by (seed, round, client), the run ends as an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.torch import save as serialise
from tqdm.auto import tqdm

from fellrec.files import plain
from fellrec.runtime.checkpoint import load_checkpoint, save_checkpoint, section
from fellrec.strategies import ClientUpdate, Payload, Strategy, Tensors


def payload_bytes(tensors: Tensors) -> int:
    """Size of ``tensors`` serialised as safetensors (0 when nothing travels)."""
    if not tensors:
        return 0
    return len(serialise({k: v.contiguous() for k, v in tensors.items()}))


def clients_for_round(clients: list[str], fraction: float, seed: int, rnd: int) -> list[str]:
    """The clients that train in round ``rnd``: all, or a seeded draw of ceil(fraction·M)."""
    if fraction >= 1.0:
        return list(clients)
    k = max(1, math.ceil(fraction * len(clients)))
    rng = np.random.default_rng([seed, rnd])
    return [clients[i] for i in sorted(rng.choice(len(clients), size=k, replace=False))]


class Clients(Protocol):
    """Where the clients' work is done: in this process (``fellrec.runtime.embedded``) or on Flower's
    SuperNodes (``fellrec.runtime.flower.runtime``). Clients that can also do a round's training and
    the previous round's validation in one exchange have ``fit_validated(rnd, payloads, checked, checks)
    -> (updates, validation)``; the rounds then use it (see the module's docstring)."""

    training: list[str]  # the clients a round draws from (centralized: the one pooled trainer)
    validating: list[str]  # the clients that validate

    def fit(self, rnd: int, payloads: dict[str, Payload]) -> dict[str, ClientUpdate]: ...

    def evaluate(self, rnd: int, payloads: dict[str, Payload]) -> dict[str, dict[str, float]]: ...

    def stateful(self) -> dict[str, Any]:
        """What the checkpoint keeps of the clients: objects with ``state()`` and ``load_state()``."""


class Rounds:
    """Drives ``strategy`` over ``clients`` for ``rounds`` rounds, logging into ``run_dir``."""

    def __init__(self, strategy: Strategy, clients: Clients, *, rounds: int, client_fraction: float,
                 eval_every: int, seed: int, run_dir: Path, progress: bool = True,
                 kept_on_server: set[str] = frozenset()):
        self.strategy = strategy
        self.clients = clients
        self.rounds, self.fraction, self.every, self.seed = rounds, client_fraction, eval_every, seed
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.kept_on_server = set(kept_on_server)  # split mode: the trunk's adapter never leaves the server
        self.bytes_up = dict.fromkeys(clients.training, 0)
        self.bytes_down = dict.fromkeys(clients.training, 0)
        self.elapsed = 0.0  # seconds spent in rounds, over every process that worked on this run
        self.restored_elapsed = 0.0  # the part of it spent before this process resumed the run
        self.done = 0  # rounds finished
        self.pending: dict[str, Any] | None = None  # a finished round's record, waiting for its validation

    @property
    def log_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def is_eval_round(self, rnd: int) -> bool:
        return rnd == self.rounds or (self.every > 0 and rnd % self.every == 0)

    def folds(self, rnd: int) -> bool:
        """Whether round ``rnd``'s validation travels with round ``rnd + 1``'s training: the clients do
        both in one message, and every client that validates trains in the next round."""
        return (rnd < self.rounds and hasattr(self.clients, "fit_validated") and self.fraction >= 1.0
                and set(self.clients.validating) <= set(self.clients.training))

    def run(self) -> None:
        """Run (or continue) every round."""
        self.restore()
        started = time.time() - self.elapsed
        if self.done == 0 and self.rounds == 0:  # nothing to train: validate the initial adapter
            self.log({"round": 0, "time_s": round(time.time() - started, 2), "valid": self.validate(0)})
        bar = tqdm(total=self.rounds, initial=self.done, desc="rounds", unit="round", disable=not self.progress)
        for rnd in range(self.done + 1, self.rounds + 1):
            record = self.train_round(rnd)
            wait = self.is_eval_round(rnd) and self.folds(rnd)
            if self.is_eval_round(rnd) and not wait:
                record["valid"] = self.validate(rnd)
            self.elapsed = time.time() - started
            record["time_s"] = round(self.elapsed, 2)
            if wait:
                self.pending = record
            else:
                self.log(record)
            self.done = rnd
            self.save()
            bar.update(1)
        bar.close()
        self.elapsed = time.time() - started

    def train_round(self, rnd: int) -> dict[str, Any]:
        chosen = clients_for_round(list(self.clients.training), self.fraction, self.seed, rnd)
        pending, self.pending = self.pending, None  # a last round whose validation goes with this training
        checks = {c: self.strategy.configure_evaluate(c) for c in self.clients.validating} if pending else None
        payloads = {client: self.strategy.configure_fit(rnd, client) for client in chosen}
        if pending:
            updates, valid = self.clients.fit_validated(rnd, payloads, pending["round"], checks)
            self.log({**{k: v for k, v in pending.items() if k != "time_s"}, "valid": valid,
                      "time_s": pending["time_s"]})
        else:
            updates = self.clients.fit(rnd, payloads)
        train, up, down = {}, {}, {}
        for client in chosen:
            update = updates[client]
            counts = self.strategy.communicates
            down[client] = payload_bytes(self._travelling(payloads[client].tensors)) if counts else 0
            up[client] = payload_bytes(self._travelling(update.tensors)) if counts else 0
            self.bytes_down[client] += down[client]
            self.bytes_up[client] += up[client]
            train[client] = {**update.metrics, "examples": update.num_examples}
        info = self.strategy.aggregate(rnd, [updates[c] for c in chosen])
        record = {"round": rnd, "clients": chosen, "train": train, "bytes_up": up, "bytes_down": down}
        if info:
            record["strategy"] = info
        return record

    def _travelling(self, tensors: Tensors) -> Tensors:
        return {k: v for k, v in tensors.items() if k not in self.kept_on_server}

    def validate(self, rnd: int) -> dict[str, dict[str, float]]:
        return self.clients.evaluate(rnd, {c: self.strategy.configure_evaluate(c) for c in self.clients.validating})

    def log(self, record: dict[str, Any]) -> None:
        with open(self.log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(plain(record)) + "\n")

    # ---- checkpoints -------------------------------------------------------------------------

    def save(self) -> None:
        tensors = {f"strategy/{k}": v for k, v in self.strategy.state().items()}
        clients = {}
        for client, evaluator in self.clients.stateful().items():
            t, meta = evaluator.state()
            tensors.update({f"client/{client}/{k}": v for k, v in t.items()})
            clients[client] = meta
        meta = {"round": self.done, "elapsed": self.elapsed, "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down, "log_size": self.log_path.stat().st_size, "clients": clients,
                "pending": plain(self.pending)}
        save_checkpoint(self.run_dir, tensors, meta)

    def restore(self) -> None:
        found = load_checkpoint(self.run_dir)
        if found is None:
            self.log_path.write_text("", encoding="utf-8")  # a fresh start: no stale lines
            return
        tensors, meta = found
        self.strategy.load_state(section(tensors, "strategy"))
        for client, evaluator in self.clients.stateful().items():
            evaluator.load_state(section(tensors, f"client/{client}"), meta["clients"][client])
        self.done, self.elapsed = meta["round"], meta["elapsed"]
        self.restored_elapsed = self.elapsed
        self.bytes_up, self.bytes_down = meta["bytes_up"], meta["bytes_down"]
        self.pending = meta.get("pending")
        with open(self.log_path, "r+b") as fh:  # forget the lines of the round that was cut short
            fh.truncate(meta["log_size"])
