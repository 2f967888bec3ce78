"""The centralized upper bound: one adapter trained on the union of every client's training samples.

The runtime trains a single pooled trainer (id ``"all"``); the server state is its adapter, which
every client validates and tests with. Nothing crosses a network in this setting, so no bytes are
counted.
"""

from __future__ import annotations

from typing import Any

from fellrec.strategies.base import ClientUpdate, GlobalAdapter, Payload

POOLED = "all"


class Centralized(GlobalAdapter):
    name = "centralized"
    communicates = False

    def configure_fit(self, rnd: int, client: str) -> Payload:
        return Payload(self.global_, {"share": True})

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        if [u.client for u in updates] != [POOLED]:
            raise ValueError(f"centralized training takes one update from the pooled trainer, got "
                             f"{[u.client for u in updates]}")
        self.global_ = dict(updates[0].tensors)
        return {}
