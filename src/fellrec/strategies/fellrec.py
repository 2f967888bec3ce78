"""FELLRec's dynamic balance (Zhao et al., NAACL Findings 2025): every client keeps its own adapter,
aggregated from all clients' adapters by similarity ("attention"), with a curriculum-heating weight
that lets a client whose loss is high learn mostly alone at first.

After local training in round t (0-based, as the released code's ``epoch``), with θ_i client i's
adapter flattened into one vector and ℓ_i its mean local training loss of the round:

    s_ij = (cos(θ_i, θ_j) + 1) / 2                      similarity, in [0, 1], s_ii = 1
    p    = softmax(ℓ / τ)                               a high-loss client gets a large p_i
    w_i  = tanh(α / p_i ** (t + 1/β))                   heating: rises to 1 within a few rounds
    θ_i ← (θ_i + Σ_{j≠i} w_i s_ij θ_j) / (1 + Σ_{j≠i} w_i s_ij)

Options: ``order="sequential"`` reproduces the released code, which overwrites θ_i in place so that
client i aggregates over the already-aggregated θ_0..θ_{i-1} (the similarity is still computed
before any update); ``heating=False`` sets every w_i = 1 (what the released BIGRec script does with
β = 1); ``similarity="uniform"`` sets every s_ij = 1. With both off, every client's new adapter is
the plain (unweighted) mean of all clients' adapters.

Two options (off by default, so the paper's rule stays the default) give the attention something to
go on. Every client starts from the same random LoRA A matrices, which then dominate the flattened
vectors (cosines near 1 for every pair), and with τ = 0.05 the softmax over raw losses is nearly
one-hot. ``similarity_of="update"`` computes the cosine on what each client learned this round
(θ_i minus the adapter it was sent); ``similarity_of="lora_b"`` on the B matrices alone (zero at
the start, so only what was learned). ``losses="relative"`` feeds the heating ℓ_i / mean_j ℓ_j − 1,
so τ weighs relative differences (a client 5% above the mean gets e^(0.05/τ) times the weight of
one at the mean) whatever the loss's scale.

Clients that did not train in a round keep their adapter and take no part in its aggregation.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fellrec.strategies.base import ClientUpdate, Payload, Strategy, Tensors
from fellrec.strategies.lora_parts import is_b

SIMILARITY_OF = ("adapter", "update", "lora_b")
LOSSES = ("raw", "relative")


def similarity_matrix(vectors: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """[M, M] s_ij = (cos(θ_i, θ_j) + 1) / 2, or all ones for ``kind="uniform"``."""
    m = vectors.shape[0]
    if kind == "uniform":
        return torch.ones(m, m, dtype=torch.float64)
    if kind != "cosine":
        raise ValueError(f"similarity must be 'cosine' or 'uniform', got {kind!r}")
    v = vectors.to(torch.float64)
    unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T + 1) / 2


def heating_weights(losses: list[float], t: int, alpha: float, beta: float,
                    tau: float, scale: str = "raw") -> tuple[list[float], list[float]]:
    """(p, w): p = softmax(ℓ / τ) and w_i = tanh(α / p_i^(t + 1/β)) for 0-based round ``t``;
    ``scale="relative"`` uses ℓ_i / mean(ℓ) − 1 in place of ℓ_i."""
    if scale not in LOSSES:
        raise ValueError(f"losses must be one of {', '.join(LOSSES)}, got {scale!r}")
    x = torch.tensor(losses, dtype=torch.float64)
    if scale == "relative":
        x = x / x.mean() - 1
    p = torch.softmax(x / tau, dim=0)
    w = torch.tanh(alpha / p ** (t + 1.0 / beta))
    return p.tolist(), w.tolist()


def aggregate_personal(vectors: torch.Tensor, sim: torch.Tensor, w: list[float],
                       sequential: bool = False) -> torch.Tensor:
    """Each row i becomes (θ_i + Σ_{j≠i} w_i s_ij θ_j) / (1 + Σ_{j≠i} w_i s_ij)."""
    m = vectors.shape[0]
    weights = sim.clone() * torch.tensor(w, dtype=torch.float64).unsqueeze(1)
    weights.fill_diagonal_(1.0)
    weights = weights / weights.sum(dim=1, keepdim=True)
    source = vectors.to(torch.float64).clone()
    if not sequential:
        return (weights @ source).to(vectors.dtype)
    for i in range(m):  # the released code: client i sees clients 0..i-1 already aggregated
        source[i] = weights[i] @ source
    return source.to(vectors.dtype)


class FELLRec(Strategy):
    name = "fellrec"

    def __init__(self, initial: Tensors, clients: list[str], alpha: float = 0.7, beta: float = 5.0,
                 tau: float = 0.05, heating: bool = True, similarity: str = "cosine", order: str = "snapshot",
                 similarity_of: str = "adapter", losses: str = "raw", **options: Any):
        super().__init__(initial, clients)
        if order not in ("snapshot", "sequential"):
            raise ValueError(f"order must be 'snapshot' or 'sequential', got {order!r}")
        if similarity not in ("cosine", "uniform"):
            raise ValueError(f"similarity must be 'cosine' or 'uniform', got {similarity!r}")
        if similarity_of not in SIMILARITY_OF:
            raise ValueError(f"similarity_of must be one of {', '.join(SIMILARITY_OF)}, got {similarity_of!r}")
        if losses not in LOSSES:
            raise ValueError(f"losses must be one of {', '.join(LOSSES)}, got {losses!r}")
        if similarity_of == "lora_b" and not any(is_b(k) for k in initial):
            raise ValueError("similarity_of='lora_b': the adapter has no LoRA B matrix")
        if tau <= 0 or beta <= 0:
            raise ValueError(f"tau and beta must be positive, got tau={tau}, beta={beta}")
        self.alpha, self.beta, self.tau = float(alpha), float(beta), float(tau)
        self.heating, self.similarity, self.order = heating, similarity, order
        self.similarity_of, self.losses = similarity_of, losses
        self.names = list(initial)
        self.shapes = {k: v.shape for k, v in initial.items()}
        self.adapters = {c: {k: v.clone() for k, v in initial.items()} for c in clients}

    def configure_fit(self, rnd: int, client: str) -> Payload:
        return Payload(self.adapters[client], {"share": True})

    def configure_evaluate(self, client: str) -> Payload:
        return Payload(self.adapters[client])

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        if not updates:
            return {}
        ids = [u.client for u in updates]
        vectors = torch.stack([self.flatten(u.tensors) for u in updates])
        sim = similarity_matrix(self.compared(updates, vectors), self.similarity)
        losses = [float(u.metrics["loss"]) for u in updates]
        if self.heating and not any(math.isnan(x) for x in losses):
            p, w = heating_weights(losses, rnd - 1, self.alpha, self.beta, self.tau, self.losses)
        else:
            p, w = [1.0 / len(updates)] * len(updates), [1.0] * len(updates)
        mixed = aggregate_personal(vectors, sim, w, sequential=self.order == "sequential")
        for client, row in zip(ids, mixed, strict=True):
            self.adapters[client] = self.unflatten(row)
        return {"clients": ids, "similarity": sim.tolist(), "loss": losses, "p": p, "w": w}

    def compared(self, updates: list[ClientUpdate], vectors: torch.Tensor) -> torch.Tensor:
        """The vectors the similarity is computed on (``similarity_of``), one row per update."""
        if self.similarity_of == "update":  # what each client learned from the adapter it was sent
            return vectors - torch.stack([self.flatten(self.adapters[u.client]) for u in updates])
        if self.similarity_of == "lora_b":
            names = [k for k in self.names if is_b(k)]
            return torch.stack([torch.cat([u.tensors[k].reshape(-1) for k in names]) for u in updates])
        return vectors

    def flatten(self, tensors: Tensors) -> torch.Tensor:
        return torch.cat([tensors[k].reshape(-1) for k in self.names])

    def unflatten(self, vector: torch.Tensor) -> Tensors:
        out, start = {}, 0
        for k in self.names:
            n = math.prod(self.shapes[k])
            out[k] = vector[start:start + n].reshape(self.shapes[k]).clone()
            start += n
        return out

    def state(self) -> Tensors:
        return {f"{c}/{k}": v for c, t in self.adapters.items() for k, v in t.items()}

    def load_state(self, tensors: Tensors) -> None:
        for c in self.adapters:
            self.adapters[c] = {k: tensors[f"{c}/{k}"] for k in self.names}
