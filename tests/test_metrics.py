"""Tests of fellrec.metrics: hand-computed values, torchmetrics, a per-query loop, aggregation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fellrec.metrics import METRIC_NAMES, imbalance, metric_keys, rank_metrics, summarize

L2 = math.log2


# ---------------------------------------------------------------- hand-computed example


def _hand_example():
    dec = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]  # item i scores above item i + 1
    scores = torch.tensor(
        [
            dec,
            [0.1, 0.5, 0.3, 0.9, 0.2, 0.0],
            dec,
            [0.5, 0.5, 0.5, 0.5, 1.0, 0.5],  # ties: ranking 4, 0, 1, 2, 3, 5
            dec,
        ]
    )
    targets = [
        [1, 3, 5],  # hits at ranks 0, 2, 4 (item 0 excluded)
        [3, 2, 3],  # GT {2, 3} (duplicate dropped); 3 excluded; ranking 1, 2, 4, 0, 5: hit at rank 1
        [],  # not counted
        [0],  # hit at rank 1 (tie with 1, 2, 3, 5 broken by smaller id)
        [0, 5],  # 0 excluded; only 4 and 5 left, then -inf items: hit at rank 1 only
    ]
    exclude = [[0], [3], [1], [], [0, 1, 2, 3]]
    return scores, targets, exclude


def test_hand_computed_example():
    scores, targets, exclude = _hand_example()
    out = rank_metrics(scores, targets, exclude, ks=(1, 3, 5))
    assert list(out) == metric_keys((1, 3, 5))
    nan = math.nan
    idcg2 = 1 + 1 / L2(3)
    idcg3 = 1 + 1 / L2(3) + 1 / L2(4)
    expected = {
        "recall@1": [1 / 3, 0, nan, 0, 0],
        "recall@3": [2 / 3, 1 / 2, nan, 1, 1 / 2],
        "recall@5": [1, 1 / 2, nan, 1, 1 / 2],
        "ndcg@1": [1, 0, nan, 0, 0],
        "ndcg@3": [(1 + 1 / L2(4)) / idcg3, (1 / L2(3)) / idcg2, nan, 1 / L2(3), (1 / L2(3)) / idcg2],
        "ndcg@5": [
            (1 + 1 / L2(4) + 1 / L2(6)) / idcg3,
            (1 / L2(3)) / idcg2,
            nan,
            1 / L2(3),
            (1 / L2(3)) / idcg2,
        ],
        "hit@1": [1, 0, nan, 0, 0],
        "hit@3": [1, 1, nan, 1, 1],
        "hit@5": [1, 1, nan, 1, 1],
        "mrr@1": [1, 0, nan, 0, 0],
        "mrr@3": [1, 1 / 2, nan, 1 / 2, 1 / 2],
        "mrr@5": [1, 1 / 2, nan, 1 / 2, 1 / 2],
        "precision@1": [1, 0, nan, 0, 0],
        "precision@3": [2 / 3, 1 / 3, nan, 1 / 3, 1 / 3],
        "precision@5": [3 / 5, 1 / 5, nan, 1 / 5, 1 / 5],
    }
    for key, values in expected.items():
        np.testing.assert_allclose(out[key], values, rtol=0, atol=1e-12, err_msg=key)
    # the caller's scores are not modified by the masking
    assert torch.equal(scores, _hand_example()[0])


def test_excluded_ground_truth_never_hits_even_with_k_beyond_candidates():
    scores = torch.tensor([[0.1, 0.2, 0.3]])
    out = rank_metrics(scores, [[2, 0]], [[2]], ks=(1, 2, 3, 10))
    # ranking 1, 0, (2 at -inf): GT item 0 at rank 1; item 2 excluded but still in |GT| = 2
    assert out["recall@1"][0] == 0
    assert out["recall@3"][0] == pytest.approx(1 / 2)
    assert out["recall@10"][0] == pytest.approx(1 / 2)
    assert out["ndcg@10"][0] == pytest.approx((1 / L2(3)) / (1 + 1 / L2(3)))
    assert out["precision@10"][0] == pytest.approx(1 / 10)


def test_tie_breaking_is_by_smaller_item_id():
    # all equal: ranking is 0, 1, 2, ... whatever order topk returns internally
    n = 50
    scores = torch.zeros(3, n)
    scores[2, 30:] = 1.0  # items 30..49 tie at the top
    out = rank_metrics(scores, [[2], [3], [31]], ks=(3, 4))
    assert out["hit@3"].tolist() == [1, 0, 1]
    assert out["hit@4"].tolist() == [1, 1, 1]
    np.testing.assert_allclose(out["mrr@4"], [1 / 3, 1 / 4, 1 / 2])
    np.testing.assert_allclose(out["ndcg@3"], [1 / L2(4), 0, 1 / L2(3)])


def test_input_errors():
    scores = torch.rand(2, 5)
    with pytest.raises(ValueError, match="outside"):
        rank_metrics(scores, [[5], [0]])
    with pytest.raises(ValueError, match="entries"):
        rank_metrics(scores, [[1]])
    with pytest.raises(ValueError, match="positive"):
        rank_metrics(scores, [[1], [2]], ks=(0, 5))
    bad = scores.clone()
    bad[1, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(bad, [[1], [2]])


# ---------------------------------------------------------------- random rankings


def _random_case(seed: int, n_q: int = 50, n_items: int = 200, overlap: bool = False, ties: bool = False):
    rng = np.random.default_rng(seed)
    # strictly positive, continuous scores: no ties, and torchmetrics' recall, precision and MRR
    # count a relevant item only where its score is > 0 (they filter `preds > 0`)
    scores = rng.uniform(0.01, 1.0, size=(n_q, n_items))
    if ties:
        scores = np.round(scores * 8) / 8  # 9 distinct values: many ties, also at the cut-offs
    targets, exclude = [], []
    for q in range(n_q):
        n_gt = 0 if q % 17 == 3 else int(rng.integers(1, 16))
        perm = rng.permutation(n_items)
        gt = perm[:n_gt]
        n_ex = int(rng.integers(0, 30))
        ex = perm[n_gt : n_gt + n_ex]
        if overlap and n_gt > 1:
            ex = np.concatenate([ex, gt[:1]])  # one GT item is also in the history
        targets.append(gt)
        exclude.append(ex)
    return torch.tensor(scores, dtype=torch.float32), targets, exclude


def test_against_torchmetrics():
    torchmetrics = pytest.importorskip("torchmetrics")
    from torchmetrics.retrieval import (
        RetrievalHitRate,
        RetrievalMRR,
        RetrievalNormalizedDCG,
        RetrievalPrecision,
        RetrievalRecall,
    )

    scores, targets, exclude = _random_case(0)
    n_q, n_items = scores.shape
    ks = (5, 10, 20)
    ours = rank_metrics(scores, targets, exclude, ks=ks)

    # torchmetrics sees each query's candidates without its excluded items (removed, not masked).
    # Exclusions are disjoint from the GT here, so |GT| is the same for both.
    preds, target, indexes = [], [], []
    for q in range(n_q):
        keep = np.setdiff1d(np.arange(n_items), exclude[q])
        preds.append(scores[q, keep])
        target.append(torch.from_numpy(np.isin(keep, targets[q])))
        indexes.append(torch.full((keep.size,), q, dtype=torch.long))
    preds_t, target_t, indexes_t = torch.cat(preds), torch.cat(target), torch.cat(indexes)
    counted = np.array([len(t) > 0 for t in targets])
    assert 0 < counted.sum() < n_q  # some queries have an empty GT

    def per_query(values, dim=None):  # keep the per-query values instead of their mean
        return values

    # torchmetrics semantics checked in its source (1.9): RetrievalPrecision divides by top_k
    # (adaptive_k=False) like ours; every query here has >= 170 candidates > 20 anyway.
    # RetrievalMRR with top_k is 1/(rank+1) of the first hit inside the top k, else 0: ours.
    # RetrievalNormalizedDCG's ideal DCG covers min(|GT|, k) positions: ours.
    classes = {
        "recall": RetrievalRecall,
        "ndcg": RetrievalNormalizedDCG,
        "hit": RetrievalHitRate,
        "mrr": RetrievalMRR,
        "precision": RetrievalPrecision,
    }
    for name, cls in classes.items():
        for k in ks:
            metric = cls(top_k=k, empty_target_action="skip", aggregation=per_query)
            ref = metric(preds_t, target_t, indexes=indexes_t).double().numpy()
            got = ours[f"{name}@{k}"]
            assert np.isnan(got).tolist() == (~counted).tolist()
            np.testing.assert_allclose(got[counted], ref, rtol=0, atol=1e-6, err_msg=f"{name}@{k}")
    assert torchmetrics is not None


def _loop_reference(scores: np.ndarray, targets, exclude, k: int) -> dict[str, float | None]:
    """FELLRec-style per-query loop; ranking by (-score, item id), excluded items removed."""
    out: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    for q in range(scores.shape[0]):
        gt = set(int(i) for i in targets[q])
        if not gt:
            for name in METRIC_NAMES:
                out[name].append(math.nan)
            continue
        banned = set(int(i) for i in exclude[q])
        ranking = sorted(
            (i for i in range(scores.shape[1]) if i not in banned), key=lambda i: (-scores[q, i], i)
        )
        hits, dcg, rr = 0, 0.0, 0.0
        for r, item in enumerate(ranking[:k]):
            if item in gt:
                hits += 1
                dcg += 1 / math.log2(r + 2)
                if rr == 0.0:
                    rr = 1 / (r + 1)
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(gt), k)))
        out["recall"].append(hits / len(gt))
        out["ndcg"].append(dcg / idcg)
        out["hit"].append(float(hits > 0))
        out["mrr"].append(rr)
        out["precision"].append(hits / k)
    return out


@pytest.mark.parametrize("ties", [False, True])
def test_against_python_loop_with_ties_and_excluded_ground_truth(ties):
    # torchmetrics averages ties in nDCG and cannot express "excluded but still in |GT|",
    # so this case is checked against a plain loop with the documented semantics instead.
    scores, targets, exclude = _random_case(1, n_q=40, n_items=120, overlap=True, ties=ties)
    ks = (5, 10, 20)
    ours = rank_metrics(scores, targets, exclude, ks=ks, batch_size=7)
    s = scores.numpy().astype(np.float64)
    for k in ks:
        ref = _loop_reference(s, targets, exclude, k)
        for name in METRIC_NAMES:
            np.testing.assert_allclose(
                ours[f"{name}@{k}"], ref[name], rtol=0, atol=1e-12, err_msg=f"{name}@{k}"
            )


def test_batches_give_the_same_result():
    scores, targets, exclude = _random_case(2, n_q=45, n_items=90, overlap=True, ties=True)
    whole = rank_metrics(scores, targets, exclude, batch_size=10_000)
    small = rank_metrics(scores, targets, exclude, batch_size=4)
    parts = [rank_metrics(scores[a : a + 16], targets[a : a + 16], exclude[a : a + 16]) for a in (0, 16, 32)]
    for key in whole:
        np.testing.assert_array_equal(whole[key], small[key])
        np.testing.assert_array_equal(whole[key], np.concatenate([p[key] for p in parts]))


# ---------------------------------------------------------------- aggregation


def test_imbalance_against_numpy():
    rng = np.random.default_rng(3)
    x = rng.uniform(0.05, 0.6, size=13)
    got = imbalance(x)
    mean = x.mean()
    std = math.sqrt(np.mean((x - mean) ** 2))
    gini = np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size**2 * mean)
    assert got["std"] == pytest.approx(std, abs=1e-12)
    assert got["min"] == x.min() and got["max"] == x.max()
    assert got["max_min_ratio"] == pytest.approx(x.max() / x.min())
    assert got["cv"] == pytest.approx(std / mean)
    assert got["gini"] == pytest.approx(gini, abs=1e-12)
    assert all(type(v) is float for v in got.values())


def test_imbalance_small_cases_and_none():
    equal = imbalance([0.2, 0.2, 0.2])
    assert equal == pytest.approx(
        {"std": 0.0, "min": 0.2, "max": 0.2, "max_min_ratio": 1.0, "cv": 0.0, "gini": 0.0}, abs=1e-15
    )
    two = imbalance([0.0, 1.0])
    assert two["max_min_ratio"] is None
    assert two["std"] == 0.5 and two["cv"] == 1.0
    assert two["gini"] == pytest.approx(2 * 1.0 / (2 * 4 * 0.5))  # = 0.5
    zeros = imbalance(np.zeros(4))
    assert zeros["max_min_ratio"] is None and zeros["cv"] is None and zeros["gini"] is None
    assert zeros["std"] == 0.0
    with pytest.raises(ValueError):
        imbalance([])
    with pytest.raises(ValueError):
        imbalance([0.1, math.nan])


def test_summarize_hand_example():
    nan = math.nan
    per_query = {
        "recall@5": np.array([1.0, 0.0, 0.5, nan, 0.25, nan]),
        "hit@5": np.array([1.0, 0.0, 1.0, nan, 1.0, nan]),
    }
    clients = np.array([7, 7, 3, 3, 3, 9])  # client 9 has no counted query
    res = summarize(per_query, clients)
    assert set(res["clients"]) == {3, 7}
    assert res["clients"][7] == {"recall@5": 0.5, "hit@5": 0.5, "n": 2}
    assert res["clients"][3] == {"recall@5": (0.5 + 0.25) / 2, "hit@5": 1.0, "n": 2}
    assert res["overall"]["recall@5"] == pytest.approx((1.0 + 0.0 + 0.5 + 0.25) / 4)
    assert res["overall"]["hit@5"] == pytest.approx(3 / 4)
    assert res["imbalance"]["hit@5"]["max_min_ratio"] == 2.0
    assert res["imbalance"]["recall@5"]["std"] == pytest.approx(abs(0.5 - 0.375) / 2)
    json.dumps(res)  # plain Python values only


def test_summarize_overall_is_weighted_mean_of_clients_and_pooled_mean():
    scores, targets, exclude = _random_case(4, n_q=60, n_items=150)
    per_query = rank_metrics(scores, targets, exclude)
    rng = np.random.default_rng(5)
    client_of_query = rng.choice(np.array(["a", "b", "c", "d"]), size=60, p=[0.5, 0.3, 0.15, 0.05])
    res = summarize(per_query, client_of_query)
    counted = ~np.isnan(per_query["recall@10"])
    assert sum(c["n"] for c in res["clients"].values()) == counted.sum()
    for key, values in per_query.items():
        for cid, entry in res["clients"].items():
            mask = counted & (client_of_query == cid)
            assert entry["n"] == mask.sum()
            assert entry[key] == pytest.approx(values[mask].mean(), abs=1e-12)
        weighted = sum(c["n"] * c[key] for c in res["clients"].values()) / counted.sum()
        assert res["overall"][key] == pytest.approx(weighted, abs=1e-12)
        assert res["overall"][key] == pytest.approx(np.nanmean(values), abs=1e-12)
        means = [c[key] for c in res["clients"].values()]
        assert res["imbalance"][key]["std"] == pytest.approx(float(np.std(means)), abs=1e-12)
    json.dumps(res)


def test_summarize_rejects_misaligned_input():
    with pytest.raises(ValueError):
        summarize({"recall@5": np.array([0.1, 0.2])}, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        summarize({"a": np.array([0.1, math.nan]), "b": np.array([0.1, 0.2])}, np.array([0, 1]))


def test_nan_is_rejected_even_next_to_ties_but_not_when_excluded():
    scores = torch.tensor([[0.5, math.nan, 0.5, 0.5]])
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(scores, [[0]], ks=(2,))
    out = rank_metrics(scores, [[0]], [[1]], ks=(2,))
    assert out["hit@2"][0] == 1
