"""The foundation CTR model and the FedPA adapted model (research/fedpa.md §1.1, §3.1).

``CTRModel``: one embedding table per user attribute and per item attribute (no id embeddings),
the field embeddings concatenated into h₀, hidden layers Linear+ReLU, then a Linear to one logit
(the sigmoid is folded into the loss, ``BCEWithLogits``).

``FedPAModel`` holds ONE frozen foundation model for every client. Nothing per client lives in the
module: the trainable tensors of a call (a client's user-attribute embedding rows and user
adapter, the shared gate and output layer, the client's group adapters) are passed to
:meth:`FedPAModel.logits` as a dict of named tensors, so switching clients swaps a few small
tensors and never copies the model. The frozen item side is precomputed once (``item_table``).

Variants (what ``logits`` computes; the tensors each needs are in ``param_names``):

- ``fedpa``: per hidden layer l, with x = h_{l-1}, s = alpha / rank and K = 2 + |groups| branches
      g   = softmax(W2 ReLU(W1 x + b1) + b2)                       gate, from the layer input
      h_l = g0 · ReLU(W_l x + b_l) + g1 · s x A_u B_u + Σ_k g_{k+1} · s x A_k B_k
  (frozen layer, user adapter, one adapter per group attribute for the user's value), then
  logit = w·h_L + b (the ``out`` layer). Tensor names: ``user.emb`` [U, d] (the user's own rows
  of the U user-attribute tables), ``user.{l}.A`` [d_in, r], ``user.{l}.B`` [r, d_out],
  ``group.{attr}.{l}.A``/``.B``, ``gate.{l}.w1/b1/w2/b2``, ``out.weight``, ``out.bias``.
- ``adapter``: one LoRA per hidden layer added before the ReLU, h_l = ReLU(W_l x + b_l + s x A B)
  (``lora.{l}.A/B``), the ``out`` layer and the user's ``user.emb`` rows.
- ``full``: the whole foundation model, every tensor under ``base.<state_dict name>``.
- ``frozen``: the foundation model as pre-trained; no tensors.

LoRA init: A ~ U(−1/√d_in, 1/√d_in) (PEFT's Kaiming-uniform), B = 0, so an adapter starts as a
no-op and learns. ``zero_init=True`` sets A = 0 too, as the released code does; then both
gradients are exactly zero and the adapters never move (§3.4).
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fellrec.strategies.fedpa import server_group_key

Tensors = dict[str, Tensor]
VARIANTS = ("fedpa", "adapter", "full", "frozen")


class CTRModel(nn.Module):
    """Attribute embeddings → MLP → one logit (``torch.sigmoid`` of it is the click probability)."""

    def __init__(self, user_cards: list[int], item_cards: list[int], item_widths: list[int] | None = None,
                 dim: int = 8, hidden: tuple[int, ...] = (32, 8)):
        super().__init__()
        self.config: dict[str, Any] = {"user_cards": list(map(int, user_cards)),
                                       "item_cards": list(map(int, item_cards)),
                                       "item_widths": list(map(int, item_widths or [1] * len(item_cards))),
                                       "dim": int(dim), "hidden": list(map(int, hidden))}
        if len(self.config["item_widths"]) != len(item_cards):
            raise ValueError("item_widths must give one width per item field")
        self.dim = dim
        self.user_emb = nn.ModuleList(nn.Embedding(c, dim) for c in user_cards)
        self.item_emb = nn.ModuleList(nn.Embedding(c, dim) for c in item_cards)
        self.item_widths = self.config["item_widths"]
        self.sizes = [dim * (len(user_cards) + len(item_cards)), *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(self.sizes))
        self.out = nn.Linear(self.sizes[-1], 1)

    def user_vectors(self, codes: Tensor) -> Tensor:
        """[B, U] codes → [B, U·d]."""
        return torch.cat([emb(codes[:, j]) for j, emb in enumerate(self.user_emb)], dim=1)

    def item_vectors(self, codes: Tensor) -> Tensor:
        """[B, Σ widths] codes → [B, I·d]; a bag field is the mean of its non-padding codes' embeddings."""
        parts, start = [], 0
        for emb, width in zip(self.item_emb, self.item_widths, strict=True):
            block = codes[:, start:start + width]
            start += width
            if width == 1:
                parts.append(emb(block[:, 0]))
                continue
            keep = (block >= 0).to(emb.weight.dtype)
            vec = (emb(block.clamp_min(0)) * keep.unsqueeze(-1)).sum(1)
            parts.append(vec / keep.sum(1, keepdim=True).clamp_min(1.0))
        return torch.cat(parts, dim=1)

    def hidden(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = F.relu(layer(x))
        return x

    def forward(self, user_codes: Tensor, item_codes: Tensor) -> Tensor:
        x = torch.cat([self.user_vectors(user_codes), self.item_vectors(item_codes)], dim=1)
        return self.out(self.hidden(x)).squeeze(-1)


def uniform(shape, bound: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class FedPAModel(nn.Module):
    """The frozen foundation model plus the FedPA computation over tensors passed in per call."""

    def __init__(self, base: CTRModel, item_codes: Tensor, *, group_cards: dict[str, int] | None = None,
                 rank: int = 4, alpha: float = 1.0, gate_hidden: tuple[int, ...] = (8, 4), zero_init: bool = False):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.group_cards = dict(group_cards or {})
        for attr in self.group_cards:
            if "." in attr or "=" in attr:
                raise ValueError(f"group attribute names may not contain '.' or '=': {attr!r}")
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(alpha) / int(rank)
        self.gate_hidden = tuple(int(g) for g in gate_hidden)
        if len(self.gate_hidden) != len(base.layers):
            raise ValueError(f"gate_hidden needs one size per hidden layer ({len(base.layers)}), got {gate_hidden}")
        self.zero_init = bool(zero_init)
        self.register_buffer("item_codes", item_codes.to(torch.long), persistent=False)
        with torch.no_grad():
            self.register_buffer("item_table", base.item_vectors(self.item_codes), persistent=False)

    @property
    def sizes(self) -> list[int]:
        return self.base.sizes

    @property
    def num_branches(self) -> int:
        return 2 + len(self.group_cards)

    def refresh_items(self) -> None:
        """Recompute the frozen item side after the foundation model's weights changed."""
        with torch.no_grad():
            self.item_table = self.base.item_vectors(self.item_codes)

    # ---- initial tensors -------------------------------------------------------------------------

    def lora(self, prefix: str, generator: torch.Generator) -> Tensors:
        out = {}
        for layer, (d_in, d_out) in enumerate(pairwise(self.sizes)):
            a = (torch.zeros(d_in, self.rank) if self.zero_init
                 else uniform((d_in, self.rank), 1 / math.sqrt(d_in), generator))
            out[f"{prefix}.{layer}.A"] = a
            out[f"{prefix}.{layer}.B"] = torch.zeros(self.rank, d_out)
        return out

    def gate(self, generator: torch.Generator) -> Tensors:
        """The gate MLPs with nn.Linear's default init (U(±1/√fan_in)), from ``generator``."""
        out = {}
        for layer, (d_in, g) in enumerate(zip(self.sizes[:-1], self.gate_hidden, strict=True)):
            k = self.num_branches
            out[f"gate.{layer}.w1"] = uniform((g, d_in), 1 / math.sqrt(d_in), generator)
            out[f"gate.{layer}.b1"] = uniform((g,), 1 / math.sqrt(d_in), generator)
            out[f"gate.{layer}.w2"] = uniform((k, g), 1 / math.sqrt(g), generator)
            out[f"gate.{layer}.b2"] = uniform((k,), 1 / math.sqrt(g), generator)
        return out

    def output(self) -> Tensors:
        return {"out.weight": self.base.out.weight.detach().clone(), "out.bias": self.base.out.bias.detach().clone()}

    def shared_initial(self, variant: str, seed: int = 0) -> Tensors:
        """The server's initial tensors of ``variant``.

        ``fedpa``: gate, output layer and, for every group attribute and every value, its adapter
        under the server name ``group.{attr}={value}.{l}.A`` (one independent random A per value).
        ``adapter``: the shared LoRA and the output layer. ``full``: the whole foundation model.
        """
        gen = torch.Generator().manual_seed(int(seed))
        if variant == "fedpa":
            out = {**self.gate(gen), **self.output()}
            for attr, card in self.group_cards.items():
                for value in range(card):
                    for key, t in self.lora(f"group.{attr}", gen).items():
                        out[server_group_key(key, value)] = t
            return out
        if variant == "adapter":
            return {**self.lora("lora", gen), **self.output()}
        if variant == "full":
            return {f"base.{k}": v.detach().clone() for k, v in self.base.state_dict().items()}
        if variant == "frozen":
            return {}
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")

    def private_initial(self, variant: str, user_codes: Tensor, seed: int = 0) -> Tensors:
        """A client's private tensors at the start: its rows of the pre-trained user tables, its adapter."""
        if variant in ("full", "frozen"):
            return {}
        rows = self.user_rows(user_codes)
        if variant == "adapter":
            return {"user.emb": rows}
        gen = torch.Generator().manual_seed(int(seed))
        return {"user.emb": rows, **self.lora("user", gen)}

    def user_rows(self, user_codes: Tensor) -> Tensor:
        """[U, d]: the pre-trained embedding of each of the user's attribute values."""
        with torch.no_grad():
            return torch.stack([emb.weight[int(c)] for emb, c in zip(self.base.user_emb, user_codes, strict=True)])

    # ---- forward ---------------------------------------------------------------------------------

    def logits(self, variant: str, params: Tensors, user_codes: Tensor, items: Tensor) -> Tensor:
        """Logits [B] of one user (``user_codes`` [U]) for the items ``items`` [B]."""
        return self.forward_detail(variant, params, user_codes, items)[0]

    def forward_detail(self, variant: str, params: Tensors, user_codes: Tensor,
                       items: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(logits [B], the gate weights [B, K] of each hidden layer; [] outside ``fedpa``)."""
        n = items.shape[0]
        if variant == "full":
            state = {k.removeprefix("base."): v for k, v in params.items()}
            codes = user_codes.view(1, -1).expand(n, -1)
            return functional_call(self.base, state, (codes, self.item_codes[items])), []
        if variant == "frozen":
            with torch.no_grad():
                user = self.base.user_vectors(user_codes.view(1, -1))
        else:
            user = params["user.emb"].reshape(1, -1)
        x = torch.cat([user.expand(n, -1), self.item_table[items]], dim=1)
        gates = []
        for layer, lin in enumerate(self.base.layers):
            pre = F.linear(x, lin.weight, lin.bias)
            if variant == "fedpa":
                g = F.linear(F.relu(F.linear(x, params[f"gate.{layer}.w1"], params[f"gate.{layer}.b1"])),
                             params[f"gate.{layer}.w2"], params[f"gate.{layer}.b2"]).softmax(dim=-1)
                gates.append(g)
                h = g[:, 0:1] * F.relu(pre) + g[:, 1:2] * self._lora(x, params, f"user.{layer}")
                for k, attr in enumerate(self.group_cards):
                    h = h + g[:, k + 2:k + 3] * self._lora(x, params, f"group.{attr}.{layer}")
                x = h
            elif variant == "adapter":
                x = F.relu(pre + self._lora(x, params, f"lora.{layer}"))
            elif variant == "frozen":
                x = F.relu(pre)
            else:
                raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
        if variant == "frozen":
            return self.base.out(x).squeeze(-1).detach(), []
        return F.linear(x, params["out.weight"], params["out.bias"]).squeeze(-1), gates

    def _lora(self, x: Tensor, params: Tensors, prefix: str) -> Tensor:
        return self.scale * ((x @ params[f"{prefix}.A"]) @ params[f"{prefix}.B"])


def param_names(model: FedPAModel, variant: str) -> tuple[list[str], list[str]]:
    """(shared names as a client sees them, private names) of ``variant``."""
    layers = range(len(model.base.layers))
    lora = [f"{{}}.{layer}.{ab}" for layer in layers for ab in "AB"]
    if variant == "fedpa":
        gate = [f"gate.{layer}.{p}" for layer in layers for p in ("w1", "b1", "w2", "b2")]
        groups = [n.format(f"group.{attr}") for attr in model.group_cards for n in lora]
        return [*gate, "out.weight", "out.bias", *groups], ["user.emb", *(n.format("user") for n in lora)]
    if variant == "adapter":
        return [*(n.format("lora") for n in lora), "out.weight", "out.bias"], ["user.emb"]
    if variant == "full":
        return [f"base.{k}" for k in model.base.state_dict()], []
    if variant == "frozen":
        return [], []
    raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
