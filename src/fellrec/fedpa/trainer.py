"""FedPA's client side: ``FedPATrainer`` is one private user (one client), and ``build_federation``
sets up the strategy and every user's trainer for FedPA or one of its baselines (``ALGORITHMS``:
model variant and server strategy; docs/ALGORITHMS.md).

Every trainer points at the SAME ``FedPAModel`` (one frozen foundation model in memory); a
client's own state is a few small tensors (its user-attribute embedding rows and user adapter for
FedPA), kept here and passed to the model per call. ``fit`` trains tensors = defaults, overridden
by the client's own, overridden by the payload's, through ``fellrec.train.train_steps`` (Adam,
fresh each round, over one flat vector), keeps what the server did not send and uploads what it
did (with Laplace noise when an LDP scale is set); ``evaluate`` keeps each round's validation and
test predictions, so that the test can be reported at the round chosen on the pooled validation
(``pooled_selection``). Training is reproducible from (seed, round, client).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fellrec.data.tables import Dataset
from fellrec.fedpa.features import FeatureTable, UserSplit
from fellrec.fedpa.metrics import auc, ctr_metrics, logloss
from fellrec.fedpa.model import CTRModel, FedPAModel, Tensors
from fellrec.strategies import ClientUpdate, Payload, Strategy, make_strategy
from fellrec.strategies.fedpa import FedPA
from fellrec.train import BatchSampler, train_steps
from fellrec.trainer import derive_seed

ALGORITHMS: dict[str, tuple[str, str]] = {
    "fedpa": ("fedpa", "fedpa"),
    "fedavg-adapter": ("adapter", "fedavg"),
    "fedavg-full": ("full", "fedavg"),
    "local": ("full", "local"),
    "local-fedpa": ("fedpa", "local"),
    "frozen": ("frozen", "local"),
}


def laplace(shape, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Laplace(0, scale) samples by inverting the CDF of a uniform draw in (−1/2, 1/2)."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
    return (-scale * torch.sign(u) * torch.log1p(-2 * u.abs()).clamp_min(-745.0)).to(torch.float32)


@dataclass
class ClientData:
    """One user's interactions: item ids and 0/1 labels of each part, in time order."""

    train_items: torch.Tensor
    train_labels: torch.Tensor
    valid_items: torch.Tensor
    valid_labels: torch.Tensor
    test_items: torch.Tensor
    test_labels: torch.Tensor


def client_data(ds: Dataset, feats: FeatureTable, split: UserSplit) -> dict[int, ClientData]:
    """Every private user's ClientData, keyed by dense user id (built with one sort, no per-row Python)."""
    users = ds.interactions["user"].to_numpy()
    items = ds.interactions["item"].to_numpy()
    parts = {}
    for name, rows in (("train", split.train_rows), ("valid", split.valid_rows), ("test", split.test_rows)):
        rows = rows[np.argsort(users[rows], kind="stable")]
        counts = np.bincount(users[rows], minlength=ds.num_users)
        cuts = np.cumsum(counts)[:-1]
        parts[name] = (np.split(items[rows], cuts), np.split(feats.label[rows], cuts))
    out = {}
    for u in split.private_users:
        out[int(u)] = ClientData(*(torch.from_numpy(np.ascontiguousarray(arr[u])) for name in ("train", "valid", "test")
                                   for arr in parts[name]))
    return out


class _Flat(torch.nn.Module):
    """Named tensors as one flat trainable vector (``tensors`` gives the named views)."""

    def __init__(self, tensors: Tensors):
        super().__init__()
        self.names = list(tensors)
        self.shapes = [tensors[k].shape for k in self.names]
        self.sizes = [tensors[k].numel() for k in self.names]
        self.flat = torch.nn.Parameter(torch.cat([tensors[k].detach().reshape(-1).to(torch.float32)
                                                  for k in self.names]))

    def tensors(self) -> Tensors:
        return {k: t.view(shape) for k, t, shape in zip(self.names, self.flat.split(self.sizes), self.shapes,
                                                         strict=True)}


@dataclass
class _Rows:
    """A user's training interactions as ``train_steps`` takes samples: ``take`` a batch of them."""

    rows: torch.Tensor

    def take(self, index) -> _Rows:
        return _Rows(self.rows[torch.as_tensor(index, dtype=torch.long)])

    def __len__(self) -> int:
        return len(self.rows)


