"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018, arXiv:1808.09781).

Model. A sample's history ``s_1 .. s_L`` (oldest first, left-padded to ``L = max_len`` with the
padding id ``num_items``) is embedded as ``x_t = sqrt(d) · E[s_t] + P[t]`` (``E``: item
embedding table, ``P``: learned positional embedding), followed by dropout and ``blocks``
pre-LayerNorm Transformer blocks

    x = x + Dropout(MultiHeadCausalAttention(LN(x)))
    x = x + Dropout(W_2 · Dropout(ReLU(W_1 · LN(x))))        (W_1, W_2: d × d, as in the paper)

and a final LayerNorm. Position ``t`` attends to positions ``<= t`` that are not padding (a
padding position attends to itself only, so no softmax row is empty; padding never reaches a
real position). The representation ``h`` at the LAST position scores every item by a dot
product with the shared item embedding table: ``score(i) = <h, E[i]>``.

Training. Each train sample (history -> its single target) is one example; the default loss is
the full softmax cross-entropy over all ``num_items`` items — simple and strong for catalogues
of a few thousand items. (The paper instead uses binary cross-entropy with one sampled negative
per position and trains every position of a sequence at once; ``build_samples`` already turns
every position into its own sample, so the training signal covers the same next-item pairs.)
Adam, mini-batches in a seeded shuffled order; after every epoch the validation metric (default
recall@10 with the user's earlier items masked) picks the best epoch, whose weights are kept,
and training stops after ``patience`` epochs without improvement.

Determinism. Initialisation, dropout and shuffling draw only from ``cfg.seed``: the global torch
RNG is forked (``torch.random.fork_rng``) and seeded inside, so callers' RNG state is left as it
was. Same seed, inputs, device and thread count give identical weights.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fellrec.baselines.common import pad_histories
from fellrec.evaluate import evaluate
from fellrec.holdout import Samples
from fellrec.metrics import METRIC_NAMES


@dataclass
class SASRecConfig:
    dim: int = 64  # embedding / hidden size d
    blocks: int = 2  # number of self-attention blocks
    heads: int = 1  # attention heads (must divide dim)
    dropout: float = 0.2  # on embeddings, attention weights, block outputs and the feed-forward
    max_len: int = 10  # history length L; longer histories keep their last L items
    lr: float = 1e-3  # Adam learning rate
    batch_size: int = 256  # training mini-batch
    epochs: int = 50  # upper bound on epochs (early stopping usually ends sooner)
    weight_decay: float = 0.0  # Adam L2 penalty
    patience: int | None = 5  # stop after this many epochs without a better valid metric; None: never
    metric: str = "recall@10"  # validation metric that selects the best epoch ("<name>@<K>")
    eval_batch_size: int = 1024  # samples ranked at once during validation
    seed: int = 2024  # initialisation, dropout and shuffling
    device: str = "cpu"  # torch device for training and ranking
    num_threads: int | None = 1  # torch intra-op threads during fit (restored after); None: leave as is.
    # One thread: the tensors are small, and more threads were much slower on a busy 2-core machine.


class _CausalBlock(nn.Module):
    """One pre-LN Transformer block: masked multi-head self-attention, then a point-wise FFN."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.heads = heads
        self.dropout = dropout
        self.norm_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """``x``: [B, L, d]; ``allowed``: bool [B, 1, L, L], True where query t may attend key s.

        ``last_only``: compute the output of the last position only ([B, 1, d]), all the final
        block needs to produce (the keys and values still cover every position).
        """
        b, length, dim = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).view(b, length, 3, self.heads, dim // self.heads).unbind(2)
        if last_only:
            x, q, allowed = x[:, -1:], q[:, -1:], allowed[:, :, -1:]
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
        )
        x = x + self.drop(self.out(att.transpose(1, 2).reshape(b, x.shape[1], dim)))
        return x + self.drop(self.ffn(self.norm_ffn(x)))


class SASRec(nn.Module):
    """SASRec over dense item ids ``0 .. num_items-1`` (``num_items`` is the padding id)."""

    def __init__(self, num_items: int, cfg: SASRecConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or SASRecConfig()
        if num_items <= 0 or cfg.max_len <= 0:
            raise ValueError(f"need num_items > 0 and max_len > 0, got {num_items}, {cfg.max_len}")
        self.num_items = num_items
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
            torch.manual_seed(cfg.seed)
            self.item_emb = nn.Embedding(num_items + 1, cfg.dim, padding_idx=num_items)
            self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
            self.emb_drop = nn.Dropout(cfg.dropout)
            self.blocks = nn.ModuleList(
                _CausalBlock(cfg.dim, cfg.heads, cfg.dropout) for _ in range(cfg.blocks)
            )
            self.norm = nn.LayerNorm(cfg.dim)
            std = cfg.dim ** -0.5  # sqrt(d)·E then has unit-variance components
            nn.init.normal_(self.item_emb.weight, std=std)
            nn.init.normal_(self.pos_emb.weight, std=std)
            with torch.no_grad():
                self.item_emb.weight[num_items].zero_()
        self.register_buffer("_causal", torch.ones(cfg.max_len, cfg.max_len).tril().bool(), persistent=False)
        self.register_buffer("_eye", torch.eye(cfg.max_len, dtype=torch.bool), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.item_emb.weight.device

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq``: int64 [B, max_len], left-padded with ``num_items`` -> [B, d] at the last position."""
        pad = seq == self.num_items
        x = self.item_emb(seq) * math.sqrt(self.cfg.dim) + self.pos_emb.weight
        x = self.emb_drop(x)
        allowed = (self._causal & (~pad.unsqueeze(1) | self._eye)).unsqueeze(1)  # [B, 1, Lq, Lk]
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, last_only=i == len(self.blocks) - 1)
        return self.norm(x[:, -1])

    def logits(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, num_items] dot-product scores of the padded histories ``seq``."""
        return self.encode(seq) @ self.item_emb.weight[: self.num_items].T

    def histories(self, batch: Samples) -> torch.Tensor:
        """The batch's histories, left-padded to ``max_len``, on the model's device."""
        return pad_histories(batch.history, self.cfg.max_len, self.num_items).to(self.device)

    def loss(self, batch: Samples) -> torch.Tensor:
        """Mean full-softmax cross-entropy of each sample's single target (uses the current mode)."""
        return F.cross_entropy(self.logits(self.histories(batch)), single_targets(batch).to(self.device))

    @torch.no_grad()
    def rank(self, batch: Samples) -> torch.Tensor:
        """[B, num_items] scores, higher is better, computed in eval mode (no dropout)."""
        was_training = self.training
        self.eval()
        try:
            return self.logits(self.histories(batch))
        finally:
            self.train(was_training)


