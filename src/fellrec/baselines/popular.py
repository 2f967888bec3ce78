"""MostPopular: every user gets the same ranking, items by their number of training interactions.

``score(i) = |{(u, i) in train}|`` — the count of item ``i`` among the TRAIN interactions (the
``Split.train`` DataFrame: one row per interaction, so an item's first interaction by a user
counts too, unlike the train ``Samples``' targets, which skip each user's first item).

Ties are not broken here: equal counts get equal scores, and :func:`fellrec.metrics.rank_metrics`
breaks ties deterministically by smaller item id. Items never seen in train score 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from fellrec.holdout import Samples


class MostPopular:
    """Non-personalised popularity ranker. ``MostPopular(num_items).fit(split.train)``."""

    def __init__(self, num_items: int) -> None:
        if num_items <= 0:
            raise ValueError(f"num_items must be positive, got {num_items}")
        self.num_items = num_items
        self.counts = torch.zeros(num_items, dtype=torch.float32)

    def fit(self, interactions: pd.DataFrame) -> MostPopular:
        """Count each item's rows in ``interactions`` (a DataFrame with an ``item`` column of dense ids)."""
        items = interactions["item"].to_numpy().astype(np.int64)
        if len(items) and (items.min() < 0 or items.max() >= self.num_items):
            raise ValueError(f"interactions hold an item id outside [0, {self.num_items})")
        # float32 holds integer counts exactly up to 2**24 interactions per item.
        self.counts = torch.from_numpy(np.bincount(items, minlength=self.num_items).astype(np.float32))
        return self

    def rank(self, batch: Samples) -> torch.Tensor:
        """``[B, num_items]`` scores: the item counts, the same row for every sample."""
        return self.counts.unsqueeze(0).expand(len(batch), -1).clone()