class FedPATrainer:
    """ClientTrainer of one user over the shared FedPAModel."""

    def __init__(self, client: str, model: FedPAModel, data: ClientData, user_codes: torch.Tensor, *,
                 variant: str = "fedpa", defaults: Tensors | None = None, lr: float = 0.1, batch_size: int = 1024,
                 local_epochs: int = 1, seed: int = 0, select_by: str = "logloss", ldp_scale: float = 0.0):
        if select_by not in ("logloss", "auc"):
            raise ValueError(f"select_by must be 'logloss' or 'auc', got {select_by!r}")
        self.client, self.model, self.data, self.variant = client, model, data, variant
        self.user_codes = user_codes.to(torch.long)
        self.defaults = defaults or {}
        self.lr, self.batch_size, self.local_epochs = lr, batch_size, local_epochs
        self.seed, self.select_by, self.ldp_scale = seed, select_by, ldp_scale
        n = len(data.train_items)
        self.num_train = n
        passes = math.ceil(local_epochs * math.ceil(n / batch_size))  # steps of local_epochs passes
        self.steps_per_round = 0 if variant == "frozen" or n == 0 else passes
        self.own: Tensors | None = None  # created on first use (from the pre-trained rows and the client's seed)
        self.rounds: list[int] = []
        self.valid_preds: list[np.ndarray] = []
        self.test_preds: list[np.ndarray] = []
        self.best_round = 0
        self.best_score: float | None = None

    def _own(self) -> Tensors:
        if self.own is None:
            self.own = self.model.private_initial(self.variant, self.user_codes, derive_seed(self.seed, 0, self.client))
        return self.own

    # ---- ClientTrainer -------------------------------------------------------------------------

    def fit(self, payload: Payload, rnd: int, on_step=None) -> ClientUpdate:
        start = {**self.defaults, **self._own(), **payload.tensors}
        share = payload.config.get("share", True)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, rnd, self.client))
        losses = []
        trained = self._train(start, rnd, on_step, losses) if self.steps_per_round else dict(start)
        sent = payload.tensors.keys()
        self.own = {k: v.clone() for k, v in trained.items() if not (share and k in sent)}
        upload = {k: trained[k] for k in sent} if share else {}
        scale = float(payload.config.get("ldp_scale", self.ldp_scale))
        if upload and scale > 0:
            upload = {k: v + laplace(v.shape, scale, gen) for k, v in upload.items()}
        metrics = {"loss": float(np.mean(losses)) if losses else float("nan"), "steps": len(losses)}
        return ClientUpdate(self.client, upload, self.num_train, metrics)

    def _train(self, start: Tensors, rnd: int, on_step, losses: list[float]) -> Tensors:
        """``local_epochs`` passes of Adam (torch's defaults, fresh each round, as the released code) through
        the one training loop, over ONE flat vector holding every trainable tensor: a handful of tensor
        ops per step whatever the number of tensors."""
        flat = _Flat(start)
        items, labels = self.data.train_items, self.data.train_labels

        def loss(batch: _Rows) -> torch.Tensor:
            logits = self.model.logits(self.variant, flat.tensors(), self.user_codes, items[batch.rows])
            return F.binary_cross_entropy_with_logits(logits, labels[batch.rows])

        sampler = BatchSampler(len(items), self.batch_size, derive_seed(self.seed, rnd, f"{self.client}/batches"))
        optimizer = torch.optim.Adam([flat.flat], lr=self.lr)
        losses.extend(train_steps(flat, loss, _Rows(torch.arange(len(items))), steps=self.steps_per_round,
                                  sampler=sampler, optimizer=optimizer, on_step=on_step))
        return {k: v.detach() for k, v in flat.tensors().items()}

    @torch.no_grad()
    def predict(self, payload: Payload, items: torch.Tensor) -> np.ndarray:
        params = {**self.defaults, **self._own(), **payload.tensors}
        return torch.sigmoid(self.model.logits(self.variant, params, self.user_codes, items)).numpy()

    def evaluate(self, payload: Payload, rnd: int) -> dict[str, float]:
        """Validation metrics of this user under ``payload``; keeps the round's valid and test predictions."""
        d = self.data
        pred = self.predict(payload, torch.cat([d.valid_items, d.test_items]))
        valid, test = pred[:len(d.valid_items)], pred[len(d.valid_items):]
        if rnd in self.rounds:  # a repeated evaluation of a round replaces it
            i = self.rounds.index(rnd)
            del self.rounds[i], self.valid_preds[i], self.test_preds[i]
        self.rounds.append(rnd)
        self.valid_preds.append(valid.astype(np.float32))
        self.test_preds.append(test.astype(np.float32))
        labels = d.valid_labels.numpy()
        scores = {"logloss": logloss(valid, labels), "auc": auc(valid, labels), "n": len(labels)}
        value = scores[self.select_by]
        lower = self.select_by == "logloss"
        better = not math.isnan(value) and (self.best_score is None or math.isnan(self.best_score)
                                            or (value < self.best_score if lower else value > self.best_score))
        if better or self.best_score is None:
            self.best_score, self.best_round = value, rnd
        return scores

    def predictions(self, rnd: int, part: str = "test") -> np.ndarray:
        """The stored predictions of round ``rnd`` on ``valid`` or ``test``."""
        if rnd not in self.rounds:
            raise KeyError(f"client {self.client} was not evaluated in round {rnd}")
        store = self.test_preds if part == "test" else self.valid_preds
        return store[self.rounds.index(rnd)]

    def test(self, samples: Any = None) -> dict[str, np.ndarray]:
        """The predictions of every evaluated round on the user's validation and test interactions,
        with their labels: FedPA's test picks a round by the validation predictions of every user
        pooled (``pooled_selection``), where they all meet.

        The trainer owns its test interactions, so ``samples`` must be None (it is accepted for the
        ClientTrainer signature).
        """
        if samples is not None:
            raise ValueError("FedPATrainer.test uses the user's own test interactions; pass samples=None")
        d = self.data
        out = {"rounds": np.array(self.rounds, dtype=np.int64), "valid-labels": d.valid_labels.numpy(),
               "test-labels": d.test_labels.numpy()}
        if self.rounds:
            out["valid"], out["test"] = np.stack(self.valid_preds), np.stack(self.test_preds)
        return out

    def selected(self) -> Tensors:
        """Nothing: what FedPA shares is the server's; a user's own tensors never leave it."""
        return {}

    # ---- checkpoints ---------------------------------------------------------------------------

    def state(self) -> tuple[Tensors, dict[str, Any]]:
        """Packed: the own tensors as one flat vector, the stored predictions as two matrices."""
        own = self._own()
        tensors = {"own": torch.cat([v.reshape(-1) for v in own.values()]) if own else torch.zeros(0)}
        if self.rounds:
            tensors["valid"] = torch.from_numpy(np.stack(self.valid_preds))
            tensors["test"] = torch.from_numpy(np.stack(self.test_preds))
        meta = {"own": [[k, list(v.shape)] for k, v in own.items()], "rounds": list(self.rounds),
                "best_round": self.best_round, "best_score": self.best_score}
        return tensors, meta

    def load_state(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        flat, own, start = tensors["own"], {}, 0
        for key, shape in meta["own"]:
            size = math.prod(shape)
            own[key] = flat[start:start + size].reshape(shape).clone()
            start += size
        self.own = own
        self.rounds = list(meta["rounds"])
        self.valid_preds = list(tensors["valid"].numpy()) if self.rounds else []
        self.test_preds = list(tensors["test"].numpy()) if self.rounds else []
        self.best_round, self.best_score = meta["best_round"], meta["best_score"]


# ---- setting up a federation --------------------------------------------------------------------


@dataclass
class Federation:
    strategy: Strategy
    trainers: dict[str, FedPATrainer]
    model: FedPAModel
    variant: str
    user_of: dict[str, int]
    """The dense user id of each client."""


def build_federation(ds: Dataset, feats: FeatureTable, split: UserSplit, base: CTRModel, *,
                     algorithm: str = "fedpa", group_attributes: tuple[str, ...] | list[str] = (), rank: int = 4,
                     alpha: float = 1.0, gate_hidden: tuple[int, ...] = (8, 4), zero_init: bool = False,
                     lr: float = 0.1, batch_size: int = 1024, local_epochs: int = 1, ldp_scale: float = 0.0,
                     weighting: str = "samples", select_by: str = "logloss", seed: int = 0) -> Federation:
    """The strategy and one trainer per private user (client id = the user's original id as text).

    ``lr`` defaults to the released Fed_Train's 0.1 (Adam); the whole-model baselines usually
    want less (0.01 on ML-100K).
    """
    variant, server = variant_of(algorithm)
    model = federation_model(base, feats, variant, group_attributes, rank=rank, alpha=alpha,
                             gate_hidden=gate_hidden, zero_init=zero_init)
    data = client_data(ds, feats, split)
    ids = ds.users["user_id"].to_numpy()
    user_of = {str(ids[u]): u for u in data}
    clients = list(user_of)
    initial = model.shared_initial(variant, seed)
    groups = list(model.group_cards)
    client_groups = {c: {a: int(feats.user_codes[u, feats.user_field(a)]) for a in groups}
                     for c, u in user_of.items()}
    strategy = make_strategy(server, initial, clients, client_groups=client_groups, weighting=weighting,
                             ldp_scale=ldp_scale)
    options = {"lr": lr, "batch_size": batch_size, "local_epochs": local_epochs, "seed": seed,
               "select_by": select_by, "ldp_scale": ldp_scale}
    trainers = {c: user_trainer(c, model, data[u], torch.from_numpy(feats.user_codes[u]), algorithm, initial,
                                client_groups[c], **options) for c, u in user_of.items()}
    return Federation(strategy, trainers, model, variant, user_of)


def variant_of(algorithm: str) -> tuple[str, str]:
    """(model variant, server strategy) of a FedPA ``algorithm``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown FedPA algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[algorithm]


def federation_model(base: CTRModel, feats: FeatureTable, variant: str, group_attributes, **options: Any) -> FedPAModel:
    """The FedPAModel over the frozen ``base`` (group adapters only for FedPA's own model)."""
    groups = list(group_attributes) if variant == "fedpa" else []
    return FedPAModel(base, torch.from_numpy(feats.item_codes), group_cards={a: len(feats.vocab[a]) for a in groups},
                      **options)


def user_trainer(client: str, model: FedPAModel, data: ClientData, user_codes: torch.Tensor, algorithm: str,
                 initial: Tensors, groups: dict[str, int], **options: Any) -> FedPATrainer:
    """One user's trainer. Without a server (``local*``), the client starts from the shared initial
    tensors itself, FedPA's model with its own groups' adapters."""
    variant, server = variant_of(algorithm)
    defaults: Tensors = {}
    if server == "local":
        defaults = initial if variant != "fedpa" else \
            FedPA(initial, [client], client_groups={client: groups}).client_tensors(client)  # references, no copies
    return FedPATrainer(client, model, data, user_codes, variant=variant, defaults=defaults, **options)


def pooled_selection(trainers: dict[str, FedPATrainer], select_by: str = "auc") -> dict[str, Any]:
    """Pooled metrics of every evaluated round, and the test metrics of the best validation round.

    Validation and test predictions of all clients are pooled per round (AUC, GAUC, logloss,
    weighted P/R/F1); the round with the best pooled validation ``select_by`` (``auc``: highest;
    ``logloss``: lowest) is selected, as the released code reports test AUC at the best-val round.
    """
    if select_by not in ("auc", "logloss", "gauc"):
        raise ValueError(f"select_by must be auc, gauc or logloss, got {select_by!r}")
    rounds = sorted(set.intersection(*(set(t.rounds) for t in trainers.values()))) if trainers else []
    per_round: dict[int, dict[str, dict[str, float]]] = {}
    for r in rounds:
        per_round[r] = {}
        for part in ("valid", "test"):
            preds, labels, users = [], [], []
            for i, t in enumerate(trainers.values()):
                p = t.predictions(r, part)
                preds.append(p)
                labels.append((t.data.valid_labels if part == "valid" else t.data.test_labels).numpy())
                users.append(np.full(len(p), i))
            per_round[r][part] = ctr_metrics(np.concatenate(preds), np.concatenate(labels), np.concatenate(users))
    if not per_round:
        return {"best_round": None, "valid": {}, "test": {}, "rounds": {}}
    sign = -1.0 if select_by == "logloss" else 1.0

    def score(r: int) -> tuple[float, int]:
        value = sign * per_round[r]["valid"][select_by]
        return (-np.inf if math.isnan(value) else value, -r)

    best = max(rounds, key=score)
    return {"best_round": best, "valid": per_round[best]["valid"], "test": per_round[best]["test"],
            "rounds": per_round}
