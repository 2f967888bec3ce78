"""FLoRA (Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024): every round each client trains a fresh LoRA adapter from the current
global model; the server stacks the clients' A matrices (scaled by their sample shares) and their B
matrices, whose product is exactly Σ_k p_k B_k A_k, and folds it into the frozen weights (the
residual ΔW of ``fellrec.adapters.add_residuals``). Averaging A and B apart, as FedAvg does, would
give mean(B)·mean(A) instead, which is not the mean update. Stacking allows a different rank per
client (``lora_parts.stack``); our backbones give every client the same one.

In round t each client gets the global residual, a newly drawn A (peft's initialisation,
U(−1/√d_in, 1/√d_in), its own per client and round) and B = 0, and the global mean of every other
adapter tensor (the item-token head); it sends back all but the residual. Validation and test use
the global model: the residual with B = 0. Bytes: the residual travels whole (d_out × d_in per
layer); sending the round's stacked factors instead would be (Σ_k r_k)(d_in + d_out) per layer.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from fellrec.adapters import is_residual
from fellrec.strategies.base import ClientUpdate, GlobalAdapter, Payload, Tensors, sample_shares, weighted_mean
from fellrec.strategies.lora_parts import is_a, is_b, layers, stack


class FLoRA(GlobalAdapter):
    name = "flora"

    def __init__(self, initial: Tensors, clients: list[str], lora_scale: float = 2.0, seed: int = 0,
                 **options: Any):
        super().__init__(initial, clients)
        self.layers = layers(initial)
        if not self.layers:
            raise ValueError("flora needs residuals on the LoRA layers (fellrec.adapters.add_residuals)")
        self.scale, self.seed = float(lora_scale), int(seed)
        for _, b, _ in self.layers.values():
            self.global_[b] = torch.zeros_like(initial[b])

    def fresh_a(self, rnd: int, client: str, like: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{rnd}/{client}".encode()))
        bound = like.shape[1] ** -0.5
        return (torch.rand(like.shape, generator=g, dtype=torch.float64) * 2 - 1).mul(bound).to(like.dtype)

    def configure_fit(self, rnd: int, client: str) -> Payload:
        tensors = dict(self.global_)
        for a, _, _ in self.layers.values():
            tensors[a] = self.fresh_a(rnd, client, self.global_[a])
        return Payload(tensors, {"share": True})

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        if not updates:
            return {}
        shares = sample_shares(updates)
        new = weighted_mean(updates, skip=lambda k: is_a(k) or is_b(k) or is_residual(k))
        rank = 0
        for a, b, delta in self.layers.values():
            a_stack, b_stack = stack([u.tensors[a] for u in updates], [u.tensors[b] for u in updates], shares)
            rank = a_stack.shape[0]
            new[delta] = (self.global_[delta].to(torch.float64) + self.scale * b_stack @ a_stack).to(
                self.global_[delta].dtype)
            new[a], new[b] = self.global_[a], self.global_[b]  # B stays 0: the global model is W0 + ΔW
        self.global_ = new
        return {"weights": {u.client: u.num_examples for u in updates}, "stacked_rank": rank}
