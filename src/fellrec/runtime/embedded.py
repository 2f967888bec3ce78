"""The embedded runtime (the default): every client in this process, over ONE base model (each client
loads its adapter into it before it works), driven by ``fellrec.runtime.rounds.Rounds``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fellrec.runtime.rounds import Rounds
from fellrec.strategies import ClientUpdate, Payload, Strategy


class InProcess:
    """The clients' trainers in this process, one after the other.

    ``evaluators`` validate and test; they are the trainers themselves except in the centralized
    setting, where one pooled trainer trains and every client evaluates the shared adapter.
    """

    def __init__(self, trainers: dict[str, Any], evaluators: dict[str, Any], progress: bool = True):
        self.trainers, self.evaluators, self.progress = trainers, evaluators, progress
        self.training, self.validating = list(trainers), list(evaluators)

    def fit(self, rnd: int, payloads: dict[str, Payload]) -> dict[str, ClientUpdate]:
        """Each client's local training from its payload: here one after the other, in this process."""
        updates = {}
        bar = tqdm(payloads, desc=f"round {rnd}", unit="client", leave=False, disable=not self.progress)
        for client in bar:
            trainer = self.trainers[client]
            steps = tqdm(total=trainer.steps_per_round, desc=f"client {client}", unit="step", leave=False,
                         disable=not self.progress)

            def on_step(_step: int, loss: float, steps=steps) -> None:
                steps.update(1)
                steps.set_postfix(loss=f"{loss:.4f}")

            updates[client] = trainer.fit(payloads[client], rnd, on_step=on_step)
            steps.close()
        bar.close()
        return updates

    def evaluate(self, rnd: int, payloads: dict[str, Payload]) -> dict[str, dict[str, float]]:
        """Each client's validation metrics of the adapter its payload gives."""
        out = {}
        bar = tqdm(payloads.items(), desc="validate", unit="client", leave=False, disable=not self.progress)
        for client, payload in bar:
            out[client] = self.evaluators[client].evaluate(payload, rnd)
        bar.close()
        return out

    def stateful(self) -> dict[str, Any]:
        """Every trainer and evaluator, once each, by id."""
        out = dict(self.evaluators)
        for client, trainer in self.trainers.items():
            if client not in out:
                out[client] = trainer
            elif out[client] is not trainer:
                raise ValueError(f"client {client} has a different trainer and evaluator")
        return out


def embedded(strategy: Strategy, trainers: dict[str, Any], evaluators: dict[str, Any], *, run_dir: Path,
             progress: bool = True, **options: Any) -> Rounds:
    """The rounds of ``strategy`` over ``trainers`` (and ``evaluators``, see ``InProcess``) in this process."""
    return Rounds(strategy, InProcess(trainers, evaluators, progress), run_dir=run_dir, progress=progress, **options)
