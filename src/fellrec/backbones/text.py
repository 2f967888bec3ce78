"""Batching text through a causal LM: tokenising, the last hidden layer, pooling.

The LM head (a 49,152 × 576 matrix on SmolLM2) is never applied here: encoders need only the last
hidden layer (after the final norm), so they call the decoder stack directly.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import Tensor, nn


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, blocks, final norm) of a causal LM, peft-wrapped or not, or a
    split model's decoder (head here, trunk on the server, tail here)."""
    if getattr(model, "fellrec_split", False):
        return model.decoder
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model


def lm_head(model: nn.Module) -> nn.Module:
    if getattr(model, "fellrec_split", False):
        return model.client.lm_head
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.lm_head


def tokenize(tok, texts: list[str], max_len: int) -> dict[str, Tensor]:
    """Right-padded ids and mask; a text longer than ``max_len`` tokens keeps its END (the most
    recent history and the part that matters for last-token pooling)."""
    ids = [t[-max_len:] for t in tok(texts, add_special_tokens=False)["input_ids"]]
    return pad(ids, tok.pad_token_id)


def pad(ids: list[list[int]], pad_id: int, left: bool = False) -> dict[str, Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        span = slice(width - len(x), width) if left else slice(0, len(x))
        input_ids[i, span] = torch.tensor(x, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def hidden(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Last hidden layer [B, T, H] of right-padded ``batch`` (on the model's device)."""
    dev = device_of(model)
    return decoder(model)(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                          use_cache=False).last_hidden_state


def pool(states: Tensor, mask: Tensor, how: str) -> Tensor:
    """[B, T, H] -> [B, H]: the last real token's state, or the mean over real tokens."""
    if how == "last":
        last = mask.sum(1) - 1  # right padding: the last real token
        return states[torch.arange(states.shape[0]), last]
    if how == "mean":
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1)
    raise ValueError(f"pooling must be 'last' or 'mean', got {how!r}")


def encode(model: nn.Module, tok, texts: list[str], *, max_len: int, pooling: str = "last",
           batch_size: int = 64) -> Tensor:
    """Pooled last-layer vectors [N, H] of ``texts``, on the model's device (with gradients if enabled).

    Texts are batched in order of length, so a batch pads little (titles run from 3 to 40 tokens);
    the result is in the order of ``texts``.
    """
    if not texts:
        return torch.zeros(0)
    ids = [t[-max_len:] for t in tok(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = []
    for start in range(0, len(order), batch_size):
        batch = pad([ids[i] for i in order[start:start + batch_size]], tok.pad_token_id)
        states = hidden(model, batch)
        out.append(pool(states, batch["attention_mask"].to(states.device), pooling))
    vectors = torch.cat(out)
    return vectors[torch.argsort(torch.as_tensor(order, device=vectors.device))]


def cached(key: str, compute) -> Tensor:
    """``compute()``, stored under the cache directory by ``key`` and read back on later calls.

    Used for item-title embeddings of a frozen base model, which every run of the same model on the
    same catalogue would otherwise recompute (about a minute for 1,349 titles on SmolLM2, 2 cores).
    """
    from safetensors.torch import load_file, save_file

    from fellrec.llm import cache_dir

    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]
    path = cache_dir() / "embeddings" / f"{digest}.safetensors"
    if path.is_file():
        return load_file(path)["vectors"]
    vectors = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"vectors": vectors.detach().cpu().contiguous()}, tmp)
    os.replace(tmp, path)
    return vectors
