"""Which adapter tensors are LoRA's A and B matrices (peft names them ``...lora_A.weight`` and
``...lora_B.weight``); the LoRA-aware strategies share or keep them apart."""

from __future__ import annotations

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
