"""Which adapter tensors are LoRA's A and B matrices (peft names them ``...lora_A.weight`` and
``...lora_B.weight``); the LoRA-aware strategies share or keep them apart."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from fellrec.strategies.base import ClientUpdate, Payload, Tensors
from fellrec.strategies.fedavg import FedAvg

LORA_A, LORA_B = ".lora_A.", ".lora_B."


def is_a(name: str) -> bool:
    return LORA_A in name


def is_b(name: str) -> bool:
    return LORA_B in name


def only_sent(strategy: str, updates: list, sent: dict) -> list:
    """``updates``, checked to hold only tensors the server sent (the others are the client's own)."""
    extra = sorted({k for u in updates for k in u.tensors if k not in sent})
    if extra:
        raise ValueError(f"{strategy}: a client sent tensors it was not sent (they stay on the client): {extra[:3]}")
    return updates


class SharedPart(FedAvg):
    """FedAvg over the adapter tensors that ``stays`` does not pick; those it picks stay on each client:
    never sent, and the client sends back only what it was sent (``upload: sent``). ``extra`` is what
    else the payload tells the client."""

    stays: ClassVar[Callable[[str], bool]]
    extra: ClassVar[dict[str, Any]] = {}

    def __init__(self, initial: Tensors, clients: list[str], **options: Any):
        super().__init__({k: v for k, v in initial.items() if not self.stays(k)}, clients)

    def configure_fit(self, rnd: int, client: str) -> Payload:
        payload = super().configure_fit(rnd, client)
        return Payload(payload.tensors, {**payload.config, "upload": "sent", **self.extra})

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        return super().aggregate(rnd, only_sent(self.name, updates, self.global_))


def layers(names) -> dict[str, tuple[str, str, str]]:
    """Each LoRA layer that has a residual (``fellrec.adapters.add_residuals``): its name -> the names
    of its A, B and residual ΔW tensors."""
    from fellrec.adapters import DELTA_W

    out = {}
    for name in names:
        if name.endswith(DELTA_W):
            layer = name.removesuffix(DELTA_W)
            a, b = f"{layer}{LORA_A}weight", f"{layer}{LORA_B}weight"
            if a not in names or b not in names:
                raise ValueError(f"residual {name} has no LoRA A and B beside it")
            out[layer] = (a, b, name)
    return out


def stack(As: list[Tensor], Bs: list[Tensor], weights: list[float]) -> tuple[Tensor, Tensor]:
    """FLoRA's stacking: A's rows [w_1 A_1; w_2 A_2; ...] and B's columns [B_1, B_2, ...], so that
    B_stack @ A_stack = Σ_k w_k B_k A_k. The clients' ranks may differ."""
    if not (len(As) == len(Bs) == len(weights)) or not As:
        raise ValueError("stack needs one A, one B and one weight per client")
    for a, b in zip(As, Bs, strict=True):
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"a client's A has rank {a.shape[0]}, its B {b.shape[1]}")
    a = torch.cat([w * x.to(torch.float64) for w, x in zip(weights, As, strict=True)], dim=0)
    b = torch.cat([x.to(torch.float64) for x in Bs], dim=1)
    return a, b

