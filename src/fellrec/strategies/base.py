"""The seams between server and clients: what travels (``Payload``, ``ClientUpdate``), the server-side
``Strategy`` every algorithm is, and the ``ClientTrainer`` every client side is.

A Strategy is pure tensor math: it decides what each client receives (a ``Payload``) and turns
the clients' ``ClientUpdate``s into new adapter state. It never sees a model, a file or a
transport, so the embedded runtime and the Flower runtime drive the same code.

Tensors are ``dict[str, Tensor]`` keyed by the portable adapter names of ``fellrec.adapters``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

Tensors = dict[str, Tensor]


@dataclass
class Payload:
    """What the server sends one client: tensors to load over the client's own, and instructions.

    ``config`` keys the client trainer understands: ``share`` (bool: send the adapter back),
    ``upload`` (``sent``: send back only the tensors this payload holds, the others are the
    client's own), ``frozen`` (a part of a tensor name, e.g. ``.lora_A.``: do not train those),
    ``prox_mu`` (float: FedProx's proximal weight, measured against ``tensors``).
    """

    tensors: Tensors = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """All a client sends back after local training (plain mode)."""

    client: str
    tensors: Tensors
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class ClientTrainer(Protocol):
    """The client side of every algorithm (``fellrec.trainer.AdapterTrainer`` for the LLM backbones,
    ``fellrec.fedpa.trainer.FedPATrainer`` for FedPA): it owns the client's data and private state.

    ``test(samples)`` scores the client's selected adapter (its best validated round) on ``samples``,
    one value per sample and metric; a trainer that owns its test data (FedPA's users) takes None.
    ``state``/``load_state`` are what a checkpoint keeps of it.
    """

    client: str
    steps_per_round: int
    best_round: int

    def fit(self, payload: Payload, rnd: int, on_step: Callable[[int, float], None] | None = None) -> ClientUpdate: ...

    def evaluate(self, payload: Payload, rnd: int) -> dict[str, float]: ...

    def test(self, samples: Any) -> dict[str, Any]: ...

    def state(self) -> tuple[Tensors, dict[str, Any]]: ...

    def load_state(self, tensors: Tensors, meta: dict[str, Any]) -> None: ...

    def selected(self) -> Tensors:
        """What the client may send of the adapter its test used (nothing where it has none of its own)."""


class Strategy:
    """Server side of one algorithm. Subclasses override what differs.

    ``clients`` are the ids of every client that will ever train. ``initial`` is the common
    starting adapter (every client starts from the same one, as FELLRec's code does).
    ``communicates`` is False where nothing really travels (local training, the centralized
    upper bound), so the runtime counts no bytes.
    """

    name = "strategy"
    communicates = True

    def __init__(self, initial: Tensors, clients: list[str], **options: Any):
        self.clients = list(clients)

    def configure_fit(self, rnd: int, client: str) -> Payload:
        """The payload ``client`` trains from in round ``rnd`` (1-based)."""
        raise NotImplementedError

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        """Fold the round's updates into the server state; returns what to log for the round."""
        raise NotImplementedError

    def configure_evaluate(self, client: str) -> Payload:
        """The payload ``client`` validates and tests with (its current adapter)."""
        raise NotImplementedError

    def global_tensors(self) -> Tensors | None:
        """The one global adapter, for algorithms that have one."""
        return None

    # ---- checkpoints -------------------------------------------------------------------------

    def state(self) -> Tensors:
        """Everything needed to continue after a restart, as named tensors."""
        return {}

    def load_state(self, tensors: Tensors) -> None:
        if tensors:
            raise ValueError(f"{self.name} keeps no state, got {sorted(tensors)[:3]}")


class GlobalAdapter(Strategy):
    """A strategy with one global adapter (``global_``), which every client validates and tests with and
    which is all a checkpoint keeps; subclasses say what a client trains from and how updates fold in."""

    def __init__(self, initial: Tensors, clients: list[str], **options: Any):
        super().__init__(initial, clients)
        self.global_ = {k: v.clone() for k, v in initial.items()}

    def configure_evaluate(self, client: str) -> Payload:
        return Payload(self.global_)

    def global_tensors(self) -> Tensors:
        return self.global_

    def state(self) -> Tensors:
        return dict(self.global_)

    def load_state(self, tensors: Tensors) -> None:
        if tensors.keys() != self.global_.keys():
            raise ValueError("checkpoint's global adapter does not match the model's adapter")
        self.global_ = dict(tensors)


def sample_shares(updates: list[ClientUpdate]) -> list[float]:
    """n_k / Σ_k n_k over the updates (n_k = ``num_examples``): FedAvg's weights."""
    if not updates:
        raise ValueError("sample shares need at least one update")
    counts = [float(u.num_examples) for u in updates]
    if any(n < 0 for n in counts) or sum(counts) <= 0:
        raise ValueError(f"sample shares need non-negative sample counts with a positive sum, got {counts}")
    return [n / sum(counts) for n in counts]


def weighted_mean(updates: list[ClientUpdate], skip: Callable[[str], bool] | None = None) -> Tensors:
    """Σ_k n_k θ_k / Σ_k n_k over the updates, tensor by tensor (n_k = ``num_examples``), leaving out
    the tensors whose name ``skip`` picks.

    The sum runs in float64 so the result does not depend on the order of the clients.
    """
    weights = sample_shares(updates)
    names = updates[0].tensors.keys()
    for u in updates[1:]:
        if u.tensors.keys() != names:
            raise ValueError(f"client {u.client} sent other tensors than client {updates[0].client}")
    out = {}
    for name in names:
        if skip is not None and skip(name):
            continue
        acc = sum(w * u.tensors[name].to(torch.float64) for w, u in zip(weights, updates, strict=True))
        out[name] = acc.to(updates[0].tensors[name].dtype)
    return out
