"""BIGRec (Bao et al., 2023), FELLRec's generative backbone: the LM writes the next item's title,
and the text is grounded to real items by embedding distance.

Training: the instruction prompt lists the history titles; the response is the target title in
quotes, then end-of-sequence. The loss is the mean token cross-entropy over the response tokens,
or over every token with ``train_on_inputs`` (what the released FELLRec script does). Logits are
computed only at the positions that carry a label, so the 49k-word LM head costs little when
only the response is learned.

Ranking: beam search (``num_beams``, greedy scores, no sampling) from the prompt gives a title
text per user; it and every item title are embedded by the BASE model (adapter off), last layer
at the last token; items are scored by minus the L2 distance, so the nearest title ranks first.
The item embeddings are computed once and cached: the base model never changes. Items the user
already has are masked by the evaluation (``Samples.exclude``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fellrec.backbones import text
from fellrec.backbones.prompts import Prompt
from fellrec.holdout import Samples
from fellrec.train import inference


class BIGRec:
    def __init__(self, model: nn.Module, tok, titles: Sequence[str], prompt: Prompt, *, max_len: int = 512,
                 train_on_inputs: bool = False, num_beams: int = 4, max_new_tokens: int = 32,
                 embed_batch_size: int = 64, cache_key: str | None = None):
        self.model = model  # peft-wrapped causal LM
        self.tok = tok
        self.titles = list(titles)
        self.prompt = prompt
        self.max_len = max_len
        self.train_on_inputs = train_on_inputs
        self.num_beams = num_beams
        self.max_new_tokens = max_new_tokens
        self.embed_batch_size = embed_batch_size
        self.cache_key = cache_key  # names the base model: item embeddings are then kept on disk
        self._item_emb: Tensor | None = None

    # ---- training ------------------------------------------------------------------------------

    def examples(self, batch: Samples) -> dict[str, Tensor]:
        """Right-padded ids, mask and labels (-100 where no loss is taken) for a batch of samples."""
        eos = self.tok.eos_token_id
        rows, labels = [], []
        for hist, target in zip(batch.history, batch.targets, strict=True):
            prompt_ids = self._ids(self.prompt.instruction([self.titles[i] for i in hist]))
            answer_ids = [*self._ids(self.prompt.response(self.titles[int(target[0])])), eos]
            prompt_ids = prompt_ids[-max(1, self.max_len - len(answer_ids)):]
            rows.append(prompt_ids + answer_ids)
            labels.append((prompt_ids if self.train_on_inputs else [-100] * len(prompt_ids)) + answer_ids)
        out = text.pad(rows, self.tok.pad_token_id)
        out["labels"] = text.pad(labels, -100)["input_ids"]
        return out

    def loss(self, batch: Samples) -> Tensor:
        ex = self.examples(batch)
        states = text.hidden(self.model, ex)  # [B, T, H]
        labels = ex["labels"][:, 1:].to(states.device)  # position t predicts token t+1
        keep = labels != -100
        logits = text.lm_head(self.model)(states[:, :-1][keep])  # [n_labelled, vocab]
        return F.cross_entropy(logits, labels[keep])

    # ---- ranking -------------------------------------------------------------------------------

    def generate(self, batch: Samples) -> list[str]:
        """The title the model writes for each sample (beam search from the instruction prompt)."""
        ids = [self._ids(self.prompt.instruction([self.titles[i] for i in h]))[-self.max_len:]
               for h in batch.history]
        dev = text.device_of(self.model)
        inputs = {k: v.to(dev) for k, v in text.pad(ids, self.tok.pad_token_id, left=True).items()}
        with inference(self.model):
            out = self.model.generate(**inputs, num_beams=self.num_beams, do_sample=False,
                                      max_new_tokens=self.max_new_tokens, eos_token_id=self.tok.eos_token_id,
                                      pad_token_id=self.tok.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [Prompt.parse(s) for s in self.tok.batch_decode(new, skip_special_tokens=True)]

    def embed(self, texts: list[str]) -> Tensor:
        """Base-model (adapter off) last-layer, last-token embeddings [N, H] (BIGRec's grounding)."""
        off = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()
        with inference(self.model), off:
            return text.encode(self.model, self.tok, texts, max_len=self.max_len, pooling="last",
                               batch_size=self.embed_batch_size)

    def use_item_embeddings(self, embeddings: Tensor) -> None:
        """Ground with ``embeddings`` as the items' (split mode: the server computed them)."""
        self._item_emb = embeddings.to(text.device_of(self.model))

    def item_embeddings(self) -> Tensor:
        if self._item_emb is None:
            if self.cache_key is None:
                self._item_emb = self.embed(self.titles)
            else:
                key = "\n".join([self.cache_key, "last", str(self.max_len), *self.titles])
                self._item_emb = text.cached(key, lambda: self.embed(self.titles)).to(text.device_of(self.model))
        return self._item_emb

    def ground(self, generated: list[str]) -> Tensor:
        """Scores [B, num_items]: minus the L2 distance from each text to every item title."""
        with torch.no_grad():
            return -torch.cdist(self.embed([g or " " for g in generated]), self.item_embeddings())

    def rank(self, batch: Samples) -> Tensor:
        return self.ground(self.generate(batch))

    def _ids(self, s: str) -> list[int]:
        return self.tok(s, add_special_tokens=False)["input_ids"]
