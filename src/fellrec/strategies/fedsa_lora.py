"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025): the A matrices learn what the clients share and are averaged; the B matrices learn what
is each client's own and never leave it. Every other adapter tensor (the item-token head) is shared
and averaged as in FedAvg. A client sends back only the tensors it was sent (``upload: sent``), so
the B matrices' bytes are never counted; it validates and tests with the shared A and its own B."""

from __future__ import annotations

from typing import Any

from fellrec.strategies.base import ClientUpdate, Payload, Strategy, Tensors
from fellrec.strategies.fedavg import FedAvg
from fellrec.strategies.lora_parts import is_b, only_sent


class FedSALoRA(Strategy):
    name = "fedsa-lora"

    def __init__(self, initial: Tensors, clients: list[str], **options: Any):
        super().__init__(initial, clients)
        self.avg = FedAvg({k: v for k, v in initial.items() if not is_b(k)}, clients)  # FedAvg of all but B

    def configure_fit(self, rnd: int, client: str) -> Payload:
        payload = self.avg.configure_fit(rnd, client)
        return Payload(payload.tensors, {**payload.config, "upload": "sent"})

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        return self.avg.aggregate(rnd, only_sent(self.name, updates, self.avg.global_tensors()))

    def configure_evaluate(self, client: str) -> Payload:
        return self.avg.configure_evaluate(client)

    def global_tensors(self) -> Tensors:
        return self.avg.global_tensors()

    def state(self) -> Tensors:
        return self.avg.state()

    def load_state(self, tensors: Tensors) -> None:
        self.avg.load_state(tensors)
