"""Which adapter tensors are LoRA's A and B matrices (peft names them ``...lora_A.weight`` and
``...lora_B.weight``); the LoRA-aware strategies share or keep them apart."""

from __future__ import annotations

LORA_A, LORA_B = ".lora_A.", ".lora_B."


def is_a(name: str) -> bool:
    return LORA_A in name


def is_b(name: str) -> bool:
    return LORA_B in name
