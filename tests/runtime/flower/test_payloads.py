"""What a client sends, inspected message by message (issue 17 §4): in plain mode, FedPA and split
mode, every reply a ClientApp sends in a whole run holds only the records its message type
declares, adapter tensors it was sent (same names and shapes), the metrics and evaluation outputs
of the protocol, and in split mode the activations and gradients at the cut (and each step's gradient
clipping factor). No reply carries an
item id, a history or any other raw interaction."""

import re

import numpy as np
import pytest
from test_flower import FEDPA, SPLIT, THREE, private_cache, serve, serverapp_identity  # noqa: F401

from fellrec.config import load_config
from fellrec.pipeline import prepare

RANKING = {f"{m}@{k}" for m in ("recall", "ndcg", "hit", "mrr", "precision") for k in (5, 10, 20)}
COUNTS = {"train", "valid", "test", "steps-per-round"}
TRAIN_METRICS = {"loss", "steps", "num-examples", "split_bytes_up", "split_bytes_down"}
FEDPA_EVAL = {"logloss", "auc", "n"}
FEDPA_SCORES = {"rounds", "valid", "test", "valid-labels", "test-labels"}  # predictions per round, the labels
SPLIT_REQUEST = re.compile(r"^\d+\.(hidden|grad|attention_mask|position_ids|train|scale)$")

# message type -> the records its reply may hold (record name -> kind); every reply but whoami's also
# holds ``timing`` (TIMING_KEYS)
RECORDS = {
    "query.whoami": {"info": "config"},
    "query": {"arrays": "arrays", "metrics": "metrics", "info": "config"},
    "query.split": {"info": "config"},
    "train": {"arrays": "arrays", "metrics": "metrics", "info": "config", "split-requests": "arrays",
              "split": "config", "validation": "metrics"},  # the previous round's validation, when it came along
    "train.split": {"arrays": "arrays", "metrics": "metrics", "info": "config", "split-requests": "arrays",
                    "split": "config"},
    "evaluate": {"metrics": "metrics", "info": "config", "split-requests": "arrays", "split": "config"},
    "evaluate.split": {"metrics": "metrics", "info": "config", "split-requests": "arrays", "split": "config"},
    "evaluate.test": {"scores": "arrays", "arrays": "arrays", "metrics": "metrics", "info": "config",
                      "split-requests": "arrays", "split": "config"},
    "evaluate.test_split": {"scores": "arrays", "arrays": "arrays", "metrics": "metrics", "info": "config",
                            "split-requests": "arrays", "split": "config"},
}
for _kind, _records in RECORDS.items():
    if _kind != "query.whoami":
        _records["timing"] = "metrics"
TIMING_KEYS = {"created", "called", "returned", "build", "model", "work", "worker"}
INFO = {"client-id", "name", "num-clients", "dataset", "titles", "groups", "best-round"}
SPLIT_CONFIG = {"kinds", "requests", "done", "ack"}


def kinds(content):
    out = {n: "arrays" for n in content.array_records}
    out.update({n: "metrics" for n in content.metric_records})
    out.update({n: "config" for n in content.config_records})
    return out


def check_run(grid, *, ranking: bool, hidden: int | None = None, titles=None):
    """Every reply of the run against the declarations above; returns the message types seen."""
    setups, seen = [], set()
    for request, content in grid.replies:
        kind = request.metadata.message_type
        seen.add(kind)
        records = kinds(content)
        assert kind in RECORDS and set(records.items()) <= set(RECORDS[kind].items()), (kind, records)
        if "arrays" in content.array_records and kind.startswith("train"):
            sent = request.content.array_records.get("arrays")
            if sent is not None:  # plain mode: back only what it was sent, as it was shaped
                got = content.array_records["arrays"]
                assert set(got) <= set(sent), (kind, sorted(set(got) - set(sent))[:3])
                assert all(got[k].shape == sent[k].shape for k in got)
        for name, record in content.array_records.items():
            for key, a in record.items():
                x = a.numpy()
                if name == "split-requests":
                    assert SPLIT_REQUEST.match(key), key
                    if key.endswith(("hidden", "grad")):
                        assert x.dtype == np.float32 and x.ndim == 3 and x.shape[-1] == hidden
                    elif key.endswith("scale"):  # a step's gradient clipping factor, min(1, clip / norm)
                        assert x.dtype == np.float32 and x.ndim == 0 and 0 < x <= 1
                    elif key.endswith(("attention_mask", "train")):  # a mask; whether the trunk trains
                        assert set(np.unique(x)) <= {0, 1}
                    else:  # positions
                        assert x.ndim == 2 and (x >= 0).all() and (x <= x.shape[1]).all()
                elif name == "scores":
                    assert key in (RANKING | {"user"} if ranking else FEDPA_SCORES), key
                    assert x.ndim == (2 if key in ("valid", "test") else 1) and x.dtype == np.float64
                    if key == "user" or key == "rounds":
                        assert np.all(x == np.round(x))  # dense user ids, round numbers
                else:  # adapter tensors
                    assert x.dtype == np.float32, (kind, key, x.dtype)
        for name, record in content.metric_records.items():
            if name == "timing":  # when and how long, nothing about the data
                assert set(record) == TIMING_KEYS, (kind, sorted(record))
                continue
            allowed = {"query": COUNTS, "train": TRAIN_METRICS, "train.split": TRAIN_METRICS,
                       "evaluate.test": {"best-round"}, "evaluate.test_split": {"best-round"}}.get(
                "evaluate" if name == "validation" else kind, (RANKING | {"loss"}) if ranking else FEDPA_EVAL)
            seen.add(f"{kind}+{name}")
            assert set(record) <= allowed, (kind, sorted(set(record) - allowed))
        for name, record in content.config_records.items():
            assert set(record) <= (SPLIT_CONFIG if name == "split" else INFO), (kind, name, dict(record))
            if "titles" in record:
                assert list(record["titles"]) == titles  # the public catalogue, the same for every client
        if kind == "query":
            setups.append(content.array_records["arrays"])
    # a client's first message carries its initial adapter: bit for bit the same on every client, so it
    # says nothing about the client's data
    assert len(setups) >= 2
    for other in setups[1:]:
        assert set(other) == set(setups[0])
        assert all(np.array_equal(other[k].numpy(), setups[0][k].numpy()) for k in other)
    return seen


