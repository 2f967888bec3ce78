"""Helpers every ranker shares: slicing ``Samples`` into batches, padding histories, evaluation.

``evaluate_ranker`` is model-agnostic: anything that maps a batch of samples to a
``[B, num_items]`` score tensor (higher is better) can be evaluated with it, the LLM backbones
included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from fellrec.metrics import rank_metrics
from fellrec.split import Samples

RankFn = Callable[[Samples], torch.Tensor]
"""A ranker: batch of samples -> ``[B, num_items]`` float scores, higher is better."""


def slice_samples(samples: Samples, start: int, stop: int) -> Samples:
    """Samples ``start:stop`` (a contiguous slice; ``Samples.select`` takes a boolean mask)."""
    return Samples(
        samples.user[start:stop],
        samples.history[start:stop],
        samples.targets[start:stop],
        None if samples.exclude is None else samples.exclude[start:stop],
    )


def iter_batches(samples: Samples, batch_size: int) -> Iterator[Samples]:
    """Consecutive batches of at most ``batch_size`` samples, in order."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(samples), batch_size):
        yield slice_samples(samples, start, start + batch_size)


def pad_histories(history: list[np.ndarray], max_len: int, pad: int) -> torch.Tensor:
    """Left-pad (or left-truncate) each history to ``max_len`` -> int64 ``[B, max_len]``.

    The most recent item is always in the last column; ``pad`` fills the columns before the
    oldest kept item. Histories longer than ``max_len`` keep their last ``max_len`` items.
    """
    out = np.full((len(history), max_len), pad, dtype=np.int64)
    for row, h in enumerate(history):
        h = np.asarray(h, dtype=np.int64)[-max_len:] if max_len > 0 else np.empty(0, dtype=np.int64)
        if len(h):
            out[row, max_len - len(h):] = h
    return torch.from_numpy(out)


def evaluate_ranker(
    rank_fn: RankFn,
    samples: Samples,
    batch_size: int = 256,
    ks: Iterable[int] = (5, 10, 20),
) -> dict[str, np.ndarray]:
    """Per-sample full-ranking metrics of ``rank_fn`` on ``samples``.

    Calls ``rank_fn`` on consecutive batches, masks each sample's ``exclude`` items (when the
    samples carry them) and scores the batch against its ``targets`` with
    :func:`fellrec.metrics.rank_metrics` (ties broken by smaller item id). Returns the
    concatenated per-sample arrays (``{"recall@10": array, ...}``, NaN for an empty target),
    ready for :func:`fellrec.metrics.summarize`.
    """
    ks = tuple(ks)
    parts: list[dict[str, np.ndarray]] = []
    for batch in iter_batches(samples, batch_size):
        scores = rank_fn(batch)
        if scores.shape[0] != len(batch):
            raise ValueError(f"rank_fn returned {scores.shape[0]} rows for a batch of {len(batch)}")
        parts.append(rank_metrics(scores, batch.targets, batch.exclude, ks=ks, batch_size=batch_size))
    if not parts:
        return rank_metrics(torch.empty((0, 1)), [], None, ks=ks)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
