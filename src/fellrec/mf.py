"""BPR matrix factorisation: the user embeddings FELLRec clusters into clients.

A small, self-contained trainer (plain torch, CPU). Each user ``u`` and item ``i`` has a
``dim``-vector; the score is their dot product. Every epoch visits each training pair
``(u, i)`` once in a shuffled order, draws one negative item ``j`` per pair and minimises the
BPR loss ``-log σ(s_ui - s_uj)`` plus an L2 penalty on the rows the mini-batch touched, with Adam.

Negatives are drawn uniformly among the items the user has no training pair with: a draw that
hits one of the user's own items is redrawn (vectorised, ``_NEG_ROUNDS`` rounds), and the rare
draws still colliding after that are picked exactly from the user's complement. Only a user who
has every item keeps a positive as "negative".

Everything random comes from ``seed``: the initial embeddings from a local ``torch.Generator``,
the order of pairs and the negatives from ``np.random.default_rng``. Same seed, same inputs and
same number of torch threads give bit-identical embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fellrec.errors import ConfigError

_NEG_ROUNDS = 8


@dataclass
class MFResult:
    """Trained factors and the mean training loss of each epoch."""

    user_emb: np.ndarray
    """float32 [num_users, dim]; users without training pairs keep their random initial rows."""
    item_emb: np.ndarray
    """float32 [num_items, dim]."""
    losses: list[float] = field(default_factory=list)
    """Mean BPR loss (without the L2 term) per epoch."""

    def scores(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Dot-product scores of the pairs ``(users[k], items[k])``."""
        return np.einsum("nd,nd->n", self.user_emb[users], self.item_emb[items])


