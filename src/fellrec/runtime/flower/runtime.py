"""The federated rounds over Flower: ``fellrec.runtime.rounds.Rounds`` with the clients' work sent to
the SuperNodes as messages, one per client, each with its own payload, all in flight at once.

Rounds, client sampling, aggregation, bytes, the metrics log and the checkpoint are the rounds'
own code. The checkpoint holds the strategy's state only: each client's private state is on its own
disk (``fellrec.runtime.flower.state``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from fellrec.config import Config, config_from_text
from fellrec.errors import ConfigError
from fellrec.rundir import is_finished, is_resumable
from fellrec.runtime.flower.nodes import Nodes
from fellrec.runtime.flower.records import checked_content, payload_content, read_update
from fellrec.runtime.flower.state import CONFIG_KEY
from fellrec.strategies import ClientUpdate, Payload


class FlowerClients:
    """The clients as SuperNodes reached through ``nodes``. ``ids`` maps a fellrec client name to the
    ``client-id`` of its node (FedPA names its clients by user id)."""

    def __init__(self, nodes: Nodes, clients: list[str], ids: dict[str, str] | None = None):
        self.nodes = nodes
        self.training = self.validating = list(clients)
        self.ids = ids or {c: c for c in clients}

    def exchange(self, message_type: str, contents: dict[str, Callable[[], RecordDict]],
                 group: str) -> dict[str, Message]:
        replies = self.nodes.exchange(message_type, {self.ids[c]: f for c, f in contents.items()}, group=group)
        return {c: replies[self.ids[c]] for c in contents}

    def fit(self, rnd: int, payloads: dict[str, Payload]) -> dict[str, ClientUpdate]:
        contents = {c: (lambda p=p: payload_content(rnd, p)) for c, p in payloads.items()}
        replies = self.exchange("train", contents, group=f"fit-{rnd}")
        return {c: read_update(c, replies[c]) for c in payloads}

    def fit_validated(self, rnd: int, payloads: dict[str, Payload], checked: int,
                      checks: dict[str, Payload]) -> tuple[dict[str, ClientUpdate], dict[str, dict[str, float]]]:
        """Round ``rnd``'s training with round ``checked``'s validation in the same messages (each client
        validates first): the updates, and each client's validation as ``evaluate`` gives it."""
        if not set(checks) <= set(payloads):
            raise ValueError(f"clients {sorted(set(checks) - set(payloads))} validate but do not train in round {rnd}")
        contents = {c: (lambda c=c: checked_content(rnd, payloads[c], checked, checks[c]) if c in checks
                        else payload_content(rnd, payloads[c])) for c in payloads}
        replies = self.exchange("train", contents, group=f"fit-{rnd}")
        updates = {c: read_update(c, replies[c]) for c in payloads}
        return updates, {c: {k: float(v) for k, v in replies[c].content["validation"].items()} for c in checks}

    def evaluate(self, rnd: int, payloads: dict[str, Payload]) -> dict[str, dict[str, float]]:
        contents = {c: (lambda p=p: payload_content(rnd, p)) for c, p in payloads.items()}
        replies = self.exchange("evaluate", contents, group=f"evaluate-{rnd}")
        return {c: {k: float(v) for k, v in replies[c].content["metrics"].items()} for c in payloads}

    def test(self, rounds: int, send_adapter: bool) -> dict[str, Any]:
        """Each client's test content: per-user ``scores``, ``metrics`` (its best round) and, if asked,
        its selected adapter (``arrays``)."""
        replies = self.exchange("evaluate.test", {
            c: (lambda: RecordDict({"config": ConfigRecord({"round": rounds, "send-adapter": send_adapter})}))
            for c in self.training}, group="test")
        return {c: replies[c].content for c in self.training}

    def stateful(self) -> dict[str, Any]:
        return {}  # the clients keep their own state

    def describe(self) -> dict[str, Any]:
        """What results.json says of this runtime beyond the rounds."""
        return {}



def open_run(grid, run_config) -> tuple[Config, Path, Nodes]:
    """The ServerApp's run: its config (checked for Flower), the folder it writes (``run-dir``: a new
    one, or an unfinished one with ``resume=true``) and the SuperNodes, as ``run_config`` sets them."""
    cfg = config_from_text(str(run_config[CONFIG_KEY]), f"run config {CONFIG_KEY}")
    cfg.check_flower()
    if str(run_config.get("run-dir", "")) == "":
        raise ConfigError("run config run-dir: empty; say where the ServerApp writes the run")
    out = Path(str(run_config["run-dir"])).expanduser()
    if is_finished(out):
        raise ConfigError(f"run-dir: {out} already holds a finished run")
    if is_resumable(out) and not bool(run_config.get("resume", False)):
        raise ConfigError(f"run-dir: {out} holds an unfinished run; continue it with resume=true")
    nodes = Nodes(grid, timeout_s=float(run_config.get("round-timeout", 3600.0)),
                  poll_s=float(run_config.get("poll-s", 0.5)), retries=int(run_config.get("retries", 3)))
    return cfg, out, nodes
