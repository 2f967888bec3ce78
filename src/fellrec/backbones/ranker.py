"""Text-encoder ranker (RecFormer-style; Li et al., KDD 2023): users and items are texts, the same
LM encodes both, and items are ranked by cosine similarity. The fast backbone on a CPU.

- user vector u = pool(LM_adapter(history text)), the history text being the prompt's input line
  ("The user has watched the following movies before: "T1", ..., "T10"");
- item vector v_i = pool(LM(title_i)): by the frozen base LM, computed once and cached
  (``item_side="frozen"``, the default: only the user side carries the adapter), or by the adapted
  LM (``item_side="adapted"``), re-encoded by ``refresh()`` after each training round;
- score s(u, i) = cos(u, v_i) / τ (τ = 0.05 as in RecFormer);
- loss: softmax cross-entropy of the target against the candidates: the whole catalogue
  (``negatives=0``, cheap with a frozen item side), or the batch's targets plus ``negatives``
  items drawn uniformly (in-batch and sampled negatives; the only affordable choice with an
  adapted item side, whose candidates are encoded in the same step).

Pooling is the last token's state (``last``) or the mean over tokens (``mean``) of the last hidden
layer, after the final norm.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fellrec.backbones import text
from fellrec.backbones.prompts import Prompt
from fellrec.holdout import Samples
from fellrec.train import inference


class TextRanker:
    def __init__(self, model: nn.Module, tok, titles: Sequence[str], prompt: Prompt, *, max_len: int = 512,
                 pooling: str = "last", item_side: str = "frozen", negatives: int = 0,
                 temperature: float = 0.05, embed_batch_size: int = 64, seed: int = 0,
                 cache_key: str | None = None):
        if item_side not in ("frozen", "adapted"):
            raise ValueError(f"item_side must be 'frozen' or 'adapted', got {item_side!r}")
        self.model = model  # peft-wrapped causal LM
        self.tok = tok
        self.titles = list(titles)
        self.prompt = prompt
        self.max_len = max_len
        self.pooling = pooling
        self.item_side = item_side
        self.negatives = negatives
        self.temperature = temperature
        self.embed_batch_size = embed_batch_size
        self.rng = np.random.default_rng(seed)
        self.cache_key = cache_key  # names the base model: a frozen item table is then kept on disk
        self._items: Tensor | None = None

    def user_vectors(self, batch: Samples) -> Tensor:
        texts = [self.prompt.history([self.titles[i] for i in h]) for h in batch.history]
        return F.normalize(self._encode(texts, adapter=True), dim=-1)

    def item_vectors(self, items: Sequence[int] | None = None, adapter: bool | None = None) -> Tensor:
        """Normalised item vectors (all items when ``items`` is None)."""
        adapter = self.item_side == "adapted" if adapter is None else adapter
        titles = self.titles if items is None else [self.titles[i] for i in items]
        return F.normalize(self._encode(titles, adapter=adapter), dim=-1)

    def item_table(self) -> Tensor:
        """All items' vectors as the ranking uses them (cached; see ``refresh``)."""
        if self._items is None:
            with inference(self.model):
                if self.item_side == "frozen" and self.cache_key is not None:
                    key = "\n".join([self.cache_key, self.pooling, str(self.max_len), *self.titles])
                    raw = text.cached(key, lambda: self._encode(self.titles, adapter=False))
                    self._items = F.normalize(raw.to(text.device_of(self.model)), dim=-1)
                else:
                    self._items = self.item_vectors()
        return self._items

    def use_item_table(self, items: Tensor) -> None:
        """Rank with ``items`` as the frozen item table (split mode: the server computed it)."""
        self._items = items.to(text.device_of(self.model))

    def reseed(self, seed: int) -> None:
        """Restart the negative sampling from ``seed`` (a client's round is then reproducible)."""
        self.rng = np.random.default_rng(seed)

    def random_state(self) -> dict:
        """Where the negative sampling stands (to continue a local training in another process)."""
        return self.rng.bit_generator.state

    def set_random_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def refresh(self) -> None:
        """Forget the cached item table (an adapted item side changed with training)."""
        if self.item_side == "adapted":
            self._items = None

    def loss(self, batch: Samples) -> Tensor:
        u = self.user_vectors(batch)  # [B, H]
        targets = torch.as_tensor(np.array([int(t[0]) for t in batch.targets]), dtype=torch.long, device=u.device)
        if self.negatives <= 0:  # the whole catalogue
            items = self.item_table() if self.item_side == "frozen" else self.item_vectors()
            return F.cross_entropy(u @ items.T / self.temperature, targets)
        drawn = self.rng.integers(0, len(self.titles), self.negatives)
        candidates, index = np.unique(np.concatenate([targets.cpu().numpy(), drawn]), return_inverse=True)
        if self.item_side == "frozen":
            items = self.item_table()[torch.as_tensor(candidates, device=u.device)]
        else:
            items = self.item_vectors(candidates.tolist())
        labels = torch.as_tensor(index[:len(targets)], dtype=torch.long, device=u.device)
        return F.cross_entropy(u @ items.T / self.temperature, labels)

    def rank(self, batch: Samples) -> Tensor:
        with inference(self.model):
            return self.user_vectors(batch) @ self.item_table().T / self.temperature

    def _encode(self, texts: list[str], adapter: bool) -> Tensor:
        off = nullcontext() if adapter or not hasattr(self.model, "disable_adapter") else self.model.disable_adapter()
        with off:
            return text.encode(self.model, self.tok, texts, max_len=self.max_len, pooling=self.pooling,
                               batch_size=self.embed_batch_size)
