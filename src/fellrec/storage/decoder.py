"""The client side of split execution: a decoder that runs the head and the tail here and the
trunk through a transport, inside one autograd graph.

``SplitDecoder`` is called like the whole model's decoder stack (``input_ids``, ``attention_mask``)
and returns the last hidden layer, so the backbones (ranker, BIGRec) run on it unchanged;
``loss.backward()`` sends the gradient at the trunk's output to the server and continues with the
gradient it gets back. Labels, tokens and the loss never leave the client: only hidden states at
the cut, the padding mask and positions go up, hidden states and gradients come back.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch
from torch import Tensor

from fellrec.storage.parts import ClientPart, positions
from fellrec.storage.transport import Message, Transport


class _Trunk(torch.autograd.Function):
    """h_k -> the server's trunk -> h_{L-tail}; backward asks the server for the gradient at h_k."""

    @staticmethod
    def forward(ctx, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor, link: SplitDecoder) -> Tensor:
        request = next(link.requests)
        train = torch.is_grad_enabled() or hidden.requires_grad
        reply = link.transport.send(Message("forward", link.client, request, {
            "hidden": hidden, "attention_mask": attention_mask, "position_ids": position_ids,
            "train": torch.tensor(int(train))}))
        ctx.link, ctx.request = link, request
        link.trunk_prox = reply.tensors.get("prox")  # FedProx: the trunk part's term, when the server has one
        return reply.tensors["hidden"].to(hidden.device)

    @staticmethod
    def backward(ctx, grad: Tensor):
        link = ctx.link
        reply = link.transport.send(Message("backward", link.client, ctx.request, {"grad": grad}))
        # the trunk adapter's squared gradient norm so far (a stand-in reply has none: unknown)
        link.trunk_sq_norm = reply.tensors.get("sq_norm", torch.tensor(float("nan"), dtype=torch.float64))
        return reply.tensors["grad"].to(grad.device), None, None, None


class SplitDecoder(torch.nn.Module):
    def __init__(self, part: ClientPart, transport: Transport, client: str):
        super().__init__()
        self.part = part
        self.transport = transport
        self.client = client
        self.requests = itertools.count()
        self.sessions = itertools.count()  # generation sessions (the trunk's key/value caches on the server)
        self.trunk_sq_norm: Tensor | None = None  # from the last backward reply of the current step
        self.trunk_prox: Tensor | None = None  # from the last training forward's reply

    def restart(self, request: int = 0) -> None:
        """Number this client's trunk requests from ``request`` on (and its generation sessions from 0)."""
        self.requests = itertools.count(request)
        self.sessions = itertools.count()

    def next_request(self) -> int:
        """The number the next trunk request will get."""
        following = next(self.requests)
        self.requests = itertools.count(following)
        return following

    def forward(self, input_ids: Tensor, attention_mask: Tensor, use_cache: bool = False, **_) -> SimpleNamespace:
        pos = positions(attention_mask)
        return self._rest(self.part.run_head(input_ids, attention_mask, pos), attention_mask, pos)

    def forward_from(self, hidden: Tensor, attention_mask: Tensor, start: int) -> SimpleNamespace:
        """From hidden states at block ``start`` (<= k, on this client): the head's blocks from there,
        the trunk, the tail (a backbone that feeds its own input vectors, ``fellrec.backbones.item_tokens``)."""
        pos = positions(attention_mask)
        return self._rest(self.part.run_head_from(hidden, attention_mask, pos, start), attention_mask, pos)

    def _rest(self, h: Tensor, attention_mask: Tensor, pos: Tensor) -> SimpleNamespace:
        if torch.is_grad_enabled() and not h.requires_grad:
            # nothing trainable before the cut (k = 0, or no adapter there): a leaf that wants a
            # gradient still makes autograd call the trunk's backward, which trains the trunk adapter
            h = h.detach().requires_grad_(True)
        h = _Trunk.apply(h, attention_mask, pos, self)
        return SimpleNamespace(last_hidden_state=self.part.run_tail(h, attention_mask, pos))

    def step(self, scale: Tensor | None = None) -> None:
        """Tell the server to apply this client's trunk optimizer (after the local optimizer step),
        its gradient multiplied by ``scale`` first (clipping of the whole adapter's gradient)."""
        tensors = {} if scale is None else {"scale": scale}
        self.transport.send(Message("step", self.client, next(self.requests), tensors))
        self.trunk_sq_norm = None
