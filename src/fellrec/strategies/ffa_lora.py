"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024): every
client keeps the A matrices frozen at their shared random initialisation and trains only B (and the
other adapter tensors), which are averaged. With one A for all, the mean of the clients' updates
B_k·A is the update of the mean B: aggregation is exact, and only half of LoRA's matrices travel.
The payload tells the client not to train A (``frozen``) and to send back only what it was sent."""

from __future__ import annotations

from typing import Any

from fellrec.strategies.base import ClientUpdate, Payload, Strategy, Tensors, weighted_mean
from fellrec.strategies.lora_parts import LORA_A, is_a


class FFALoRA(Strategy):
    name = "ffa-lora"

    def __init__(self, initial: Tensors, clients: list[str], **options: Any):
        super().__init__(initial, clients)
        self.shared = {k: v.clone() for k, v in initial.items() if not is_a(k)}

    def configure_fit(self, rnd: int, client: str) -> Payload:
        return Payload(self.shared, {"share": True, "upload": "sent", "frozen": LORA_A})

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        if updates:
            extra = sorted(k for u in updates for k in u.tensors if k not in self.shared)
            if extra:
                raise ValueError(f"ffa-lora: a client sent tensors it was not sent (A is frozen): {extra[:3]}")
            self.shared = weighted_mean(updates)
        return {"weights": {u.client: u.num_examples for u in updates}}

    def configure_evaluate(self, client: str) -> Payload:
        return Payload(self.shared)

    def global_tensors(self) -> Tensors:
        return self.shared

    def state(self) -> Tensors:
        return dict(self.shared)

    def load_state(self, tensors: Tensors) -> None:
        if tensors.keys() != self.shared.keys():
            raise ValueError("checkpoint's shared tensors do not match the model's adapter")
        self.shared = dict(tensors)
