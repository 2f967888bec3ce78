"""BPR matrix factorisation: learns planted tastes, deterministic, negatives avoid positives."""

import numpy as np
import pytest
import torch

from fellrec.errors import ConfigError
from fellrec.mf import sample_negatives, sampled_auc, train_bpr


def planted_pairs(n_users=60, n_groups=3, per_group=10, per_user=8, seed=0):
    """User u likes only the items of group u % n_groups; returns (users, items, num_items)."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(n_users):
        chosen = rng.choice(per_group, per_user, replace=False) + (u % n_groups) * per_group
        users += [u] * per_user
        items += chosen.tolist()
    return np.array(users), np.array(items), n_groups * per_group


def test_loss_decreases_and_auc_high():
    users, items, n_items = planted_pairs()
    result = train_bpr(users, items, 60, n_items, dim=16, epochs=30, batch_size=64, seed=1)
    assert result.user_emb.shape == (60, 16) and result.item_emb.shape == (n_items, 16)
    assert len(result.losses) == 30
    assert result.losses[0] > 0.6  # ≈ log 2 at the start
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert sampled_auc(result.user_emb, result.item_emb, users, items) > 0.9


def test_untrained_scores_are_chance():
    users, items, n_items = planted_pairs()
    result = train_bpr(users, items, 60, n_items, epochs=1, lr=1e-6, seed=0)
    auc = sampled_auc(result.user_emb, result.item_emb, users, items, num_neg=20)
    assert auc == pytest.approx(0.5, abs=0.05)


def test_same_seed_same_embeddings_other_seed_differs():
    users, items, n_items = planted_pairs()
    a = train_bpr(users, items, 60, n_items, epochs=3, seed=7)
    b = train_bpr(users, items, 60, n_items, epochs=3, seed=7)
    c = train_bpr(users, items, 60, n_items, epochs=3, seed=8)
    np.testing.assert_array_equal(a.user_emb, b.user_emb)
    np.testing.assert_array_equal(a.item_emb, b.item_emb)
    assert a.losses == b.losses
    assert not np.allclose(a.user_emb, c.user_emb)


def test_threads_restored():
    users, items, n_items = planted_pairs()
    before = torch.get_num_threads()
    train_bpr(users, items, 60, n_items, epochs=1, num_threads=1)
    assert torch.get_num_threads() == before


def test_negatives_avoid_positives():
    users, items, n_items = planted_pairs()
    keys = np.unique(users * n_items + items)
    neg = sample_negatives(users, n_items, keys, np.random.default_rng(0))
    assert neg.min() >= 0 and neg.max() < n_items
    assert not np.isin(users * n_items + neg, keys).any()


def test_scores_match_dot_product():
    users, items, n_items = planted_pairs()
    result = train_bpr(users, items, 60, n_items, epochs=1)
    expected = (result.user_emb[users[:5]] * result.item_emb[items[:5]]).sum(axis=1)
    np.testing.assert_allclose(result.scores(users[:5], items[:5]), expected, rtol=1e-6)


def test_bad_input():
    with pytest.raises(ConfigError, match="at least one"):
        train_bpr(np.array([], dtype=int), np.array([], dtype=int), 3, 3)
    with pytest.raises(ConfigError, match="epochs"):
        train_bpr(np.array([0]), np.array([1]), 3, 3, epochs=0)
    with pytest.raises(ValueError, match="out of range"):
        train_bpr(np.array([0]), np.array([5]), 3, 3)
