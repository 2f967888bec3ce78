"""How the client's part and the server's trunk talk: messages of named tensors.

A message is a ``kind`` (``forward``, ``backward``, ``step``), the client's id, a request number and
named tensors. ``InProcessTransport`` really serialises every message both ways (safetensors, the
header carrying kind, client and request) and counts the bytes, so the in-process run measures what
a network would carry; the Flower runtime carries the same messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Protocol

from safetensors.torch import load as deserialise
from safetensors.torch import save as serialise
from torch import Tensor


@dataclass
class Message:
    kind: str
    client: str
    request: int
    tensors: dict[str, Tensor] = field(default_factory=dict)


class Server(Protocol):
    def handle(self, message: Message) -> Message: ...


class Transport(Protocol):
    def send(self, message: Message) -> Message: ...


def encode(message: Message) -> bytes:
    # the request number at a fixed width: a message's size depends on what it carries, not on how many
    # messages came before it (runtimes that number requests differently count the same bytes)
    header = {"kind": message.kind, "client": message.client, "request": f"{message.request:012d}"}
    tensors = {k: v.detach().contiguous() for k, v in message.tensors.items()}
    return serialise(tensors, metadata={"fellrec": json.dumps(header)})


def decode(data: bytes) -> Message:
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    meta = json.loads(header["__metadata__"]["fellrec"])
    return Message(meta["kind"], meta["client"], int(meta["request"]), deserialise(data))


class InProcessTransport:
    """Carries messages to a server in this process, serialised both ways, and counts the bytes."""

    def __init__(self, server: Server):
        self.server = server
        self.bytes_up = 0  # client -> server
        self.bytes_down = 0  # server -> client
        self.messages = 0

    def send(self, message: Message) -> Message:
        up = encode(message)
        self.bytes_up += len(up)
        reply = self.server.handle(decode(up))
        down = encode(reply)
        self.bytes_down += len(down)
        self.messages += 1
        return decode(down)


