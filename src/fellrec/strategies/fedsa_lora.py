"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025): the A matrices learn what the clients share and are averaged; the B matrices learn what
is each client's own and never leave it. Every other adapter tensor (the item-token head) is shared
and averaged as in FedAvg. A client sends back only the tensors it was sent (``upload: sent``), so
the B matrices' bytes are never counted."""

from __future__ import annotations

from typing import Any

from fellrec.strategies.base import ClientUpdate, Payload, Strategy, Tensors, weighted_mean
from fellrec.strategies.lora_parts import is_b


class FedSALoRA(Strategy):
    name = "fedsa-lora"

    def __init__(self, initial: Tensors, clients: list[str], **options: Any):
        super().__init__(initial, clients)
        self.shared = {k: v.clone() for k, v in initial.items() if not is_b(k)}

    def configure_fit(self, rnd: int, client: str) -> Payload:
        return Payload(self.shared, {"share": True, "upload": "sent"})

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        if updates:
            kept = sorted(k for u in updates for k in u.tensors if k not in self.shared)
            if kept:
                raise ValueError(f"fedsa-lora: a client sent tensors it keeps to itself: {kept[:3]}")
            self.shared = weighted_mean(updates)
        return {"weights": {u.client: u.num_examples for u in updates}}

    def configure_evaluate(self, client: str) -> Payload:
        return Payload(self.shared)  # the client validates with the shared A and its own B

    def global_tensors(self) -> Tensors:
        return self.shared

    def state(self) -> Tensors:
        return dict(self.shared)

    def load_state(self, tensors: Tensors) -> None:
        if tensors.keys() != self.shared.keys():
            raise ValueError("checkpoint's shared tensors do not match the model's adapter")
        self.shared = dict(tensors)
