"""The client side: ``AdapterTrainer`` trains and evaluates one client's adapter on the shared
backbone.

Every client's trainer points at the SAME backbone (one base model in memory); a client's adapter
lives here as named tensors and is loaded into the model only while that client works. The
trainer owns the client's data and private state:

- ``private``: the client's full adapter after its last local training (what Local keeps, and
  what personalised algorithms build on); a payload's tensors are loaded over it;
- ``best``: the adapter of the client's best validation round so far, chosen on the client's own
  validation samples (FELLRec's code keeps a best adapter per client), which the test uses.

Local training is reproducible from (seed, round, client) alone: the sample order, LoRA dropout
and negative sampling are seeded from them, so a resumed run repeats a round exactly.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fellrec.adapters import adapter_parameters, get_adapter, is_residual, set_adapter
from fellrec.config import TrainConfig
from fellrec.evaluate import evaluate
from fellrec.holdout import Samples
from fellrec.strategies import ClientUpdate, Payload, Tensors
from fellrec.train import BatchSampler, StepHook, inference, make_optimizer, mean_loss, train_steps


def derive_seed(seed: int, rnd: int, client: str) -> int:
    """A 31-bit seed for one client in one round."""
    return int(np.random.SeedSequence([seed, rnd, zlib.crc32(client.encode())]).generate_state(1)[0] >> 1)


class AdapterTrainer:
    """ClientTrainer for the LLM backbones (ranker, BIGRec) over a shared model."""

    def __init__(self, client: str, backbone, train: Samples, valid: Samples, *, settings: TrainConfig,
                 initial: Tensors, seed: int, select_by: str, ks: tuple[int, ...], eval_batch_size: int,
                 steps_per_round: int | None = None, kept: set[str] = frozenset(),
                 group_lrs: dict[str, float] | None = None):
        self.client = client
        self.backbone = backbone
        self.train, self.valid = train, valid
        self.settings = settings
        self.seed = seed
        self.select_by = select_by
        self.ks = tuple(ks)
        self.eval_batch_size = eval_batch_size
        self.steps_per_round = steps_per_round if steps_per_round is not None else self._steps(settings)
        self.kept = set(kept)  # adapter tensors that never leave the client (model.item_vectors: private)
        self.group_lrs = dict(group_lrs or {})  # name prefix -> its own learning rate
        self.private = {k: v.clone() for k, v in initial.items()}
        self.best: Tensors = dict(self.private)
        self.best_score: float | None = None
        self.best_round = 0

    def _steps(self, t: TrainConfig) -> int:
        if t.local_epochs > 0:
            return max(1, math.ceil(t.local_epochs * len(self.train) / t.batch_size))
        return t.local_steps

    # ---- ClientTrainer -------------------------------------------------------------------------

    def fit(self, payload: Payload, rnd: int, on_step=None, hook: StepHook | None = None) -> ClientUpdate:
        """Local training from ``payload`` in round ``rnd``; returns what the client sends back. ``hook``:
        see ``fellrec.train.StepHook`` (split mode over Flower resumes a round from its last step)."""
        model, t = self.backbone.model, self.settings
        load_full(model, self.client, {**self.private, **payload.tensors})
        seed = derive_seed(self.seed, rnd, self.client)
        torch.manual_seed(seed)  # LoRA dropout
        if hasattr(self.backbone, "reseed"):
            self.backbone.reseed(seed)  # the ranker's sampled negatives
        frozen = payload.config.get("frozen")  # FFA-LoRA: A stays at its shared initialisation
        optimizer, scheduler = make_optimizer(self._param_groups(model, frozen), t, self.steps_per_round,
                                              warmup=rnd == 1)
        split_before = (0, 0)
        mu = float(payload.config.get("prox_mu", 0.0))
        if is_split(model):  # the server trains the trunk's adapter with its own optimizer, step for step
            model.reset_trunk_optimizer(lambda ps: make_optimizer(ps, t, self.steps_per_round, warmup=rnd == 1),
                                        prox_mu=mu)
            optimizer = WithTrunk(optimizer, model, t.grad_clip)
            split_before = (model.transport.bytes_up, model.transport.bytes_down)
        loss = self.backbone.loss
        if mu > 0:
            loss = proximal(loss, adapter_parameters(model), payload.tensors, mu,
                            trunk=model.trunk_prox if is_split(model) else None)
        losses = []
        if len(self.train) and self.steps_per_round:
            losses = train_steps(model, loss, self.train, steps=self.steps_per_round,
                                 sampler=BatchSampler(len(self.train), t.batch_size, seed), optimizer=optimizer,
                                 scheduler=scheduler, grad_clip=0.0 if is_split(model) else t.grad_clip,
                                 on_step=on_step, hook=hook)
        self.private = read_full(model)
        shared = {}
        if payload.config.get("share", True):
            sent = payload.tensors if payload.config.get("upload") == "sent" else self.private
            # a residual (FLoRA, FedEx-LoRA) is only ever changed by the server: it is not sent back
            shared = {k: self.private[k] for k in sent if k not in self.kept and not is_residual(k)}
        metrics = {"loss": float(np.mean(losses)) if losses else float("nan"), "steps": len(losses)}
        if is_split(model):  # activations and gradients exchanged with the trunk in this local training
            metrics["split_bytes_up"] = model.transport.bytes_up - split_before[0]
            metrics["split_bytes_down"] = model.transport.bytes_down - split_before[1]
        return ClientUpdate(self.client, shared, len(self.train), metrics)

    def _param_groups(self, model, frozen: str | None = None) -> list:
        """The adapter's parameters for the optimizer (those whose name holds ``frozen`` left out): one
        group, or one more per prefix in ``group_lrs``."""
        params = {n: p for n, p in adapter_parameters(model).items() if not (frozen and frozen in n)}
        if not self.group_lrs:
            return list(params.values())
        groups = {prefix: [] for prefix in self.group_lrs}
        rest = []
        for name, p in params.items():
            prefix = next((x for x in self.group_lrs if name.startswith(x)), None)
            (groups[prefix] if prefix is not None else rest).append(p)
        return [{"params": rest}, *({"params": ps, "lr": self.group_lrs[x]} for x, ps in groups.items() if ps)]

    def evaluate(self, payload: Payload, rnd: int) -> dict[str, float]:
        """Validation metrics of the adapter ``payload`` gives; remembers the best round's adapter."""
        adapter = {**self.private, **payload.tensors}
        scores = self.score(adapter, self.valid)
        value = scores.get(self.select_by, float("nan"))
        lower = self.select_by == "loss"
        if (self.best_score is None or math.isnan(self.best_score)
                or (value < self.best_score if lower else value > self.best_score)):
            self.best, self.best_score, self.best_round = adapter, value, rnd
        return scores

    def test(self, samples: Samples) -> dict[str, np.ndarray]:
        """Per-sample test metrics with the selected (best validation) adapter."""
        self._load(self.best)
        with inference(self.backbone.model):
            return evaluate(self.backbone.rank, samples, batch_size=self.eval_batch_size, ks=self.ks)

    def score(self, adapter: Tensors, samples: Samples) -> dict[str, float]:
        """Mean validation loss (``select_by: loss``) or mean ranking metrics of ``adapter``."""
        if len(samples) == 0:
            return {self.select_by: float("nan")}
        self._load(adapter)
        if self.select_by == "loss":
            return {"loss": mean_loss(self.backbone.model, self.backbone.loss, samples, self.eval_batch_size)}
        with inference(self.backbone.model):
            per_sample = evaluate(self.backbone.rank, samples, batch_size=self.eval_batch_size, ks=self.ks)
        return {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in per_sample.items()}

    def _load(self, adapter: Tensors) -> None:
        load_full(self.backbone.model, self.client, adapter)
        if hasattr(self.backbone, "refresh"):
            self.backbone.refresh()  # an adapted item side must be re-encoded

    # ---- checkpoints ---------------------------------------------------------------------------

    def selected(self) -> Tensors:
        """The adapter the test uses (the best validated round's), without what never leaves the client."""
        return {k: v for k, v in self.best.items() if k not in self.kept}

    def state(self) -> tuple[Tensors, dict[str, Any]]:
        tensors = {f"private/{k}": v for k, v in self.private.items()}
        tensors.update({f"best/{k}": v for k, v in self.best.items()})
        return tensors, {"best_score": self.best_score, "best_round": self.best_round}

    def load_state(self, tensors: Tensors, meta: dict[str, Any]) -> None:
        self.private = {k.removeprefix("private/"): v for k, v in tensors.items() if k.startswith("private/")}
        self.best = {k.removeprefix("best/"): v for k, v in tensors.items() if k.startswith("best/")}
        self.best_score, self.best_round = meta["best_score"], meta["best_round"]


