"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025): the A matrices learn what the clients share and are averaged; the B matrices learn what
is each client's own and never leave it. Every other adapter tensor (the item-token head) is shared
and averaged as in FedAvg. A client sends back only the tensors it was sent (``upload: sent``), so
the B matrices' bytes are never counted; it validates and tests with the shared A and its own B."""

from __future__ import annotations

from fellrec.strategies.lora_parts import SharedPart, is_b


class FedSALoRA(SharedPart):
    name = "fedsa-lora"
    stays = staticmethod(is_b)  # B: each client's own
