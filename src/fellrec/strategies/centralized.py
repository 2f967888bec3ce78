"""The centralized upper bound: one adapter trained on the union of every client's training samples.

The runtime trains a single pooled trainer (id ``"all"``); the server state is its adapter, which
every client validates and tests with. Nothing crosses a network in this setting, so no bytes are
counted.
"""

from __future__ import annotations

from typing import Any

from fellrec.strategies.base import ClientUpdate, Payload, Strategy, Tensors

POOLED = "all"


class Centralized(Strategy):
    name = "centralized"
    communicates = False

    def __init__(self, initial: Tensors, clients: list[str], **options: Any):
        super().__init__(initial, clients)
        self.adapter = {k: v.clone() for k, v in initial.items()}

    def configure_fit(self, rnd: int, client: str) -> Payload:
        return Payload(self.adapter, {"share": True})

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        if [u.client for u in updates] != [POOLED]:
            raise ValueError(f"centralized training takes one update from the pooled trainer, got "
                             f"{[u.client for u in updates]}")
        self.adapter = dict(updates[0].tensors)
        return {}

    def configure_evaluate(self, client: str) -> Payload:
        return Payload(self.adapter)

    def global_tensors(self) -> Tensors:
        return self.adapter

    def state(self) -> Tensors:
        return dict(self.adapter)

    def load_state(self, tensors: Tensors) -> None:
        if tensors.keys() != self.adapter.keys():
            raise ValueError("checkpoint's adapter does not match the model's adapter")
        self.adapter = dict(tensors)
