"""FedAvg (McMahan et al., 2017): one global adapter, replaced each round by the mean of the
participating clients' adapters weighted by their numbers of training samples."""

from __future__ import annotations

from typing import Any

from fellrec.strategies.base import ClientUpdate, Payload, Strategy, Tensors, weighted_mean


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(self, initial: Tensors, clients: list[str], **options: Any):
        super().__init__(initial, clients)
        self.global_ = {k: v.clone() for k, v in initial.items()}

    def configure_fit(self, rnd: int, client: str) -> Payload:
        return Payload(self.global_, {"share": True})

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        if updates:
            self.global_ = weighted_mean(updates)
        return {"weights": {u.client: u.num_examples for u in updates}}

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
