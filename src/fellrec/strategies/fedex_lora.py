"""FedEx-LoRA (Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning
of Foundation Models", ACL 2025): A and B are averaged as in FedAvg, and the error this makes, the
residual mean(B_k·A_k) − mean(B_k)·mean(A_k), is folded into the frozen weights (the residual ΔW of
``fellrec.adapters.add_residuals``). The global model's effective weight W0 + ΔW + s·B̄Ā is then
exactly the sample-weighted mean of the clients' effective weights W0 + ΔW + s·B_k A_k
(s = lora alpha / r).

Every client trains from the mean A, the mean B, the global residual and the mean of the other
adapter tensors (the item-token head); it sends back all but the residual, which only the server
changes. Bytes: the residual travels whole (d_out × d_in per layer) every round.
"""

from __future__ import annotations

from typing import Any

import torch

from fellrec.adapters import is_residual
from fellrec.strategies.base import ClientUpdate, GlobalAdapter, Payload, Tensors, sample_shares, weighted_mean
from fellrec.strategies.lora_parts import layers


class FedExLoRA(GlobalAdapter):
    name = "fedex-lora"

    def __init__(self, initial: Tensors, clients: list[str], lora_scale: float = 2.0, **options: Any):
        super().__init__(initial, clients)
        self.layers = layers(initial)
        if not self.layers:
            raise ValueError("fedex-lora needs residuals on the LoRA layers (fellrec.adapters.add_residuals)")
        self.scale = float(lora_scale)

    def configure_fit(self, rnd: int, client: str) -> Payload:
        return Payload(self.global_, {"share": True})

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        if not updates:
            return {}
        shares = sample_shares(updates)
        new = weighted_mean(updates, skip=is_residual)  # A, B and the rest: FedAvg
        norms = []
        for a, b, delta in self.layers.values():
            mean_product = sum(w * u.tensors[b].to(torch.float64) @ u.tensors[a].to(torch.float64)
                               for w, u in zip(shares, updates, strict=True))
            residual = mean_product - new[b].to(torch.float64) @ new[a].to(torch.float64)
            new[delta] = (self.global_[delta].to(torch.float64) + self.scale * residual).to(self.global_[delta].dtype)
            norms.append(float(self.scale * residual.norm()))
        self.global_ = new
        return {"weights": {u.client: u.num_examples for u in updates}, "residual_norm": sum(norms)}
