"""The ClientApp: builds this process's client from the run's config (an LLM client or a FedPA user;
plain or split) and hands each message to it (``fellrec.runtime.flower.plain``, ``split``)."""

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fellrec import build
from fellrec.config import config_from_text
from fellrec.fedpa import build as fedpa_build
from fellrec.runtime.flower import plain, split
from fellrec.runtime.flower.state import CONFIG_KEY, ProcessCache, client_id, state_root

app = ClientApp()
CACHE = ProcessCache()  # what this process keeps across the messages it serves


def node_for(context: Context):
    """This process's client of the run, built on its first message."""
    text = str(context.run_config[CONFIG_KEY])
    cid, root = client_id(context), state_root(context)

    def make():
        cfg = config_from_text(text, f"run config {CONFIG_KEY}")
        kind = fedpa_build if cfg.model.backbone == "ctr" else build
        node = plain.ClientNode(text, cid, Path(root), CACHE, kind)
        return split.SplitNode(node, split.max_bytes(context)) if cfg.storage.k is not None else node

    return CACHE.get("node", (text, cid, str(root)), make)


def answer(msg: Message, context: Context, work) -> Message:
    node = node_for(context)
    content = work(node)
    node.saved_caches()
    return Message(content, reply_to=msg)


@app.query("whoami")
def whoami(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"info": ConfigRecord({"client-id": client_id(context)})}), reply_to=msg)


@app.query()
def setup(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda node: node.setup(msg))


@app.query("split")
def split_setup(msg: Message, context: Context) -> Message:
    """Split mode: what the server computed from the frozen base model for the client."""
    return answer(msg, context, lambda node: node.public(msg))


@app.train()
@app.train("split")  # split mode: the same exchange, one message further
def train(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda node: node.fit(msg))


@app.evaluate()
@app.evaluate("split")
def evaluate(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda node: node.evaluate(msg))


@app.evaluate("test")
@app.evaluate("test_split")
def test(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda node: node.test(msg))
