"""fellrec's payloads and updates as Flower records, and back.

Tensors keep their names (the portable adapter names of ``fellrec.adapters``) as the keys of an
``ArrayRecord``; a float32 tensor goes through Flower's serialisation bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fellrec.strategies import ClientUpdate, Payload, Tensors


def to_arrays(tensors: Tensors) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def from_arrays(record: ArrayRecord) -> Tensors:
    return {k: torch.as_tensor(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def config_record(values: dict[str, Any]) -> ConfigRecord:
    """A ConfigRecord of ``values`` (bool, int, float, str, bytes), None left out."""
    return ConfigRecord({k: v for k, v in values.items() if v is not None})


def payload_content(rnd: int, payload: Payload, **extra: Any) -> RecordDict:
    return RecordDict({"arrays": to_arrays(payload.tensors),
                       "config": config_record({**payload.config, "round": rnd, **extra})})


def read_payload(msg: Message) -> tuple[int, Payload]:
    config = dict(msg.content["config"])
    rnd = int(config.pop("round"))
    return rnd, Payload(from_arrays(msg.content["arrays"]), config)


def checked_content(rnd: int, payload: Payload, checked: int, check: Payload) -> RecordDict:
    """Round ``rnd``'s training payload with round ``checked``'s validation payload (``check``) in one
    message: its config as ``check``, its tensors as ``check-arrays`` unless they equal the training
    payload's (they usually do: the adapter the client trains from is the one it validates)."""
    content = payload_content(rnd, payload)
    same = check.tensors.keys() == payload.tensors.keys() and all(
        torch.equal(check.tensors[k], payload.tensors[k]) for k in check.tensors)
    content["check"] = config_record({**check.config, "round": checked, "same-arrays": same})
    if not same:
        content["check-arrays"] = to_arrays(check.tensors)
    return content


def read_check(msg: Message, payload: Payload) -> tuple[int, Payload] | None:
    """(round, validation payload) of a training message that carries its previous round's validation."""
    if "check" not in msg.content:
        return None
    config = dict(msg.content["check"])
    rnd, same = int(config.pop("round")), bool(config.pop("same-arrays"))
    return rnd, Payload(payload.tensors if same else from_arrays(msg.content["check-arrays"]), config)


def update_content(client: str, update: ClientUpdate) -> RecordDict:
    metrics = {k: float(v) for k, v in update.metrics.items()}
    return RecordDict({"arrays": to_arrays(update.tensors),
                       "metrics": MetricRecord({**metrics, "num-examples": int(update.num_examples)}),
                       "info": ConfigRecord({"client-id": client})})


def read_update(client: str, msg: Message) -> ClientUpdate:
    metrics = dict(msg.content["metrics"])
    n = int(metrics.pop("num-examples"))
    steps = metrics.get("steps")
    if steps is not None:
        metrics["steps"] = int(steps)
    for k in ("split_bytes_up", "split_bytes_down"):
        if k in metrics:
            metrics[k] = int(metrics[k])
    return ClientUpdate(client, from_arrays(msg.content["arrays"]), n, metrics)


def client_id_of(msg: Message) -> str:
    return str(msg.content["info"]["client-id"])


def float_tensor(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def test_content(client: str, scores: dict, samples, best_round: int, adapter: Tensors | None) -> RecordDict:
    """A test reply: what the trainer's ``test`` gave (a ranking run: each test user's metrics, with
    the dataset's dense user ids as ``user`` so that the server can write test_users.csv and runs can
    be paired by user), the round whose adapter was tested and, if asked for, that adapter."""
    if scores and getattr(samples, "user", None) is not None:
        scores = {**scores, "user": np.asarray(samples.user)}
    content = {"scores": to_arrays({k: float_tensor(v) for k, v in scores.items()}),
               "info": ConfigRecord({"client-id": client}),
               "metrics": MetricRecord({"best-round": int(best_round)})}
    if adapter is not None:
        content["arrays"] = to_arrays(adapter)
    return RecordDict(content)


def read_test(content: RecordDict) -> dict[str, Any]:
    """A test reply as the server's results read it: ``scores`` (arrays), ``best_round``, ``adapter``."""
    return {"scores": {k: v.numpy() for k, v in from_arrays(content["scores"]).items()},
            "best_round": int(content["metrics"]["best-round"]),
            "adapter": from_arrays(content["arrays"]) if "arrays" in content else None}
