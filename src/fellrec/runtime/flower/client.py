"""What a ClientApp does with a message: build (or find) the process's client of the run and hand the
message to it, timing the parts. Called in the ClientApp's own process, or in the client's worker
(``fellrec.runtime.flower.worker``), which keeps the process, and so the client, between messages.

``handle`` returns the reply's content and how long the message took to build the client (``build``),
to build the base model and its adapters (``model``, counted apart from ``build``) and to do its work
(``work``); see ``fellrec.runtime.flower.worker.TIMING``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import Context, Message, RecordDict

from fellrec import build
from fellrec.config import config_from_text
from fellrec.fedpa import build as fedpa_build
from fellrec.runtime.flower import plain, split
from fellrec.runtime.flower.state import CONFIG_KEY, ProcessCache, client_id, state_root

CACHE = ProcessCache()  # what this process keeps across the messages it serves

# message type -> the client's method that answers it (split mode: ".split" types, one message further)
WORK = {"query": "setup", "query.split": "public", "train": "fit", "train.split": "fit", "evaluate": "evaluate",
        "evaluate.split": "evaluate", "evaluate.test": "test", "evaluate.test_split": "test"}


def set_threads(context: Context) -> None:
    """The node config's ``threads``: how many CPU threads this client's torch may use (a machine that
    runs several SuperNodes gives each a share of its cores)."""
    value = context.node_config.get("threads")
    if value is not None:
        n = int(value)
        if n < 1:
            raise ValueError(f"node config threads={value}: must be at least 1")
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def node_for(context: Context):
    """This process's client of the run, built on its first message."""
    text = str(context.run_config[CONFIG_KEY])
    cid, root = client_id(context), state_root(context)

    def make():
        cfg = config_from_text(text, f"run config {CONFIG_KEY}")
        kind = fedpa_build if cfg.model.backbone == "ctr" else build
        node = plain.ClientNode(text, cid, Path(root), CACHE, kind)
        return split.SplitNode(node, split.max_bytes(context)) if cfg.storage.k is not None else node

    # one client per kind: a process that serves several clients in turn (Flower's simulation, the tests)
    # keeps each one instead of building it again at every switch
    return CACHE.get(f"node-{cid}", (text, str(root)), make)


def handle(msg: Message, context: Context) -> tuple[RecordDict, dict[str, float]]:
    """The reply's content to ``msg`` and the seconds spent building the client and model and working."""
    work = WORK.get(msg.metadata.message_type)
    if work is None:
        raise ValueError(f"fellrec's ClientApp has no handler for message type {msg.metadata.message_type!r}")
    set_threads(context)
    t0, m0 = time.perf_counter(), model_seconds()
    node = node_for(context)
    t1, m1 = time.perf_counter(), model_seconds()
    content = getattr(node, work)(msg)
    node.saved_caches()
    t2, m2 = time.perf_counter(), model_seconds()
    return content, {"build": (t1 - t0) - (m1 - m0), "model": m2 - m0, "work": (t2 - t1) - (m2 - m1)}


def model_seconds() -> float:
    """Seconds this process has spent building what its clients share (the base model and adapters)."""
    return sum(s for kind, s in CACHE.seconds.items() if not kind.startswith("node-"))
