"""The ClientApp: hands each message to this node's client of the run (an LLM client or a FedPA user;
plain or split), built in this process or kept by the client's worker (``fellrec.runtime.flower.worker``,
node config ``worker=true``). This file imports only Flower and fellrec's light modules: a deployed
SuperNode starts a process for every message."""

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fellrec.runtime.flower.state import client_id
from fellrec.runtime.flower.worker import answer

app = ClientApp()


@app.query("whoami")
def whoami(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"info": ConfigRecord({"client-id": client_id(context)})}), reply_to=msg)


@app.query()  # setup: the client's counts, names and initial adapter
@app.query("split")  # split mode: what the server computed from the frozen base model for the client
def setup(msg: Message, context: Context) -> Message:
    return answer(msg, context)


@app.train()
@app.train("split")  # split mode: the same exchange, one message further
def train(msg: Message, context: Context) -> Message:
    return answer(msg, context)


@app.evaluate()
@app.evaluate("split")
@app.evaluate("test")
@app.evaluate("test_split")
def evaluate(msg: Message, context: Context) -> Message:
    return answer(msg, context)
