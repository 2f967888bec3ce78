"""FFA-LoRA and FedSA-LoRA: their aggregation by hand, what the client trains and sends, and runs."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fellrec.build import build_backbone, catalogue
from fellrec.config import load_config
from fellrec.pipeline import prepare
from fellrec.run import run
from fellrec.strategies import ClientUpdate, make_strategy
from fellrec.trainer import read_full

A, B, HEAD = "m.q.lora_A.weight", "m.q.lora_B.weight", "items.w_out"


def initial():
    g = torch.Generator().manual_seed(0)
    return {A: torch.randn(2, 5, generator=g), B: torch.zeros(4, 2), HEAD: torch.randn(3, generator=g)}


def test_ffa_lora_sends_no_a_and_its_average_is_the_average_update():
    s = make_strategy("ffa-lora", initial(), ["0", "1", "2"])
    p = s.configure_fit(1, "0")
    assert set(p.tensors) == {B, HEAD} and p.config == {"share": True, "upload": "sent", "frozen": ".lora_A."}
    bs = [torch.full((4, 2), float(v)) for v in (1.0, 2.0, 6.0)]
    ns = [1, 1, 2]
    s.aggregate(1, [ClientUpdate(c, {B: b, HEAD: torch.full((3,), float(i))}, n)
                    for i, (c, b, n) in enumerate(zip(["0", "1", "2"], bs, ns, strict=True))])
    mean_b = (1 * bs[0] + 1 * bs[1] + 2 * bs[2]) / 4
    torch.testing.assert_close(s.configure_evaluate("1").tensors[B], mean_b)
    torch.testing.assert_close(s.configure_evaluate("1").tensors[HEAD], torch.full((3,), (0 + 1 + 2 * 2) / 4))
    # exact: with the one frozen A, the update of the mean B is the mean of the clients' updates
    a = initial()[A]
    torch.testing.assert_close(mean_b @ a, (1 * bs[0] @ a + 1 * bs[1] @ a + 2 * bs[2] @ a) / 4)
    with pytest.raises(ValueError, match="ffa-lora: a client sent tensors it was not sent"):
        s.aggregate(2, [ClientUpdate("0", {A: a, B: mean_b, HEAD: torch.zeros(3)}, 1)])


def test_fedsa_lora_averages_a_and_leaves_b_to_each_client():
    s = make_strategy("fedsa-lora", initial(), ["0", "1"])
    p = s.configure_fit(1, "0")
    assert set(p.tensors) == {A, HEAD} and p.config == {"share": True, "upload": "sent"}
    s.aggregate(1, [ClientUpdate("0", {A: torch.ones(2, 5), HEAD: torch.zeros(3)}, 3),
                    ClientUpdate("1", {A: torch.full((2, 5), 5.0), HEAD: torch.ones(3)}, 1)])
    torch.testing.assert_close(s.configure_evaluate("0").tensors[A], torch.full((2, 5), (3 * 1 + 5) / 4))
    assert B not in s.configure_evaluate("1").tensors
    with pytest.raises(ValueError, match="fedsa-lora: a client sent tensors it was not sent"):
        s.aggregate(2, [ClientUpdate("0", {A: torch.ones(2, 5), HEAD: torch.zeros(3), B: torch.ones(4, 2)}, 1)])


FAST = ["model.name_or_path=tiny-random", "partition.method=attribute", "partition.attribute=gender",
        "train.batch_size=4", "train.local_steps=2", "train.max_train_samples=64", "eval.max_valid_samples=12",
        "eval.max_test_samples=30", "train.rounds=2", "train.lr=5e-2"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def initial_adapter(out):
    """The adapter every client of the run in ``out`` started from (a fresh build of its config)."""
    cfg = load_config(out / "config.yaml")
    return read_full(build_backbone(cfg, *catalogue(prepare(cfg))).model)


def test_an_ffa_lora_run_keeps_a_at_its_initialisation_and_sends_less_than_fedavg(tmp_path):
    outs = {a: run(load_config(None, [*FAST, f"train.algorithm={a}", f"name={a}"]), tmp_path, False)
            for a in ("ffa-lora", "fedavg")}
    start = initial_adapter(outs["ffa-lora"])
    ffa, avg = (load_file(outs[a] / "adapters" / "client-0.safetensors") for a in ("ffa-lora", "fedavg"))
    a_names = [k for k in ffa if ".lora_A." in k]
    assert a_names and all(torch.equal(ffa[k], start[k]) for k in a_names)  # frozen
    assert not all(torch.equal(avg[k], start[k]) for k in a_names)  # FedAvg trains them
    assert any(ffa[k].abs().sum() > 0 for k in ffa if ".lora_B." in k)  # B trained (it starts at 0)
    up = {a: json.loads((outs[a] / "results.json").read_text())["communication"]["bytes_up"] for a in outs}
    assert 0 < up["ffa-lora"] < up["fedavg"]
    for r in lines(outs["ffa-lora"] / "metrics.jsonl"):
        assert r["bytes_up"] == r["bytes_down"]  # the clients send back what they were sent: no A


def test_a_fedsa_lora_run_keeps_each_clients_b_and_shares_a(tmp_path):
    out = run(load_config(None, [*FAST, "train.algorithm=fedsa-lora", "name=sa"]), tmp_path, False)
    a, b = (load_file(out / "adapters" / f"client-{c}.safetensors") for c in ("0", "1"))
    g = load_file(out / "adapters" / "global.safetensors")
    assert not any(".lora_B." in k for k in g) and any(".lora_A." in k for k in g)
    bs = [k for k in a if ".lora_B." in k]
    assert bs and not all(torch.equal(a[k], b[k]) for k in bs)  # each client's own B
    res = json.loads((out / "results.json").read_text())
    assert res["algorithm"] == "fedsa-lora" and res["communication"]["bytes_up"] > 0


def test_the_lora_strategies_refuse_split_mode():
    from fellrec.errors import ConfigError

    for a in ("ffa-lora", "fedsa-lora"):
        with pytest.raises(ConfigError, match=f"train.algorithm: {a} does not run in split mode"):
            load_config(None, [f"train.algorithm={a}", "storage.k=0"])
