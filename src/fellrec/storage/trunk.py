"""The server side of split execution: the trunk, with one trunk adapter per client.

Training: ``forward`` runs the trunk on the client's hidden states (keeping the graph),
``backward`` takes the gradient at the trunk's output, back-propagates through the trunk and
returns the gradient at its input (the trunk adapter's gradients accumulate) with the squared norm
of the trunk adapter's gradient so far (``sq_norm``), and ``step`` applies the client's trunk
optimizer and zeroes them. Gradient clipping is over the whole adapter, as unsplit: the client adds
its own squared norm to the trunk's, and its ``step`` carries the factor (``scale``) both sides
multiply their gradients by. FedProx (``prox_mu`` at ``reset_optimizer``): the proximal term of
the trunk's part, μ/2·||w − w_start||², is the server's: its gradient is added at the step (and in
the norm the backward reports), its value comes with each training forward (``prox``) for the
client's loss. Generation: ``decode`` runs the trunk keeping its
key/value cache per (client, session) until ``release``; ``reorder`` follows the beams the client
kept. The client drives everything. Requests of one client are served in order; the trunk adapter
is swapped in per request, so one trunk serves every client.

A forward or decode request that carries ``adapter = 0`` runs the trunk with its LoRA layers off
(the base model: what ``disable_adapter`` gives when the trunk is in another process).

``TrunkServer`` keeps one set of adapter weights and swaps each client's values in: a client's
forward and backward must not be interleaved with another client's (the embedded runtime trains
one client after the other). ``ConcurrentTrunkServer`` gives each client its own parameter
objects instead, so the graphs of several clients can wait for their backward at once (the Flower
runtime, where every client trains at the same time).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor
from transformers import DynamicCache

from fellrec.storage.parts import TrunkPart, adapter_of, adapters_off, copy_into, load_adapter, whole_name
from fellrec.storage.transport import Message


class TrunkServer:
    def __init__(self, trunk: TrunkPart, make_optimizer: Callable[[list[torch.nn.Parameter]], object] | None = None):
        self.trunk = trunk
        self.params = [p for p in trunk.parameters() if p.requires_grad]
        self.initial = adapter_of(trunk)
        self.adapters: dict[str, dict[str, Tensor]] = {}
        self.make_optimizer = make_optimizer
        self.optimizers: dict[str, object] = {}
        self.pending: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
        self.loaded: str | None = None
        self.sessions: dict[tuple[str, int], DynamicCache] = {}  # generation: trunk key/value caches
        self.prox: dict[str, tuple[float, list[Tensor]]] = {}  # FedProx: (μ, the trunk adapter at the start)

    def adapter(self, client: str) -> dict[str, Tensor]:
        """The client's trunk adapter (the common initial one until it trains)."""
        if self.loaded == client:
            self.adapters[client] = adapter_of(self.trunk)
        return self.adapters.get(client, self.initial)

    def set_adapter(self, client: str, tensors: dict[str, Tensor]) -> None:
        """Replace the client's trunk adapter (after aggregation)."""
        self.adapters[client] = {k: v.clone() for k, v in tensors.items()}
        if self.loaded == client:
            self.loaded = None

    def reset_optimizer(self, client: str, make: Callable | None, prox_mu: float = 0.0) -> None:
        """A fresh trunk optimizer for ``client`` (``make(params) -> (optimizer, scheduler or None)``);
        with ``prox_mu`` > 0, FedProx's term pulls the trunk adapter towards what it is now."""
        self.optimizers.pop(client, None)
        self.prox.pop(client, None)
        if make is not None:
            self.optimizers[client] = make(self._params(client))
        if prox_mu > 0:
            self._load(client)  # the client's values in the parameters _params gives
            self.prox[client] = (float(prox_mu), [p.detach().clone() for p in self._params(client)])

    def _prox_grads(self, client: str, params: list[torch.nn.Parameter]) -> list[Tensor] | None:
        """μ·(w − w_start) of each trunk tensor (FedProx's gradient), or None without FedProx."""
        if client not in self.prox:
            return None
        mu, start = self.prox[client]
        return [mu * (p.detach() - a.to(p.device)) for p, a in zip(params, start, strict=True)]

    def _params(self, client: str) -> list[torch.nn.Parameter]:
        """The parameters ``client``'s trunk adapter trains (here: the trunk's, shared)."""
        return self.params

    def _load(self, client: str) -> None:
        if self.loaded != client:
            if self.loaded is not None:
                self.adapters[self.loaded] = adapter_of(self.trunk)
            load_adapter(self.trunk, self.adapters.get(client, self.initial))
            self.loaded = client

    def handle(self, message: Message) -> Message:
        c, r = message.client, message.request
        if message.kind == "forward":
            self._load(c)
            t = message.tensors
            train = bool(t["train"].item())
            hidden = t["hidden"].requires_grad_(train)
            with torch.set_grad_enabled(train), _adapter(self.trunk, t):
                out = self.trunk(hidden, t["attention_mask"], t["position_ids"])
            reply = {"hidden": out.detach()}
            if train:
                self.pending[(c, r)] = (hidden, out)
                if c in self.prox:  # the value of the trunk's proximal term, μ/2·||w − w_start||²
                    mu, start = self.prox[c]
                    moved = [p.detach() - a.to(p.device) for p, a in zip(self._params(c), start, strict=True)]
                    reply["prox"] = mu / 2 * squared_norm_of(moved)
            return Message("forward", c, r, reply)
        if message.kind == "backward":
            self._load(c)
            hidden, out = self.pending.pop((c, r))
            out.backward(message.tensors["grad"])
            params = self._params(c)
            grads = [p.grad for p in params if p.grad is not None]
            prox = self._prox_grads(c, params)
            if prox is not None:  # the norm of the step's whole gradient, the proximal term's included
                grads = [g + q if g is not None else q for g, q in zip((p.grad for p in params), prox, strict=True)]
            return Message("backward", c, r, {"grad": hidden.grad, "sq_norm": squared_norm_of(grads)})
        if message.kind == "decode":  # generation: the trunk's key/value cache stays here, per session
            self._load(c)
            t = message.tensors
            key = (c, int(t["session"].item()))
            if key not in self.sessions:
                self.sessions[key] = DynamicCache(config=self.trunk.config)
            with torch.no_grad(), _adapter(self.trunk, t):
                out = self.trunk(t["hidden"], t["attention_mask"], t["position_ids"], cache=self.sessions[key])
            return Message("decode", c, r, {"hidden": out})
        if message.kind == "reorder":  # beam search kept these rows
            t = message.tensors
            self.sessions[(c, int(t["session"].item()))].reorder_cache(t["beam_idx"])
            return Message("reorder", c, r, {})
        if message.kind == "release":
            self.sessions.pop((c, int(message.tensors["session"].item())), None)
            return Message("release", c, r, {})
        if message.kind == "step":
            self._load(c)
            params = self._params(c)
            if c not in self.optimizers and self.make_optimizer is not None:
                self.optimizers[c] = self.make_optimizer(params)
            optimizer = self.optimizers.get(c)
            if optimizer is not None:
                optimizer, scheduler = optimizer if isinstance(optimizer, tuple) else (optimizer, None)
                prox = self._prox_grads(c, params)
                if prox is not None:
                    for p, q in zip(params, prox, strict=True):
                        p.grad = q.clone() if p.grad is None else p.grad.add_(q)
                if "scale" in message.tensors:  # the whole adapter's gradient clipped (the client's factor)
                    scale = message.tensors["scale"].to(torch.float32)
                    for p in params:
                        if p.grad is not None:
                            p.grad.mul_(scale.to(p.grad.device))
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            for p in params:
                p.grad = None
            return Message("step", c, r, {})
        raise ValueError(f"unknown message kind {message.kind!r}")


