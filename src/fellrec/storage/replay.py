"""Split execution when the client cannot wait for the server (Flower: a client only answers
messages, each maybe in a new process): the client runs its work as a *pass* over a
``ReplayTransport`` that answers each trunk request from the server replies it was given. A
request without a reply is queued for the server; with ``speculate``, a ``forward`` or ``backward``
gets a placeholder (NaN in training, 0 in evaluation) so that the pass goes on and queues the
requests that do not depend on it; a request that depends on a placeholder, a ``decode``, or
``max_bytes`` of queued requests stops the pass (``NeedReplies``). The caller sends the queued
requests and runs the pass again once the replies are there (the work must be deterministic:
``ReplayDiverged`` says when a request came back with other contents). docs/FLOWER.md tells the
whole story.
"""

from __future__ import annotations

import hashlib
import math

import torch

from fellrec.storage.transport import Message, encode

CONTENT_FREE = frozenset({"step", "reorder", "release"})
SPECULATIVE = frozenset({"forward", "backward"})
_ANSWER = {"forward": "hidden", "backward": "grad", "decode": "hidden"}  # the reply's tensor: the request's shape


class NeedReplies(Exception):
    """The pass cannot go on before the server answers the transport's ``pending`` requests."""


class ReplayDiverged(RuntimeError):
    """A request came again with other contents than the one the server answered."""


class ReplayTransport:
    def __init__(self, replies: dict[tuple[str, int], Message] | None = None, *, speculate: bool = True,
                 max_bytes: int = 256 << 20, sent: dict[tuple[str, int], dict] | None = None):
        self.replies = dict(replies or {})
        self.sent = sent or {}
        self.speculate, self.max_bytes = speculate, max_bytes
        self.pending: list[Message] = []
        self.pending_bytes = 0
        self.placeholders = 0
        self.stopped = False
        self.bytes_up = self.bytes_down = self.messages = 0

    def counts(self) -> tuple[int, int, int]:
        """(bytes up, bytes down, messages) carried so far."""
        return self.bytes_up, self.bytes_down, self.messages

    def restore_counts(self, counts: tuple[int, int, int]) -> None:
        """Go on counting from ``counts`` (what the exchange carried up to a checkpoint, in another process)."""
        self.bytes_up, self.bytes_down, self.messages = counts

    @property
    def clean(self) -> bool:
        """No placeholder handed out and nothing waiting for the server: what the pass computed so far
        is what the real exchange gives."""
        return self.placeholders == 0 and not self.pending

    def send(self, message: Message) -> Message:
        if self.stopped:
            raise NeedReplies
        up = len(encode(message))
        key = (message.kind, message.request)
        reply = self.replies.get(key)
        if reply is not None and key in self.sent and not same(fingerprint(message), self.sent[key]):
            raise ReplayDiverged(f"{message.kind} request {message.request} of client {message.client!r} differs "
                                 "from the one the server answered: the client's work is not deterministic")
        if reply is None:
            if message.kind in CONTENT_FREE:
                if self.placeholders and not _finite(message):
                    self._stop()  # a step's clipping factor from a stand-in reply
                reply = Message(message.kind, message.client, message.request, {})
                self._queue(message, up)
            else:
                if self.placeholders and not _finite(message):
                    self._stop()  # it depends on a placeholder
                self._queue(message, up)
                if not (self.speculate and message.kind in SPECULATIVE):
                    self._stop()
                self.placeholders += 1
                training = message.kind == "backward" or bool(message.tensors["train"].item())
                shape_of = message.tensors["hidden" if message.kind == "forward" else "grad"]
                reply = Message(message.kind, message.client, message.request,
                                {_ANSWER[message.kind]: torch.full_like(shape_of, float("nan") if training else 0.0)})
        self.bytes_up += up
        self.bytes_down += len(encode(reply))
        self.messages += 1
        return reply

    def _queue(self, message: Message, size: int) -> None:
        self.pending.append(message)
        self.pending_bytes += size
        if self.pending_bytes > self.max_bytes:
            self._stop()

    def _stop(self):
        self.stopped = True
        raise NeedReplies


def _finite(message: Message) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in message.tensors.values() if t.is_floating_point())


def fingerprint(message: Message) -> dict[str, list]:
    """What identifies a request's contents: shapes, exact integer tensors, and the sum and sum of
    squares of floating ones (recomputed activations may differ in the last bits on some devices)."""
    out = {}
    for name, t in sorted(message.tensors.items()):
        t = t.detach().cpu()
        if t.is_floating_point():
            x = t.double()
            out[name] = [list(t.shape), float(x.sum()), float((x * x).sum())]
        else:
            out[name] = [list(t.shape), hashlib.sha1(t.contiguous().numpy().tobytes()).hexdigest()]
    return out


def same(a: dict[str, list], b: dict[str, list], rel: float = 1e-4) -> bool:
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        y = b[name]
        if x[0] != y[0]:
            return False
        if isinstance(x[1], str) or isinstance(y[1], str):
            if x[1] != y[1]:
                return False
            continue
        n = max(1, math.prod(x[0]))
        scale = max(abs(x[2]), abs(y[2]))
        if not (abs(x[2] - y[2]) <= rel * scale + 1e-12 and abs(x[1] - y[1]) <= rel * (n * scale) ** 0.5 + 1e-12):
            return False
    return True
