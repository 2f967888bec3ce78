"""What the ID-based baselines share: histories as a padded id matrix."""

from __future__ import annotations

import numpy as np
import torch


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
