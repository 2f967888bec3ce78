"""Full-ranking evaluation: per-query top-K metrics (recall, precision, hit, NDCG, MRR) and their
aggregation across clients (per-client means, the test-size-weighted overall mean, the imbalance
across clients). Excluded items (the user's history) never rank; ties go to the smaller item id; a
query without a ground truth is NaN and not counted. The definitions, and where they differ from
FELLRec's released evaluation, are in docs/EVALUATION.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["METRIC_NAMES", "imbalance", "metric_keys", "rank_metrics", "summarize"]

METRIC_NAMES = ("recall", "ndcg", "hit", "mrr", "precision")
"""The metrics :func:`rank_metrics` reports, each once per K (``"recall@10"``, ...)."""


def metric_keys(ks: Iterable[int] = (5, 10, 20)) -> list[str]:
    """The keys of :func:`rank_metrics`' result, in its order: metric-major, then ascending K."""
    return [f"{name}@{k}" for name in METRIC_NAMES for k in sorted({int(k) for k in ks})]


def _flatten(lists: Sequence[Any], n_queries: int, n_items: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-query id lists → sorted unique keys ``query * n_items + item`` and per-query counts."""
    if len(lists) != n_queries:
        raise ValueError(f"{what} has {len(lists)} entries but scores has {n_queries} rows")
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=n_queries)
    if lengths.sum() == 0:
        return np.empty(0, dtype=np.int64), np.zeros(n_queries, dtype=np.int64)
    items = np.concatenate([np.asarray(x, dtype=np.int64).reshape(-1) for x in lists])
    if items.min() < 0 or items.max() >= n_items:
        raise ValueError(f"{what} holds an item id outside [0, {n_items})")
    queries = np.repeat(np.arange(n_queries, dtype=np.int64), lengths)
    keys = np.sort(queries * n_items + items)
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]  # unique (np.unique is far slower)
    counts = np.bincount(keys // n_items, minlength=n_queries)
    return keys, counts


def _top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` scores and item ids per row, in descending score; the set of items is the one
    where ties at the k-th score are settled by smaller item id (the order inside is settled later
    by :func:`_order_ties`)."""
    n_items = scores.shape[1]
    # One more than needed: if the (k+1)-th score equals the k-th, some item left out of the top k
    # ties with one inside it, and topk may have picked either (its order of ties is unspecified).
    # topk ranks NaN above everything, so a row holding a NaN has one in column 0.
    vals, idx = torch.topk(scores, min(k + 1, n_items), dim=1, largest=True, sorted=True)
    suspect = torch.isnan(vals[:, 0])
    if k < n_items:
        suspect |= vals[:, k] == vals[:, k - 1]
    rows = torch.nonzero(suspect).view(-1)
    vals, idx = vals[:, :k], idx[:, :k]
    if rows.numel() > 0:
        if torch.isnan(vals[rows, 0]).any():
            raise ValueError("scores contain NaN (outside the excluded items)")
        # Redo these rows: every item above the k-th score, then the smallest ids equal to it.
        vals, idx = vals.clone(), idx.clone()
        sub = scores[rows]
        sub_kth = vals[rows, k - 1 :]
        above = sub > sub_kth
        equal = sub == sub_kth
        room = k - above.sum(dim=1, keepdim=True)
        keep = above | (equal & (torch.cumsum(equal, dim=1) <= room))
        sub_idx = torch.nonzero(keep)[:, 1].view(-1, k)  # row-major, so ascending ids per row
        idx[rows] = sub_idx
        vals[rows] = torch.gather(sub, 1, sub_idx)
    return vals, idx


def _order_ties(vals: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each row by descending score, then ascending item id (sort by id, then stable by score)."""
    idx, order = torch.sort(idx, dim=1)
    vals = torch.gather(vals, 1, order)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    return vals, torch.gather(idx, 1, order)


@torch.no_grad()
def rank_metrics(
    scores: torch.Tensor | np.ndarray,
    targets: Sequence[Any],
    exclude: Sequence[Any] | None = None,
    ks: Iterable[int] = (5, 10, 20),
    batch_size: int = 1024,
) -> dict[str, np.ndarray]:
    """Per-query full-ranking metrics (see the module docstring for the definitions).

    Args:
        scores: ``[n_queries, n_items]`` float scores, higher is better. Not modified.
        targets: per query, the ground-truth item ids (any int array-like; may be empty).
        exclude: per query, item ids removed from the ranking (the user's history), or None.
        ks: cut-offs; each must be a positive int (K larger than n_items is allowed: the missing
            ranks are misses). Sorted and deduplicated.
        batch_size: queries evaluated at once; bounds the extra memory to about
            ``batch_size × n_items`` scores.

    Returns:
        ``{"recall@5": array, ...}`` for every metric in :data:`METRIC_NAMES` and K in ``ks``,
        each a float64 array of length ``n_queries``; NaN for queries with an empty ground
        truth (those are not counted; ``~np.isnan(result[key])`` is the counted mask).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] <= 0:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    scores = torch.as_tensor(scores)
    if scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a 2-D float tensor, got {tuple(scores.shape)} {scores.dtype}")
    n_queries, n_items = scores.shape
    if n_items == 0:
        raise ValueError("scores has no items (0 columns)")
    device = scores.device

    gt_keys_np, n_gt_np = _flatten(targets, n_queries, n_items, "targets")
    gt_keys = torch.from_numpy(gt_keys_np).to(device)
    if exclude is not None:
        ex_keys_np, _ = _flatten(exclude, n_queries, n_items, "exclude")

    k_max = max(ks)
    k_top = min(k_max, n_items)
    starts = np.arange(0, n_queries, batch_size)
    stops = np.minimum(starts + batch_size, n_queries)
    if exclude is not None:
        # Each batch's slice of the exclusions, as flat positions inside the batch. Prepared here
        # in numpy: small torch ops inside the loop cost a thread wake-up each on a busy CPU.
        ex_lo = np.searchsorted(ex_keys_np, starts * n_items)
        ex_hi = np.searchsorted(ex_keys_np, stops * n_items)
        ex_pos = torch.from_numpy(ex_keys_np % (batch_size * n_items)).to(device)
        minus_inf = torch.full(
            (int((ex_hi - ex_lo).max(initial=0)),), -math.inf, dtype=scores.dtype, device=device
        )
    top_vals = torch.empty((n_queries, k_top), dtype=scores.dtype, device=device)
    top_idx = torch.empty((n_queries, k_top), dtype=torch.int64, device=device)
    buffer = None
    for b, (start, stop) in enumerate(zip(starts.tolist(), stops.tolist(), strict=True)):
        chunk = scores[start:stop]
        if exclude is not None and ex_hi[b] > ex_lo[b]:
            if buffer is None:  # reused across batches: no fresh allocation per batch
                buffer = torch.empty((min(batch_size, n_queries), n_items), dtype=scores.dtype, device=device)
            chunk = buffer[: stop - start].copy_(chunk)
            # scatter_ from a tensor: on CPU much faster than index_put / index_fill_ with 2 threads
            chunk.view(-1).scatter_(0, ex_pos[ex_lo[b] : ex_hi[b]], minus_inf[: ex_hi[b] - ex_lo[b]])
        top_vals[start:stop], top_idx[start:stop] = _top_k(chunk, k_top)
    del buffer

    # Small [n_queries, k] work, done once for all batches.
    top_vals, top_idx = _order_ties(top_vals, top_idx)
    hits = torch.zeros((n_queries, k_max), dtype=torch.bool, device=device)
    if gt_keys.numel() > 0:
        keys = torch.arange(n_queries, device=device, dtype=torch.int64).unsqueeze(1) * n_items + top_idx
        pos = torch.searchsorted(gt_keys, keys).clamp_(max=gt_keys.numel() - 1)
        hits[:, :k_top] = (gt_keys[pos] == keys) & (top_vals > -math.inf)

    hits = hits.cpu().numpy()
    n_gt = n_gt_np.astype(np.float64)
    counted = n_gt_np > 0
    discount = 1.0 / np.log2(np.arange(k_max, dtype=np.float64) + 2.0)
    cum_hits = np.cumsum(hits, axis=1, dtype=np.float64)
    cum_dcg = np.cumsum(hits * discount, axis=1)
    cum_idcg = np.concatenate([[0.0], np.cumsum(discount)])
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), k_max)  # 0-based rank of first hit
    with np.errstate(divide="ignore", invalid="ignore"):
        rr = np.where(first < k_max, 1.0 / (first + 1.0), 0.0)
        out: dict[str, np.ndarray] = {}
        per_k: dict[str, dict[int, np.ndarray]] = {name: {} for name in METRIC_NAMES}
        for k in ks:
            h = cum_hits[:, k - 1]
            per_k["recall"][k] = h / n_gt
            per_k["ndcg"][k] = cum_dcg[:, k - 1] / cum_idcg[np.minimum(n_gt_np, k)]
            per_k["hit"][k] = (h > 0).astype(np.float64)
            per_k["mrr"][k] = np.where(first < k, rr, 0.0)
            per_k["precision"][k] = h / k
    for name in METRIC_NAMES:
        for k in ks:
            out[f"{name}@{k}"] = np.where(counted, per_k[name][k], np.nan)
    return out