@dataclass
class ClientParts:
    """One client as a runtime outside this process builds it (``fellrec.build.client_parts``,
    ``fellrec.fedpa.build.client_parts``): its trainer, the shared tensors it starts from (every
    client's must be equal), what it tells the server at setup, and what its test takes."""

    trainer: Any
    initial: Tensors
    info: dict[str, Any]  # name, num-clients, dataset, and what the server needs of this client
    counts: dict[str, int]  # train, valid, test samples and steps-per-round
    test_samples: Any = None  # what ``trainer.test`` takes (None: the trainer's own test data)
    backbone: Any = None  # the LLM backbone (its caches, split mode's model)


def is_split(model) -> bool:
    return getattr(model, "fellrec_split", False)


def load_full(model, client: str, tensors: Tensors) -> None:
    """Load a whole adapter; in split mode the trunk's part goes to the server, for this client."""
    if not is_split(model):
        set_adapter(model, tensors)
        return
    model.use_client(client)
    trunk = set(model.trunk_names())
    set_adapter(model, {k: v for k, v in tensors.items() if k not in trunk})
    model.set_trunk_adapter({k: tensors[k] for k in trunk})


def read_full(model) -> Tensors:
    """The whole adapter: the client's part and, in split mode, the trunk's part the server holds."""
    out = get_adapter(model)
    if is_split(model):
        out.update(model.trunk_adapter())
    return out