def train_bpr(
    users: np.ndarray,
    items: np.ndarray,
    num_users: int,
    num_items: int,
    *,
    dim: int = 64,
    epochs: int = 25,
    batch_size: int = 2048,
    lr: float = 0.01,
    reg: float = 0.01,
    init_std: float = 0.1,
    seed: int = 0,
    progress: bool = False,
    num_threads: int | None = 1,
) -> MFResult:
    """Train BPR-MF on the positive pairs ``(users[k], items[k])`` (dense ids).

    ``reg`` weights the squared L2 norm of the user, positive and negative rows of each
    mini-batch (averaged over the batch). ``num_threads`` sets torch's intra-op threads for the
    duration of the call (restored afterwards; None leaves them alone): the tensors are small,
    and one thread was both the fastest and the least sensitive to a busy machine.

    Defaults were measured on MovieLens-100K (80k training pairs, 943 users, 1682 items): about
    3 s for the 25 epochs on one CPU core, train AUC ≈ 0.96 and AUC ≈ 0.85 on each user's
    held-out last 20% (weaker L2 overfits: train AUC 0.98, held-out 0.82).
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    _check_args(users, items, num_users, num_items, dim, epochs, batch_size)
    saved_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(users, items, num_users, num_items, dim=dim, epochs=epochs, batch_size=batch_size,
                      lr=lr, reg=reg, init_std=init_std, seed=seed, progress=progress)
    finally:
        torch.set_num_threads(saved_threads)


def _train(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int, *, dim: int,
           epochs: int, batch_size: int, lr: float, reg: float, init_std: float, seed: int,
           progress: bool) -> MFResult:
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    user_w = torch.nn.Parameter(torch.randn(num_users, dim, generator=gen) * init_std)
    item_w = torch.nn.Parameter(torch.randn(num_items, dim, generator=gen) * init_std)
    opt = torch.optim.Adam([user_w, item_w], lr=lr, fused=True)
    pos_keys = np.unique(users * num_items + items)
    losses: list[float] = []
    bar = tqdm(range(epochs), desc="BPR-MF", unit="epoch", disable=not progress, leave=False)
    for _ in bar:
        order = rng.permutation(len(users))
        u_all = torch.from_numpy(users[order])
        i_all = torch.from_numpy(items[order])
        j_all = torch.from_numpy(sample_negatives(users[order], num_items, pos_keys, rng))
        total = 0.0
        for start in range(0, len(order), batch_size):
            u, i, j = (t[start:start + batch_size] for t in (u_all, i_all, j_all))
            eu = F.embedding(u, user_w)
            ei, ej = F.embedding(torch.stack([i, j]), item_w)
            diff = (eu * (ei - ej)).sum(dim=1)
            bpr = -F.logsigmoid(diff).mean()
            l2 = (eu.square().sum() + ei.square().sum() + ej.square().sum()) / len(u)
            opt.zero_grad(set_to_none=True)
            (bpr + reg * l2).backward()
            opt.step()
            total += bpr.item() * len(u)
        losses.append(total / len(order))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return MFResult(user_w.detach().numpy().copy(), item_w.detach().numpy().copy(), losses)


def _check_args(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int,
                dim: int, epochs: int, batch_size: int) -> None:
    if len(users) != len(items):
        raise ValueError(f"users and items differ in length ({len(users)} vs {len(items)})")
    if len(users) == 0:
        raise ConfigError("BPR-MF needs at least one training interaction")
    if num_items < 2:
        raise ConfigError("BPR-MF needs at least two items (one positive, one negative)")
    if users.min() < 0 or users.max() >= num_users or items.min() < 0 or items.max() >= num_items:
        raise ValueError("user or item id out of range")
    for name, value in (("dim", dim), ("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"BPR-MF {name} must be at least 1, got {value}")


def sample_negatives(users: np.ndarray, num_items: int, pos_keys: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """For each entry of ``users``, an item drawn uniformly among that user's non-positives.

    ``pos_keys`` is the sorted array of ``user * num_items + item`` over all positive pairs.
    """
    neg = rng.integers(0, num_items, size=len(users), dtype=np.int64)
    todo = np.arange(len(users))
    for _ in range(_NEG_ROUNDS):
        todo = todo[_contains(pos_keys, users[todo] * num_items + neg[todo])]
        if len(todo) == 0:
            return neg
        neg[todo] = rng.integers(0, num_items, size=len(todo), dtype=np.int64)
    for k in todo[_contains(pos_keys, users[todo] * num_items + neg[todo])]:
        base = users[k] * num_items
        lo, hi = np.searchsorted(pos_keys, [base, base + num_items])
        free = np.setdiff1d(np.arange(num_items), pos_keys[lo:hi] - base, assume_unique=True)
        if len(free):
            neg[k] = free[rng.integers(len(free))]
    return neg


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_keys, keys)
    pos[pos == len(sorted_keys)] = 0
    return sorted_keys[pos] == keys


def sampled_auc(
    user_emb: np.ndarray,
    item_emb: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
    *,
    exclude_users: np.ndarray | None = None,
    exclude_items: np.ndarray | None = None,
    num_neg: int = 10,
    seed: int = 0,
) -> float:
    """AUC of the pairs ``(users[k], items[k])`` against sampled negatives.

    For each pair, ``num_neg`` items are drawn uniformly among those the user has no pair with
    (in ``users``/``items`` and in the optional ``exclude_*`` pairs, e.g. the training split when
    scoring a test split); the result is the share of (positive, negative) comparisons the
    positive wins, ties counting one half. 0.5 is chance, 1.0 perfect.
    """
    users = np.asarray(users, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    num_items = len(item_emb)
    keys = users * num_items + items
    if exclude_users is not None and exclude_items is not None:
        keys = np.concatenate([keys, np.asarray(exclude_users) * num_items + np.asarray(exclude_items)])
    pos_keys = np.unique(keys)
    rng = np.random.default_rng(seed)
    pos_score = np.einsum("nd,nd->n", user_emb[users], item_emb[items])
    wins = 0.0
    for _ in range(num_neg):
        neg = sample_negatives(users, num_items, pos_keys, rng)
        neg_score = np.einsum("nd,nd->n", user_emb[users], item_emb[neg])
        wins += float((pos_score > neg_score).sum() + 0.5 * (pos_score == neg_score).sum())
    return wins / (num_neg * len(users))
