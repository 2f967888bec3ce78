"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025): the A matrices learn what the clients share and are averaged; the B matrices learn what
is each client's own and never leave it. Every other adapter tensor (the item-token head) is shared
and averaged as in FedAvg. A client sends back only the tensors it was sent (``upload: sent``), so
the B matrices' bytes are never counted; it validates and tests with the shared A and its own B."""

from __future__ import annotations

from typing import Any

from fellrec.strategies.base import ClientUpdate, Payload, Tensors
from fellrec.strategies.fedavg import FedAvg
from fellrec.strategies.lora_parts import is_b, only_sent


class FedSALoRA(FedAvg):
    name = "fedsa-lora"

    def __init__(self, initial: Tensors, clients: list[str], **options: Any):
        super().__init__({k: v for k, v in initial.items() if not is_b(k)}, clients)  # FedAvg of all but B

    def configure_fit(self, rnd: int, client: str) -> Payload:
        payload = super().configure_fit(rnd, client)
        return Payload(payload.tensors, {**payload.config, "upload": "sent"})

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        return super().aggregate(rnd, only_sent(self.name, updates, self.global_))