def single_targets(samples: Samples) -> torch.Tensor:
    """int64 [N]: each sample's only target; ValueError if a sample has zero or several."""
    lengths = np.fromiter((len(t) for t in samples.targets), dtype=np.int64, count=len(samples))
    if (lengths != 1).any():
        raise ValueError("training needs exactly one target per sample (train Samples have one)")
    if not len(samples):
        return torch.empty(0, dtype=torch.int64)
    return torch.from_numpy(np.concatenate(samples.targets).astype(np.int64))


@dataclass
class SASRecHistory:
    """What :func:`fit_sasrec` measured."""

    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    valid: list[float] = field(default_factory=list)  # validation metric per epoch (empty: no valid)
    best_epoch: int = 0  # 1-based epoch whose weights the model holds (the last one without valid)
    seconds: float = 0.0  # wall-clock time of the whole fit, validation included


def fit_sasrec(
    num_items: int,
    train: Samples,
    valid: Samples | None = None,
    cfg: SASRecConfig | None = None,
    progress: bool = False,
) -> tuple[SASRec, SASRecHistory]:
    """Train SASRec on ``train`` (one target per sample) for up to ``cfg.epochs`` epochs.

    With ``valid``, ``cfg.metric`` (full ranking, ``exclude`` masked) is measured after every
    epoch; the best epoch's weights are restored at the end and training stops early after
    ``cfg.patience`` epochs without improvement. Returns the model (in eval mode) and its history.
    """
    cfg = cfg or SASRecConfig()
    name, _, k = cfg.metric.partition("@")
    if name not in METRIC_NAMES or not k.isdigit() or int(k) <= 0:
        raise ValueError(f"metric must look like 'recall@10', got {cfg.metric!r}")
    if not len(train):
        raise ValueError("no training samples")
    start_time = time.perf_counter()
    device = torch.device(cfg.device)
    seqs = pad_histories(train.history, cfg.max_len, num_items)
    targets = single_targets(train)
    if int(targets.max()) >= num_items or int(targets.min()) < 0:
        raise ValueError(f"a training target is outside [0, {num_items})")

    saved_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    history = SASRecHistory()
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(cfg.seed)
            model = SASRec(num_items, cfg).to(device)
            optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            order_rng = np.random.default_rng(cfg.seed)
            best, best_state, stale = -math.inf, None, 0
            epochs = tqdm(range(1, cfg.epochs + 1), desc="SASRec", disable=not progress)
            for epoch in epochs:
                model.train()
                order = torch.from_numpy(order_rng.permutation(len(train)))
                total = 0.0
                for idx in order.split(cfg.batch_size):
                    logits = model.logits(seqs[idx].to(device))
                    loss = F.cross_entropy(logits, targets[idx].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.item() * len(idx)
                history.losses.append(total / len(train))
                if valid is None or not len(valid):
                    history.best_epoch = epoch
                    epochs.set_postfix(loss=f"{history.losses[-1]:.4f}")
                    continue
                per_query = evaluate(model.rank, valid, batch_size=cfg.eval_batch_size, ks=(int(k),))
                value = float(np.nanmean(per_query[cfg.metric]))
                history.valid.append(value)
                epochs.set_postfix(loss=f"{history.losses[-1]:.4f}", **{cfg.metric: f"{value:.4f}"})
                if value > best:
                    best, best_state, stale = value, copy.deepcopy(model.state_dict()), 0
                    history.best_epoch = epoch
                else:
                    stale += 1
                    if cfg.patience is not None and stale >= cfg.patience:
                        break
            if best_state is not None:
                model.load_state_dict(best_state)
    finally:
        if cfg.num_threads is not None:
            torch.set_num_threads(saved_threads)
    model.eval()
    history.seconds = time.perf_counter() - start_time
    return model, history
