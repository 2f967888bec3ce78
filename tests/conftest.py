"""Shared fixtures: small synthetic datasets built in code."""

import numpy as np
import pandas as pd
import pytest
import torch

from fellrec.data.tables import Dataset


def random_dataset(n_users=40, n_items=60, n_inter=900, seed=0, ties=True) -> Dataset:
    """Random interactions with many same-user timestamp ties and a few users/items below 5-core."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n_inter)
    items = rng.zipf(1.6, n_inter) % n_items
    ts = rng.integers(0, 200 if ties else 10**9, n_inter).astype(float)
    inter = pd.DataFrame({"user_id": users + 100, "item_id": items + 1000, "timestamp": ts,
                          "rating": rng.integers(1, 6, n_inter).astype(float)})
    genres = ["Drama", "Comedy", "Action", "Horror"]
    item_tab = pd.DataFrame({"item_id": np.arange(n_items) + 1000,
                             "title": [f"Movie {i}" for i in range(n_items)],
                             "genres": [(genres[i % 4],) for i in range(n_items)]})
    user_tab = pd.DataFrame({"user_id": np.arange(n_users) + 100,
                             "occupation": [["writer", "artist", "doctor"][u % 3] for u in range(n_users)],
                             "age": rng.integers(15, 70, n_users)})
    return Dataset.from_raw("random", inter, item_tab, user_tab)


@pytest.fixture
def small_dataset() -> Dataset:
    return random_dataset()


def train_few(model, loss, batch, steps, lr=1e-2):
    """``steps`` AdamW steps on one fixed batch at a constant learning rate; the losses."""
    from fellrec.config import TrainConfig
    from fellrec.train import BatchSampler, make_optimizer, train_steps

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, TrainConfig(lr=lr, schedule="constant"), steps)
    torch.manual_seed(0)  # LoRA dropout
    return train_steps(model, loss, batch, steps=steps, sampler=BatchSampler(len(batch), len(batch), 0),
                       optimizer=optimizer, scheduler=scheduler)


@pytest.fixture
def train_a_little():
    """The ``train_few`` helper, for tests that train a model for a few steps."""
    return train_few


@pytest.fixture
def make_dataset():
    """The random_dataset builder, for tests that need several sizes or seeds."""
    return random_dataset
