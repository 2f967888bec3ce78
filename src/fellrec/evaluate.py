"""Ranking evaluation of any recommender that scores the whole catalogue for a batch of samples."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from fellrec.holdout import Samples
from fellrec.metrics import rank_metrics, summarize
from fellrec.stats import intervals


def evaluate(rank: Callable[[Samples], torch.Tensor], samples: Samples, *, batch_size: int = 16,
             ks: Sequence[int] = (5, 10, 20), progress=None) -> dict[str, np.ndarray]:
    """Per-sample ranking metrics (see ``fellrec.metrics``): ``rank(batch)`` scores all items, each
    sample's ``exclude`` items are masked, its ``targets`` are the ground truth."""
    parts = []
    for start in range(0, len(samples), batch_size):
        batch = samples.take(np.arange(start, min(start + batch_size, len(samples))))
        scores = rank(batch)
        parts.append(rank_metrics(scores, batch.targets, batch.exclude, ks=tuple(ks)))
        if progress is not None:
            progress.update(len(batch))
    if not parts:
        return {}
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def test_summary(per_user: dict[str, np.ndarray], client_of: np.ndarray) -> dict:
    """What results.json says of a test: ``overall``, ``clients`` and ``imbalance`` (see
    ``fellrec.metrics.summarize``) and ``intervals``, the 95% bootstrap interval of every metric
    over the test users, overall and per client (``fellrec.stats.intervals``)."""
    return {**summarize(per_user, client_of), "intervals": intervals(per_user, client_of)}
