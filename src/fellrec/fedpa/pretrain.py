"""Open_Train (research/fedpa.md §2): the foundation model trained centrally on every interaction of
the public users, then saved as a safetensors checkpoint (written atomically).

Defaults follow the released code: Adam, lr 1e-3, batch 1024, latent dim 8, layers (32, 8), no
weight decay; it runs ``epochs`` epochs and keeps the epoch with the best train AUC on the public
interactions (``keep="best_train_auc"``, as the released code saves whenever that improves) or
the last one (``keep="last"``). Reproducible from ``seed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from fellrec.fedpa.features import FeatureTable
from fellrec.fedpa.metrics import auc
from fellrec.fedpa.model import CTRModel
from fellrec.files import save_tensors


@dataclass
class PretrainResult:
    model: CTRModel
    history: list[dict[str, float]]
    epoch: int
    """The epoch whose weights the model holds (1-based; 0 when nothing trained)."""


def interaction_tensors(feats: FeatureTable, users: np.ndarray, items: np.ndarray,
                        rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(user codes [n, U], item codes [n, W], labels [n]) of the interactions ``rows``."""
    return (torch.from_numpy(feats.user_codes[users[rows]]), torch.from_numpy(feats.item_codes[items[rows]]),
            torch.from_numpy(feats.label[rows]))


def new_model(feats: FeatureTable, dim: int = 8, hidden: tuple[int, ...] = (32, 8), seed: int = 0) -> CTRModel:
    torch.manual_seed(seed)
    return CTRModel(feats.user_cards, feats.item_cards, feats.item_widths, dim=dim, hidden=hidden)


def pretrain(feats: FeatureTable, users: np.ndarray, items: np.ndarray, rows: np.ndarray, *, epochs: int = 100,
             dim: int = 8, hidden: tuple[int, ...] = (32, 8), lr: float = 1e-3, batch_size: int = 1024,
             weight_decay: float = 0.0, seed: int = 0, keep: str = "best_train_auc",
             eval_batch_size: int = 65536) -> PretrainResult:
    """Train the foundation model on interactions ``rows`` (``users``/``items``: dense ids per interaction)."""
    if keep not in ("best_train_auc", "last"):
        raise ValueError(f"keep must be 'best_train_auc' or 'last', got {keep!r}")
    model = new_model(feats, dim, hidden, seed)
    uc, ic, y = interaction_tensors(feats, users, items, np.asarray(rows))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history, best, best_state, best_epoch = [], -np.inf, None, 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            loss = F.binary_cross_entropy_with_logits(model(uc[idx], ic[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        record = {"epoch": epoch, "train_loss": total / max(1, len(y))}
        if keep == "best_train_auc":
            record["train_auc"] = auc(predict(model, uc, ic, eval_batch_size), y.numpy())
            if record["train_auc"] > best:
                best, best_epoch = record["train_auc"], epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(record)
    if keep == "best_train_auc" and best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = epochs
    model.eval()
    return PretrainResult(model, history, best_epoch)


@torch.no_grad()
def predict(model: CTRModel, user_codes: torch.Tensor, item_codes: torch.Tensor,
            batch_size: int = 65536) -> np.ndarray:
    """Click probabilities of the rows of (user_codes, item_codes)."""
    model.eval()
    out = [torch.sigmoid(model(user_codes[s:s + batch_size], item_codes[s:s + batch_size]))
           for s in range(0, len(user_codes), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def save_pretrained(path: str | Path, model: CTRModel, feats: FeatureTable | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """The model's weights with its configuration (and the feature fields it reads) in the metadata."""
    meta: dict[str, Any] = {"config": model.config, **(extra or {})}
    if feats is not None:
        meta["user_fields"], meta["item_fields"] = feats.user_fields, feats.item_fields
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_tensors(path, model.state_dict(), metadata={"fedpa": json.dumps(meta)})


def load_pretrained(path: str | Path, feats: FeatureTable | None = None) -> tuple[CTRModel, dict[str, Any]]:
    """(model, metadata) from ``save_pretrained``'s file; checks the fields and vocabularies fit ``feats``."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["fedpa"])
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    c = meta["config"]
    if feats is not None:
        fields = (meta.get("user_fields"), meta.get("item_fields"))
        if fields != (feats.user_fields, feats.item_fields) or c["user_cards"] != feats.user_cards \
                or c["item_cards"] != feats.item_cards or c["item_widths"] != feats.item_widths:
            raise ValueError(f"{path}: the pre-trained model was built for other features than these")
    model = CTRModel(c["user_cards"], c["item_cards"], c["item_widths"], dim=c["dim"], hidden=tuple(c["hidden"]))
    model.load_state_dict(state)
    model.eval()
    return model, meta
