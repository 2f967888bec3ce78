"""Reference recommenders: MostPopular counts, SASRec learns a sequential rule, evaluation masks."""

import numpy as np
import pandas as pd
import pytest
import torch

from fellrec.baselines.common import pad_histories
from fellrec.baselines.popular import MostPopular
from fellrec.baselines.sasrec import SASRec, SASRecConfig, fit_sasrec
from fellrec.evaluate import evaluate
from fellrec.holdout import Samples
from fellrec.metrics import rank_metrics


def samples(history, targets, exclude=None) -> Samples:
    arr = lambda xs: [np.asarray(x, dtype=np.int64) for x in xs]  # noqa: E731
    return Samples(np.arange(len(targets)), arr(history), arr(targets), None if exclude is None else arr(exclude))


def cycle_data(n_items=100, n_users=150, length=20, noise=0.1, history_len=10, seed=0):
    """Each user walks the cycle i -> i+1 mod n_items from a random start; with probability
    ``noise`` a step jumps to a random item instead. Train: every position but the last (history =
    up to ``history_len`` items before it); valid: each user's last item."""
    rng = np.random.default_rng(seed)
    tr_h, tr_t, va_h, va_t = [], [], [], []
    for _ in range(n_users):
        seq = [int(rng.integers(n_items))]
        for _ in range(length - 1):
            jump = rng.random() < noise
            seq.append(int(rng.integers(n_items)) if jump else (seq[-1] + 1) % n_items)
        for i in range(1, length - 1):
            tr_h.append(seq[max(0, i - history_len):i])
            tr_t.append([seq[i]])
        va_h.append(seq[length - 1 - history_len:length - 1])
        va_t.append([seq[-1]])
    return samples(tr_h, tr_t), samples(va_h, va_t, [[] for _ in va_t])


def small_cfg(**kw) -> SASRecConfig:
    base = {"dim": 32, "blocks": 1, "heads": 2, "dropout": 0.1, "batch_size": 128, "epochs": 8,
            "lr": 3e-3, "patience": None, "seed": 7}
    return SASRecConfig(**{**base, **kw})


# ---- MostPopular --------------------------------------------------------------------------


def test_most_popular_scores_are_train_counts():
    train = pd.DataFrame({"user": [0, 0, 0, 1, 1, 2, 2, 2, 3], "item": [3, 1, 4, 3, 4, 3, 4, 1, 0]})
    model = MostPopular(6).fit(train)
    batch = samples([[0], [1, 2], [5]], [[3], [4], [2]])
    scores = model.rank(batch)
    assert scores.shape == (3, 6) and scores.dtype == torch.float32
    for row in scores:
        assert row.tolist() == [1, 2, 0, 3, 3, 0]
    # Ranking 3, 4 (tie with 3: smaller id first), 1, 0, 2 (tie with 5), 5.
    res = evaluate(model.rank, batch, ks=(1, 2, 5))
    np.testing.assert_array_equal(res["recall@1"], [1, 0, 0])
    np.testing.assert_array_equal(res["recall@2"], [1, 1, 0])
    np.testing.assert_array_equal(res["recall@5"], [1, 1, 1])
    # Masking item 3 lifts item 4 to the top.
    masked = evaluate(model.rank, samples([[0]], [[4]], [[3]]), ks=(1,))
    assert masked["recall@1"].tolist() == [1.0]


def test_most_popular_rejects_unknown_items():
    with pytest.raises(ValueError, match="outside"):
        MostPopular(3).fit(pd.DataFrame({"user": [0], "item": [3]}))


# ---- shared helpers -------------------------------------------------------------------------


def test_pad_histories_left_pads_and_keeps_the_latest_items():
    out = pad_histories([np.array([1, 2]), np.array([]), np.array([1, 2, 3, 4, 5])], 3, pad=9)
    assert out.dtype == torch.int64
    assert out.tolist() == [[9, 1, 2], [9, 9, 9], [3, 4, 5]]


def test_evaluate_never_counts_an_excluded_item():
    fixed = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])  # item 0 scores best, item 4 worst

    def rank_fn(batch: Samples) -> torch.Tensor:
        return fixed.expand(len(batch), -1).clone()

    # 0: the best item is the target but excluded -> never a hit; 1: item 0 excluded, item 1 moves
    # to rank 0; 2: nothing excluded.
    batch = samples([[0], [0], [0]], [[0], [1], [1]], [[0], [0], []])
    res = evaluate(rank_fn, batch, batch_size=2, ks=(1, 5))
    np.testing.assert_array_equal(res["recall@1"], [0, 1, 0])
    np.testing.assert_array_equal(res["recall@5"], [0, 1, 1])
    np.testing.assert_array_equal(res["hit@5"], [0, 1, 1])
    whole = rank_metrics(rank_fn(batch), batch.targets, batch.exclude, ks=(1, 5))
    for key, value in whole.items():
        np.testing.assert_array_equal(res[key], value)


