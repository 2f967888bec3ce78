"""Server-side algorithms, one file each, in one registry; ``make_strategy`` builds one by its name
(each takes the options it knows from ``options`` and ignores the others)."""

from __future__ import annotations

from typing import Any

from fellrec.strategies.base import ClientTrainer, ClientUpdate, Payload, Strategy, Tensors, weighted_mean
from fellrec.strategies.centralized import POOLED, Centralized
from fellrec.strategies.fedavg import FedAvg
from fellrec.strategies.fedex_lora import FedExLoRA
from fellrec.strategies.fedpa import FedPA
from fellrec.strategies.fedprox import FedProx
from fellrec.strategies.fedsa_lora import FedSALoRA
from fellrec.strategies.fellrec import FELLRec
from fellrec.strategies.ffa_lora import FFALoRA
from fellrec.strategies.flora import FLoRA
from fellrec.strategies.local import Local

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (
    Centralized, Local, FedAvg, FedProx, FELLRec, FedPA, FFALoRA, FedSALoRA, FLoRA, FedExLoRA)}

__all__ = ["POOLED", "STRATEGIES", "ClientTrainer", "ClientUpdate", "Payload", "Strategy", "Tensors", "make_strategy",
           "weighted_mean"]


def make_strategy(name: str, initial: Tensors, clients: list[str], **options: Any) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](initial, clients, **options)
