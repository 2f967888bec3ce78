"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024): every
client keeps the A matrices frozen at their shared random initialisation and trains only B (and the
other adapter tensors), which are averaged. With one A for all, the mean of the clients' updates
B_k·A is the update of the mean B: aggregation is exact, and only half of LoRA's matrices travel.
The payload tells the client not to train A (``frozen``) and to send back only what it was sent."""

from __future__ import annotations

from typing import Any

from fellrec.strategies.base import ClientUpdate, Payload, Tensors
from fellrec.strategies.fedavg import FedAvg
from fellrec.strategies.lora_parts import LORA_A, is_a, only_sent


class FFALoRA(FedAvg):
    name = "ffa-lora"

    def __init__(self, initial: Tensors, clients: list[str], **options: Any):
        super().__init__({k: v for k, v in initial.items() if not is_a(k)}, clients)  # FedAvg of all but A

    def configure_fit(self, rnd: int, client: str) -> Payload:
        payload = super().configure_fit(rnd, client)
        return Payload(payload.tensors, {**payload.config, "upload": "sent", "frozen": LORA_A})

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        return super().aggregate(rnd, only_sent(self.name, updates, self.global_))