def test_take_matches_select():
    _, valid = cycle_data(n_users=5)
    mask = np.zeros(len(valid), dtype=bool)
    mask[1:4] = True
    a, b = valid.take(np.arange(1, 4)), valid.select(mask)
    assert a.user.tolist() == b.user.tolist()
    assert all(np.array_equal(x, y) for x, y in zip(a.history, b.history, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(a.exclude, b.exclude, strict=True))


# ---- SASRec -------------------------------------------------------------------------------


def test_sasrec_rank_shape_eval_mode_and_empty_history():
    model = SASRec(30, small_cfg(max_len=5))
    model.train()
    batch = samples([[1, 2, 3], [], list(range(12))], [[4], [0], [12]])
    scores = model.rank(batch)
    assert scores.shape == (3, 30) and not scores.requires_grad
    assert torch.isfinite(scores).all()
    assert model.training  # rank restores the mode it found
    torch.testing.assert_close(model.rank(batch), scores)  # no dropout in rank
    # Padding does not reach real positions: a history ranks the same alone or in a padded batch.
    torch.testing.assert_close(model.rank(batch.take(np.arange(0, 1))), scores[:1])


def test_sasrec_learns_a_cycle_and_beats_most_popular():
    train, valid = cycle_data()
    model, hist = fit_sasrec(100, train, valid, small_cfg())
    assert len(hist.losses) == 8 and len(hist.valid) == 8
    assert hist.losses[-1] < 0.5 * hist.losses[0]  # starts near log(100) ≈ 4.6
    recall = np.nanmean(evaluate(model.rank, valid)["recall@10"])
    train_items = np.concatenate(train.targets)
    popular = MostPopular(100).fit(pd.DataFrame({"user": 0, "item": train_items}))
    pop_recall = np.nanmean(evaluate(popular.rank, valid)["recall@10"])
    assert pop_recall < 0.25  # about 10 / 100 by chance
    assert recall > 0.75  # the rule explains ~90% of the targets
    assert recall == pytest.approx(max(hist.valid))  # the best epoch's weights are kept
    assert hist.valid[hist.best_epoch - 1] == max(hist.valid)


def test_sasrec_same_seed_same_weights_and_global_rng_untouched():
    train, _ = cycle_data(n_users=40)
    cfg = small_cfg(epochs=2)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, _ = fit_sasrec(100, train, None, cfg)
    b, hist = fit_sasrec(100, train, None, cfg)
    torch.testing.assert_close(torch.rand(3), before)  # fitting drew nothing from the global RNG
    assert hist.best_epoch == 2 and hist.valid == []
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    c, _ = fit_sasrec(100, train, None, small_cfg(epochs=2, seed=8))
    assert not torch.equal(a.item_emb.weight, c.item_emb.weight)


def test_sasrec_early_stopping_and_loss_method():
    train, valid = cycle_data(n_users=40)
    model, hist = fit_sasrec(100, train, valid, small_cfg(epochs=30, lr=1e-5, patience=1))
    assert len(hist.losses) < 30  # a tiny learning rate stalls quickly
    assert len(hist.valid) == len(hist.losses)
    loss = model.loss(train.take(np.arange(0, 64)))
    assert loss.ndim == 0 and loss.requires_grad and 3.0 < loss.item() < 8.0  # log(100) ≈ 4.6


def test_sasrec_rejects_multi_target_training():
    bad = samples([[1], [2]], [[2, 3], [3]])
    with pytest.raises(ValueError, match="exactly one target"):
        fit_sasrec(10, bad, None, small_cfg(epochs=1))


@pytest.mark.slow
def test_sasrec_beats_most_popular_on_ml100k():
    from fellrec.config import load_config
    from fellrec.pipeline import prepare

    p = prepare(load_config(None, ["split.method=leave-one-out", "partition.method=user"]))
    s, n = p.samples, p.dataset.num_items
    popular = MostPopular(n).fit(p.split.train)
    pop = np.nanmean(evaluate(popular.rank, s.valid)["recall@10"])
    model, _ = fit_sasrec(n, s.train, s.valid, SASRecConfig(epochs=3, num_threads=1))
    sas = np.nanmean(evaluate(model.rank, s.valid)["recall@10"])
    assert sas > pop + 0.03, (sas, pop)