@pytest.mark.slow
def test_plain_mode_replies_hold_only_what_is_declared(tmp_path):
    grid = serve(load_config(None, [*THREE, "train.algorithm=fedavg", "name=plain"]), tmp_path / "run", tmp_path)
    seen = check_run(grid, ranking=True)
    assert {"query.whoami", "query", "train", "train+validation", "evaluate", "evaluate.test"} <= seen


@pytest.mark.slow
def test_fedpa_replies_hold_only_what_is_declared(tmp_path):
    nodes = {100 + i: {"client-id": i, "state-dir": str(tmp_path / f"state-{i}")} for i in range(4)}
    grid = serve(load_config(None, FEDPA), tmp_path / "run", tmp_path, nodes=nodes)
    seen = check_run(grid, ranking=False)
    assert {"query", "train", "train+validation", "evaluate", "evaluate.test"} <= seen
    trained = [c.array_records["arrays"] for r, c in grid.replies if r.metadata.message_type == "train"]
    assert trained and not any(k.startswith(("own", "user")) for t in trained for k in t)  # the user's own stay


@pytest.mark.slow
def test_split_mode_replies_hold_only_what_is_declared(tmp_path):
    cfg = load_config(None, SPLIT)
    titles = prepare(cfg, echo=False).dataset.items["title"].astype(str).tolist()  # after the k-core filter
    grid = serve(cfg, tmp_path / "run", tmp_path)
    seen = check_run(grid, ranking=True, hidden=64, titles=titles)
    assert {"train", "train.split", "evaluate.split", "evaluate.test_split"} <= seen
    assert "train+validation" not in seen and "train.split+validation" not in seen  # split mode validates apart


def test_the_checks_catch_what_a_client_must_not_send():
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    def arr(values):
        return ArrayRecord({k: torch.as_tensor(v) for k, v in values.items()})

    def grid(reply: dict, sent=None):
        request = Message(RecordDict({"arrays": arr({"w": np.zeros(2, np.float32)}) if sent is None else sent}),
                          dst_node_id=1, message_type="train")
        setup = Message(RecordDict({}), dst_node_id=1, message_type="query")
        initial = RecordDict({"arrays": arr({"w": np.zeros(2, np.float32)}), "metrics": MetricRecord({})})
        return type("Grid", (), {"replies": [(setup, initial), (setup, initial), (request, RecordDict(reply))]})()

    ok = {"arrays": arr({"w": np.ones(2, np.float32)}), "metrics": MetricRecord({"loss": 1.0})}
    check_run(grid(ok), ranking=True)
    bad = [
        {**ok, "history": arr({"items": np.array([3, 5])})},  # a record the type does not declare
        {**ok, "arrays": arr({"w": np.ones(2, np.float32), "items": np.ones(2, np.float32)})},  # not sent
        {**ok, "arrays": arr({"w": np.ones(3, np.float32)})},  # another shape than sent
        {**ok, "arrays": arr({"w": np.array([3, 5])})},  # integers where an adapter tensor goes
        {**ok, "metrics": MetricRecord({"loss": 1.0, "last-item": 42})},  # an undeclared metric
        {**ok, "timing": MetricRecord({**dict.fromkeys(TIMING_KEYS, 1.0), "last-item": 42})},  # hidden in timing
    ]
    for reply in bad:
        with pytest.raises(AssertionError):
            check_run(grid(reply), ranking=True)
