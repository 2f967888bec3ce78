"""Cutting a (LoRA-wrapped) Llama into the client's part and the server's trunk.

With L blocks, a cut at ``k`` and ``tail`` blocks kept at the end (FELLRec: 1):

- client: token embeddings, blocks [0, k), blocks [L - tail, L), the final norm and the LM head;
- server trunk: blocks [k, L - tail).

Each part runs its blocks with the same causal mask and rotary position embeddings as the whole
model, built from the padding mask and the positions, which are all the trunk is sent besides the
hidden states. A block keeps its original index as its name, so the adapter tensors of either part
carry the same names as in the whole model (``fellrec.adapters``) and can be aggregated with them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask

_PREFIX = "base_model.model.model.layers."  # how fellrec.adapters names a block's tensors in the whole model


def run_blocks(blocks: nn.ModuleDict, config, rotary: nn.Module, hidden: Tensor, attention_mask: Tensor,
               position_ids: Tensor, cache=None) -> Tensor:
    """``hidden`` through ``blocks`` in order, as inside the whole model's forward pass.

    With ``cache`` (a transformers ``DynamicCache``), the blocks append their keys and values to it
    and attend over what it holds: ``attention_mask`` then covers the cached positions too.
    """
    if len(blocks) == 0:
        return hidden
    first = int(next(iter(blocks)))
    causal = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                                cache=cache, position_ids=position_ids,
                                layer_idx=first if cache is not None else None)
    rope = rotary(hidden, position_ids=position_ids)
    for block in blocks.values():
        hidden = block(hidden, attention_mask=causal, position_embeddings=rope, position_ids=position_ids,
                       cache=cache, use_cache=cache is not None)
    return hidden


class ClientPart(nn.Module):
    """What the client holds: embeddings, the head blocks, the tail blocks, final norm, LM head."""

    def __init__(self, config, embed_tokens: nn.Module, head: dict[int, nn.Module], tail: dict[int, nn.Module],
                 norm: nn.Module, lm_head: nn.Module, rotary: nn.Module):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.head = nn.ModuleDict({str(i): b for i, b in head.items()})
        self.tail = nn.ModuleDict({str(i): b for i, b in tail.items()})
        self.norm = norm
        self.lm_head = lm_head
        self.rotary_emb = rotary

    def run_head(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache=None) -> Tensor:
        hidden = self.embed_tokens(input_ids)
        return run_blocks(self.head, self.config, self.rotary_emb, hidden, attention_mask, position_ids, cache)

    def run_head_from(self, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor, start: int) -> Tensor:
        """Hidden states at block ``start`` (<= k) through the head blocks [start, k)."""
        blocks = nn.ModuleDict({i: b for i, b in self.head.items() if int(i) >= start})
        return run_blocks(blocks, self.config, self.rotary_emb, hidden, attention_mask, position_ids)

    def run_tail(self, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor, cache=None) -> Tensor:
        hidden = run_blocks(self.tail, self.config, self.rotary_emb, hidden, attention_mask, position_ids, cache)
        return self.norm(hidden)

    def block_indices(self) -> list[int]:
        return [int(i) for i in (*self.head, *self.tail)]


class TrunkPart(nn.Module):
    """What the server runs: blocks [k, L - tail)."""

    def __init__(self, config, blocks: dict[int, nn.Module], rotary: nn.Module):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleDict({str(i): b for i, b in blocks.items()})
        self.rotary_emb = rotary

    def forward(self, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor, cache=None) -> Tensor:
        return run_blocks(self.blocks, self.config, self.rotary_emb, hidden, attention_mask, position_ids, cache)

    def block_indices(self) -> list[int]:
        return [int(i) for i in self.blocks]


def cut(model: nn.Module, k: int, tail: int = 1) -> tuple[ClientPart, TrunkPart]:
    """Split a causal Llama (peft-wrapped or not) at block ``k``, keeping ``tail`` blocks on the client.

    The parts share the model's modules (no copies); ``drop`` on a client makes sure the whole model
    is not kept alive by it.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, layers = inner.model, inner.model.layers
    n = len(layers)
    if tail < 1 or not 0 <= k < n - tail:
        raise ValueError(f"a cut at k={k} with {tail} tail block(s) needs 0 <= k < {n - tail}, so that the server "
                         f"runs at least one of the model's {n} blocks")
    head = {i: layers[i] for i in range(k)}
    trunk = {i: layers[i] for i in range(k, n - tail)}
    tail_blocks = {i: layers[i] for i in range(n - tail, n)}
    client = ClientPart(inner.config, decoder.embed_tokens, head, tail_blocks, decoder.norm, inner.lm_head,
                        decoder.rotary_emb)
    server = TrunkPart(inner.config, trunk, copy.deepcopy(decoder.rotary_emb))
    return client, server


def whole_name(name: str) -> str:
    """A part's parameter name (``head.3.self_attn...``) as named in the whole model's adapter. A
    trainable module that a backbone attached to the client's part outside the blocks keeps its
    name (the item-token backbone's ``items.*``)."""
    if name.startswith("items."):
        return name
    group, index, rest = name.split(".", 2)
    if group not in ("head", "tail", "blocks"):
        raise ValueError(f"trainable tensor outside the blocks: {name}")
    return _PREFIX + index + "." + rest.replace(".default.", ".")


def trainable(part: ClientPart | TrunkPart) -> dict[str, nn.Parameter]:
    """The part's trainable parameters (live) under their names in the whole model."""
    return {whole_name(n): p for n, p in part.named_parameters() if p.requires_grad}


def adapter_of(part: ClientPart | TrunkPart) -> dict[str, Tensor]:
    """The part's trainable tensors under their names in the whole model (copies, on the CPU)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in trainable(part).items()}


def load_adapter(part: ClientPart | TrunkPart, tensors: dict[str, Tensor]) -> None:
    """Load the tensors (named as in the whole model) that belong to this part's blocks."""
    copy_into(trainable(part), tensors, "adapter tensors missing for this part")


def copy_into(live: dict[str, Tensor], tensors: dict[str, Tensor], missing_what: str) -> None:
    """Copy ``tensors[name]`` into each parameter ``live[name]``; every name must be there."""
    missing = sorted(set(live) - set(tensors))
    if missing:
        raise ValueError(f"{missing_what}: {missing[:3]}")
    with torch.no_grad():
        for name, p in live.items():
            p.copy_(tensors[name])


@contextmanager
def adapters_off(part: nn.Module) -> Iterator[None]:
    """The part's LoRA layers switched off (the base model's output), as peft's ``disable_adapter``
    does for a whole model; for a part that is alone in its process (the trunk on the server, the
    client's part when the trunk is elsewhere)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in part.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids of a right-padded batch: 0, 1, 2, ... on every row."""
    return torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0).expand_as(attention_mask)