def imbalance(values: Iterable[float]) -> dict[str, float | None]:
    """Spread of per-client values: std, min, max, max_min_ratio, cv and gini, as Python floats.

    - ``std``: population standard deviation (ddof=0).
    - ``max_min_ratio`` = max / min; None when min == 0.
    - ``cv`` = std / mean; None when mean == 0.
    - ``gini`` = Σ_i Σ_j |x_i − x_j| / (2 n² mean); None when mean == 0.

    Meant for non-negative values (metrics). Raises ValueError on no values or a NaN.
    """
    x = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=np.float64)
    x = x.reshape(-1)
    if x.size == 0:
        raise ValueError("imbalance needs at least one value")
    if np.isnan(x).any():
        raise ValueError("imbalance got a NaN value")
    n = x.size
    mean = float(x.mean())
    std = float(x.std(ddof=0))
    lo, hi = float(x.min()), float(x.max())
    # Σ_i Σ_j |x_i − x_j| = 2 Σ_i (2i − n + 1) x_(i) over the values sorted ascending (0-based i).
    s = np.sort(x)
    abs_diff_sum = 2.0 * float(np.sum((2.0 * np.arange(n) - n + 1.0) * s))
    return {
        "std": std,
        "min": lo,
        "max": hi,
        "max_min_ratio": None if lo == 0 else hi / lo,
        "cv": None if mean == 0 else std / mean,
        "gini": None if mean == 0 else abs_diff_sum / (2.0 * n * n * mean),
    }


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def summarize(per_query: dict[str, np.ndarray], client_of_query: np.ndarray) -> dict[str, Any]:
    """Aggregate :func:`rank_metrics`' per-query arrays by client.

    Args:
        per_query: metric name → per-query values (NaN = query not counted).
        client_of_query: the client id of each query, same length as the arrays.

    Returns:
        ``{"overall": {metric: value}, "clients": {client_id: {metric: value, "n": count}},
        "imbalance": {metric: imbalance(per-client means)}}``, all plain Python values.
        ``n`` is the number of counted queries of the client; clients without any counted
        query are left out of ``clients`` and of the imbalance statistics (they weigh nothing in
        ``overall``). Client ids are converted to Python scalars (int or str). With no counted
        query at all, every overall metric is None and ``clients`` and ``imbalance`` are empty.
    """
    client_of_query = np.asarray(client_of_query).reshape(-1)
    names = list(per_query)
    if not names:
        raise ValueError("per_query holds no metric")
    arrays = [np.asarray(per_query[m], dtype=np.float64).reshape(-1) for m in names]
    for m, a in zip(names, arrays, strict=True):
        if a.shape != client_of_query.shape:
            raise ValueError(f"{m} has {a.size} values but client_of_query has {client_of_query.size}")
    counted = ~np.isnan(arrays[0])
    for m, a in zip(names, arrays, strict=True):
        if not np.array_equal(~np.isnan(a), counted):
            raise ValueError(f"{m} counts other queries than {names[0]} (NaN in different places)")

    clients, inverse = np.unique(client_of_query[counted], return_inverse=True)
    n = np.bincount(inverse, minlength=clients.size).astype(np.float64)
    means = {
        m: np.bincount(inverse, weights=a[counted], minlength=clients.size) / n
        for m, a in zip(names, arrays, strict=True)
    }
    total = n.sum()
    overall = {m: (float(np.sum(n * means[m]) / total) if total > 0 else None) for m in names}
    per_client: dict[Any, dict[str, Any]] = {}
    for c, cid in enumerate(clients):
        entry: dict[str, Any] = {m: float(means[m][c]) for m in names}
        entry["n"] = int(n[c])
        per_client[_py(cid)] = entry
    spread = {m: imbalance(means[m]) for m in names} if clients.size else {}
    return {"overall": overall, "clients": per_client, "imbalance": spread}