class WithTrunk:
    """The client's optimizer, followed at every step by the server's step of the trunk adapter.

    With ``grad_clip`` the gradient of the whole adapter (client part and trunk part) is clipped to
    that norm, as ``torch.nn.utils.clip_grad_norm_`` does unsplit: the norm is the client's and the
    trunk's together (the trunk's comes with its backward reply), and the step tells the server the
    factor to multiply its part by."""

    def __init__(self, optimizer, model, grad_clip: float = 0.0):
        self.optimizer, self.model, self.grad_clip = optimizer, model, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        scale = None
        if self.grad_clip > 0:
            from fellrec.storage.trunk import squared_norm

            total = (squared_norm(self.params) + self.model.trunk_sq_norm()).sqrt()
            scale = (self.grad_clip / (total + 1e-6)).clamp(max=1.0).to(torch.float32)
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.device))
        self.optimizer.step()
        self.model.step_trunk(scale)

    def state_dict(self) -> dict:
        """The client's optimizer's state (the trunk's is the server's)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def proximal(loss, params: dict[str, torch.nn.Parameter], anchor: Tensors, mu: float, trunk=None):
    """``loss`` plus FedProx's (μ/2)·Σ ||w − w_anchor||² over the adapter tensors. In split mode the
    trunk's part of the term is the server's (``trunk()``: its value, read after the forward; the
    server adds its gradient)."""
    pairs = [(p, anchor[name].detach().to(p.device)) for name, p in params.items() if name in anchor]

    def with_term(batch: Samples) -> torch.Tensor:
        term = sum(((p - a) ** 2).sum() for p, a in pairs)
        value = loss(batch) + 0.5 * mu * term
        return value if trunk is None else value + trunk().to(value.device)

    return with_term
