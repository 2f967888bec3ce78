"""FedAvg (McMahan et al., 2017): one global adapter, replaced each round by the mean of the
participating clients' adapters weighted by their numbers of training samples."""

from __future__ import annotations

from typing import Any

from fellrec.strategies.base import ClientUpdate, GlobalAdapter, Payload, weighted_mean


class FedAvg(GlobalAdapter):
    name = "fedavg"

    def configure_fit(self, rnd: int, client: str) -> Payload:
        return Payload(self.global_, {"share": True})

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        if updates:
            self.global_ = weighted_mean(updates)
        return {"weights": {u.client: u.num_examples for u in updates}}
