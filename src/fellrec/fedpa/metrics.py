"""CTR metrics for FedPA (research/fedpa.md §1.2): predictions are click probabilities, labels 0/1.

- ``auc``: ROC AUC over the pooled predictions of all users (the released ``fed_evaluate``);
- ``gauc``: each user's own AUC, averaged over the users whose samples hold both classes, every
  such user counting once (unweighted: "per-user AUC averaged"); ``gauc_weighted`` weights each
  user by their number of impressions, as DIN's GAUC does. The notes fix no weighting, so both
  are given; users with one class only are left out of both (``gauc_users`` counts the rest);
- ``logloss``: mean binary cross-entropy with predictions clipped to [1e-7, 1 − 1e-7];
- ``precision``/``recall``/``f1``: scikit-learn's ``average="weighted"`` over the two classes
  after rounding the predictions (positive iff p > 0.5; p = 0.5 rounds to 0 as ``torch.round``
  does), with ``zero_division=0``.

Every metric that a sample set cannot define (one class only, no samples) is NaN.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import precision_recall_fscore_support

EPS = 1e-7


def logloss(pred: np.ndarray, label: np.ndarray) -> float:
    if len(pred) == 0:
        return float("nan")
    p = np.clip(np.asarray(pred, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(label, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def auc(pred: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC by Mann-Whitney (ties count one half), equal to ``sklearn.metrics.roc_auc_score``."""
    label = np.asarray(label, dtype=np.float64)
    if len(label) == 0 or label.min() == label.max():
        return float("nan")
    ranks = rankdata(np.asarray(pred, dtype=np.float64))
    pos = label > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_user_auc(pred: np.ndarray, label: np.ndarray, users: np.ndarray) -> pd.DataFrame:
    """One row per user with both classes: ``user``, ``auc``, ``n`` (impressions).

    Vectorised Mann-Whitney: within each user the predictions are ranked (ties get their average
    rank) and AUC = (Σ ranks of positives − P(P+1)/2) / (P·N).
    """
    frame = pd.DataFrame({"user": np.asarray(users), "p": np.asarray(pred, dtype=np.float64),
                          "y": np.asarray(label, dtype=np.float64)})
    frame["r"] = frame.groupby("user", sort=False)["p"].rank(method="average")
    frame["ry"] = frame["r"] * frame["y"]
    g = frame.groupby("user", sort=True).agg(n=("y", "size"), pos=("y", "sum"), rsum=("ry", "sum"))
    g["neg"] = g["n"] - g["pos"]
    g = g[(g["pos"] > 0) & (g["neg"] > 0)]
    g["auc"] = (g["rsum"] - g["pos"] * (g["pos"] + 1) / 2) / (g["pos"] * g["neg"])
    return g.reset_index()[["user", "auc", "n"]]


def ctr_metrics(pred: np.ndarray, label: np.ndarray, users: np.ndarray | None = None) -> dict[str, float]:
    """Every metric above over one pooled sample set (GAUC needs ``users``, the user of each sample)."""
    pred = np.asarray(pred, dtype=np.float64)
    label = np.asarray(label, dtype=np.float64)
    out = {"n": len(label), "auc": auc(pred, label), "logloss": logloss(pred, label)}
    if len(label):
        p, r, f, _ = precision_recall_fscore_support(label.astype(int), (pred > 0.5).astype(int), average="weighted",
                                                     labels=[0, 1], zero_division=0)
        out.update(precision=float(p), recall=float(r), f1=float(f))
    else:
        out.update(precision=float("nan"), recall=float("nan"), f1=float("nan"))
    if users is not None:
        per = per_user_auc(pred, label, users)
        out["gauc"] = float(per["auc"].mean()) if len(per) else float("nan")
        out["gauc_weighted"] = float(np.average(per["auc"], weights=per["n"])) if len(per) else float("nan")
        out["gauc_users"] = len(per)
    return out