def squared_norm(params) -> Tensor:
    """Σ ||grad||² over ``params`` (float64): one side's share of the whole adapter's gradient norm."""
    return squared_norm_of([p.grad for p in params if p.grad is not None])


def squared_norm_of(tensors) -> Tensor:
    """Σ ||t||² over ``tensors``, in float64 on the CPU."""
    parts = [t.detach().double().pow(2).sum() for t in tensors]
    return torch.stack(parts).sum().cpu() if parts else torch.zeros((), dtype=torch.float64)


def _adapter(trunk: TrunkPart, tensors: dict[str, Tensor]):
    """The trunk's LoRA layers off for a request that says ``adapter = 0``."""
    if "adapter" in tensors and not bool(tensors["adapter"].item()):
        return adapters_off(trunk)
    return nullcontext()


class ConcurrentTrunkServer(TrunkServer):
    """A ``TrunkServer`` whose clients each own their trunk adapter's parameter objects.

    ``_load`` puts the client's parameters into the trunk's LoRA layers (it swaps the objects, never
    their values), so a graph kept for one client's backward still holds that client's weights, and
    its gradients accumulate in them, whatever other clients ran since. Each client's optimizer
    works on its own parameters.
    """

    def __init__(self, trunk: TrunkPart, make_optimizer: Callable | None = None):
        super().__init__(trunk, make_optimizer)
        self.slots = {whole_name(f"{m}.{n}" if m else n): (module, n)
                      for m, module in trunk.named_modules() for n, p in module.named_parameters(recurse=False)
                      if p.requires_grad}
        self.weights: dict[str, dict[str, torch.nn.Parameter]] = {}

    def _own(self, client: str) -> dict[str, torch.nn.Parameter]:
        if client not in self.weights:
            device = self.params[0].device if self.params else None
            self.weights[client] = {k: torch.nn.Parameter(v.to(device, copy=True)) for k, v in self.initial.items()}
        return self.weights[client]

    def _params(self, client: str) -> list[torch.nn.Parameter]:
        return list(self._own(client).values())

    def adapter(self, client: str) -> dict[str, Tensor]:
        if client not in self.weights:
            return self.initial
        return {k: p.detach().to("cpu", copy=True) for k, p in self.weights[client].items()}

    def set_adapter(self, client: str, tensors: dict[str, Tensor]) -> None:
        copy_into(self._own(client), tensors, "trunk adapter tensors missing")

    def drop(self, client: str) -> None:
        """Forget ``client``'s graphs, caches, gradients and optimizer (an exchange that was cut short)."""
        for key in [k for k in self.pending if k[0] == client]:
            del self.pending[key]
        for key in [k for k in self.sessions if k[0] == client]:
            del self.sessions[key]
        for p in self.weights.get(client, {}).values():
            p.grad = None
        self.optimizers.pop(client, None)

    def _load(self, client: str) -> None:
        if self.loaded != client:
            for name, p in self._own(client).items():
                module, attr = self.slots[name]
                module._parameters[attr] = p
            self.loaded = client
