"""The one training loop: optimizer steps of a backbone's loss over shuffled samples.

Every algorithm trains through ``train_steps``: each client's local training in a federated round
(``fellrec.trainer`` for the LLM backbones, ``fellrec.fedpa.trainer`` for FedPA's users), and the
pooled trainer of the centralized upper bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from fellrec.config import TrainConfig
from fellrec.holdout import Samples


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, total_steps: int, warmup: bool = True):
    """AdamW (or SGD with momentum) with linear warm-up (when ``warmup``), then linear decay to 0 (or
    constant) over ``total_steps``."""
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup, total = (cfg.warmup_steps if warmup else 0), max(1, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class BatchSampler:
    """Shuffled passes over ``n`` samples: every sample once per epoch, a new order each epoch."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, min(batch_size, n)
        self.rng = np.random.default_rng(seed)
        self.order = np.zeros(0, dtype=np.int64)
        self.epochs = 0

    def next(self) -> np.ndarray:
        if len(self.order) < self.batch_size:
            self.order = np.concatenate([self.order, self.rng.permutation(self.n)])
            self.epochs += 1
        batch, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return batch

    def state(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "order": self.order.copy(), "epochs": self.epochs}

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order, self.epochs = np.asarray(state["order"], dtype=np.int64), int(state["epochs"])


@dataclass
class Loop:
    """What one ``train_steps`` call works with, for a ``StepHook`` to save and restore: the optimizer,
    the scheduler and the sampler, and torch's random state (dropout)."""

    module: nn.Module
    optimizer: Any
    scheduler: Any
    sampler: BatchSampler

    def state(self) -> dict[str, Any]:
        device = next((p.device for p in self.module.parameters()), torch.device("cpu"))
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "sampler": self.sampler.state(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

    def load_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state(state["sampler"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None:
            device = next(p.device for p in self.module.parameters())
            torch.cuda.set_rng_state(state["cuda_rng"], device)


class StepHook(Protocol):
    """Lets one local training span several processes (split mode over Flower): ``resume`` restores
    what a step saved and says which steps are done, ``step_done`` may save after each step."""

    def resume(self, loop: Loop) -> list[float]:
        """The losses of the steps already done (none: start from step 0), their state restored."""

    def step_done(self, loop: Loop, losses: list[float]) -> None:
        """After a step; ``losses`` of every step so far."""


def train_steps(module: nn.Module, loss: Callable[[Samples], Tensor], samples: Samples, *, steps: int,
                sampler: BatchSampler, optimizer, scheduler=None, grad_clip: float = 0.0,
                on_step: Callable[[int, float], None] | None = None, hook: StepHook | None = None) -> list[float]:
    """Run ``steps`` optimizer steps (those ``hook`` says are done are skipped); returns the loss of each."""
    params = [p for p in module.parameters() if p.requires_grad]
    loop = Loop(module, optimizer, scheduler, sampler)
    losses = list(hook.resume(loop)) if hook is not None else []
    module.train()
    for step in range(len(losses), steps):
        value = loss(samples.take(sampler.next()))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(value.detach()))
        if hook is not None:
            hook.step_done(loop, losses)
        if on_step is not None:
            on_step(step, losses[-1])
    module.eval()
    return losses


@contextmanager
def inference(module: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no gradients, whatever mode ``module`` was left in by what ran
    before; its mode is given back afterwards. Every scoring path runs under it, so a score does not
    depend on whether the process trained first (a resumed run, a Flower message)."""
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was)


def mean_loss(module: nn.Module, loss: Callable[[Samples], Tensor], samples: Samples, batch_size: int) -> float:
    """The loss averaged over ``samples`` (in eval mode, batch by batch, weighted by batch size)."""
    total = 0.0
    with inference(module):
        for start in range(0, len(samples), batch_size):
            batch = samples.take(np.arange(start, min(start + batch_size, len(samples))))
            total += float(loss(batch)) * len(batch)
    return total / max(1, len(samples))
