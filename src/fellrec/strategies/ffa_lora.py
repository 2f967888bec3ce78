"""FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024): every
client keeps the A matrices frozen at their shared random initialisation and trains only B (and the
other adapter tensors), which are averaged. With one A for all, the mean of the clients' updates
B_k·A is the update of the mean B: aggregation is exact, and only half of LoRA's matrices travel.
The payload tells the client not to train A (``frozen``) and to send back only what it was sent."""

from __future__ import annotations

from typing import Any, ClassVar

from fellrec.strategies.lora_parts import LORA_A, SharedPart, is_a


class FFALoRA(SharedPart):
    name = "ffa-lora"
    stays = staticmethod(is_a)  # A: frozen at its shared initialisation
    extra: ClassVar[dict[str, Any]] = {"frozen": LORA_A}  # the client does not train A
