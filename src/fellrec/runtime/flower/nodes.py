"""Which Flower node holds which fellrec client, and message exchange that survives node restarts.

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

import torch
from flwr.app import ConfigRecord, Message, RecordDict

from fellrec.runtime.flower.records import client_id_of, from_arrays

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
        self.log_to: Path | None = None  # messages.jsonl: one line per reply (see ``_logged``)

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
        trips: dict[str, tuple[float, int]] = {}  # message id -> (when it was pushed, its content's bytes)
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
                sizes = [content_bytes(m) for m in out] if self.log_to is not None else [0] * len(out)
                pushed = time.time()
                for mid, (client, node), size in zip(self.grid.push_messages(out), targets, sizes, strict=True):
                    sent[mid] = (client, node)
                    where[client] = node
                    trips[mid] = (pushed, size)
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
                if self.log_to is not None:
                    self._logged(message_type, group, client, node, *trips[rep.metadata.reply_to_message_id], rep)
            if not pending:
                break
            if time.monotonic() > end:
                raise ClientFailed(f"{message_type}: no answer from client(s) {sorted(pending, key=int)} within "
                                   f"{self.timeout_s:.0f} s (raise round-timeout for slow clients)")
            time.sleep(self.poll_s)
        return replies

    def _logged(self, message_type: str, group: str, client: str, node: int, pushed: float, size: int,
                reply: Message) -> None:
        """One line of messages.jsonl: the message's type, round (group), client and node; when the
        ServerApp pushed it and pulled its reply (seconds since the epoch); the bytes of its content and
        of the reply's (serialized RecordDicts, as Flower sends them); and the reply's ``timing``
        (``fellrec.runtime.flower.worker``), by which the time in between is split."""
        row = {"type": message_type, "round": group, "client": client, "node": node, "pushed": pushed,
               "pulled": time.time(), "bytes_sent": size, "bytes_received": content_bytes(reply)}
        if "timing" in reply.content:
            row.update({k: float(v) for k, v in reply.content["timing"].items()})
        with open(self.log_to, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def content_bytes(msg: Message) -> int:
    """The bytes of a message's content as Flower serializes it."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(msg.content).ByteSize() if msg.has_content() else 0


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
