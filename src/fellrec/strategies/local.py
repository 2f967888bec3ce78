"""Local-only training: every client trains its own adapter on its own data and nothing is
aggregated or sent. The lower bound a federation has to beat."""

from __future__ import annotations

from typing import Any

from fellrec.strategies.base import ClientUpdate, Payload, Strategy


class Local(Strategy):
    name = "local"
    communicates = False

    def configure_fit(self, rnd: int, client: str) -> Payload:
        return Payload({}, {"share": False})  # the client trains on from its private adapter

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        return {}

    def configure_evaluate(self, client: str) -> Payload:
        return Payload({})
