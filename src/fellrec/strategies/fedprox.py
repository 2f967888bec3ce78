"""FedProx (Li et al., MLSys 2020): FedAvg's aggregation, and each client minimises its loss plus
(μ/2)·||w − w_global||², which keeps its local steps near the adapter it received. The client
trainer adds the term; this strategy only tells it μ."""

from __future__ import annotations

from typing import Any

from fellrec.strategies.base import Payload, Tensors
from fellrec.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, initial: Tensors, clients: list[str], prox_mu: float = 0.01, **options: Any):
        super().__init__(initial, clients)
        if prox_mu < 0:
            raise ValueError(f"prox_mu must not be negative, got {prox_mu}")
        self.mu = float(prox_mu)

    def configure_fit(self, rnd: int, client: str) -> Payload:
        payload = super().configure_fit(rnd, client)
        return Payload(payload.tensors, {**payload.config, "prox_mu": self.mu})
