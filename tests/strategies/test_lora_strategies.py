"""FFA-LoRA, FedSA-LoRA, FLoRA and FedEx-LoRA: their aggregation by hand, what the client trains and
sends, and runs."""

import json

import pytest
import torch
from safetensors.torch import load_file, save

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

    for a in ("ffa-lora", "fedsa-lora", "flora", "fedex-lora"):
        with pytest.raises(ConfigError, match=f"train.algorithm: {a} does not run in split mode"):
            load_config(None, [f"train.algorithm={a}", "storage.k=0"])


# ---- FLoRA and FedEx-LoRA: residuals folded into the frozen weights -------------------------------

D = "m.q.delta_w"


def with_residual():
    g = torch.Generator().manual_seed(4)
    return {**initial(), D: torch.randn(4, 5, generator=g)}


def client_updates(shares=(1, 3), ranks=(2, 2)):
    g = torch.Generator().manual_seed(9)
    return [ClientUpdate(str(i), {A: torch.randn(r, 5, generator=g), B: torch.randn(4, r, generator=g),
                                  HEAD: torch.full((3,), float(i))}, n, {"loss": 1.0})
            for i, (n, r) in enumerate(zip(shares, ranks, strict=True))]


def test_stacking_gives_the_weighted_sum_of_products_for_different_ranks():
    from fellrec.strategies.lora_parts import stack

    ups = client_updates(shares=(1, 1, 2), ranks=(1, 2, 4))
    w = [0.25, 0.25, 0.5]
    a, b = stack([u.tensors[A] for u in ups], [u.tensors[B] for u in ups], w)
    assert a.shape == (7, 5) and b.shape == (4, 7)
    want = sum(wk * u.tensors[B].double() @ u.tensors[A].double() for wk, u in zip(w, ups, strict=True))
    torch.testing.assert_close(b @ a, want)
    with pytest.raises(ValueError, match="a client's A has rank 2, its B 4"):
        stack([torch.ones(2, 5)], [torch.ones(4, 4)], [1.0])


def test_flora_folds_the_mean_product_into_the_residual_and_restarts_lora():
    s = make_strategy("flora", with_residual(), ["0", "1"], lora_scale=2.0, seed=1)
    p0, p1 = s.configure_fit(1, "0"), s.configure_fit(1, "1")
    assert torch.equal(p0.tensors[B], torch.zeros(4, 2)) and torch.equal(p0.tensors[D], with_residual()[D])
    assert not torch.equal(p0.tensors[A], p1.tensors[A])  # each client its own fresh A
    assert not torch.equal(p0.tensors[A], s.configure_fit(2, "0").tensors[A])  # and each round
    assert p0.tensors[A].abs().max() <= 5 ** -0.5  # peft's U(-1/sqrt(d_in), 1/sqrt(d_in))
    ups = client_updates(shares=(1, 3))
    log = s.aggregate(1, ups)
    want = with_residual()[D] + 2.0 * (0.25 * ups[0].tensors[B] @ ups[0].tensors[A]
                                       + 0.75 * ups[1].tensors[B] @ ups[1].tensors[A])
    g = s.configure_evaluate("0").tensors
    torch.testing.assert_close(g[D], want)
    assert torch.equal(g[B], torch.zeros(4, 2))  # the global model is W0 + ΔW
    torch.testing.assert_close(g[HEAD], torch.full((3,), 0.75))
    assert log["stacked_rank"] == 4
    # FedAvg of A and B apart would not give it
    mean_a = 0.25 * ups[0].tensors[A] + 0.75 * ups[1].tensors[A]
    mean_b = 0.25 * ups[0].tensors[B] + 0.75 * ups[1].tensors[B]
    assert not torch.allclose(with_residual()[D] + 2.0 * mean_b @ mean_a, want)


def test_fedex_lora_global_weight_is_the_mean_of_the_clients_weights():
    s = make_strategy("fedex-lora", with_residual(), ["0", "1"], lora_scale=2.0)
    assert set(s.configure_fit(1, "0").tensors) == {A, B, HEAD, D}
    ups = client_updates(shares=(1, 3))
    s.aggregate(1, ups)
    g = s.configure_evaluate("1").tensors
    mean_a = 0.25 * ups[0].tensors[A] + 0.75 * ups[1].tensors[A]
    torch.testing.assert_close(g[A], mean_a)  # A and B averaged as in FedAvg
    w0 = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    start = with_residual()[D]
    clients = [w0 + start + 2.0 * u.tensors[B] @ u.tensors[A] for u in ups]
    torch.testing.assert_close(w0 + g[D] + 2.0 * g[B] @ g[A], 0.25 * clients[0] + 0.75 * clients[1])
    s.aggregate(2, [ClientUpdate(u.client, {A: mean_a, B: g[B], HEAD: g[HEAD]}, u.num_examples) for u in ups])
    torch.testing.assert_close(s.configure_evaluate("0").tensors[D], g[D])  # no error to fold: unchanged


def test_residual_strategies_need_residuals():
    for a in ("flora", "fedex-lora"):
        with pytest.raises(ValueError, match=f"{a} needs residuals on the LoRA layers"):
            make_strategy(a, initial(), ["0"])


def test_a_residual_sets_the_frozen_weight_and_travels_with_the_adapter():
    from fellrec.adapters import add_residuals, get_adapter, set_adapter

    cfg = load_config(None, FAST)
    model = build_backbone(cfg, *catalogue(prepare(cfg))).model
    names = add_residuals(model)
    tensors = get_adapter(model)
    assert names and all(torch.equal(tensors[n], torch.zeros_like(tensors[n])) for n in names)
    layer = model.fellrec_residuals[names[0]]
    base = layer.get_base_layer()
    w0 = base.weight.detach().clone()
    x = torch.randn(3, w0.shape[1])
    delta = torch.randn_like(w0)
    set_adapter(model, {**tensors, names[0]: delta})
    torch.testing.assert_close(base(x), x @ (w0 + delta).T + (base.bias if base.bias is not None else 0))
    assert torch.equal(get_adapter(model)[names[0]], delta)
    set_adapter(model, tensors)
    assert torch.equal(base.weight, w0)  # back to W0 exactly
    with pytest.raises(ValueError, match="missing"):
        set_adapter(model, {k: v for k, v in tensors.items() if k != names[0]})


@pytest.mark.parametrize("algorithm", ["flora", "fedex-lora"])
def test_a_residual_run_folds_into_the_frozen_weights_and_never_uploads_the_residual(tmp_path, algorithm):
    out = run(load_config(None, [*FAST, f"train.algorithm={algorithm}", f"name={algorithm}"]), tmp_path, False)
    g = load_file(out / "adapters" / "global.safetensors")
    deltas = [k for k in g if k.endswith(".delta_w")]
    assert deltas and any(g[k].abs().sum() > 0 for k in deltas)
    if algorithm == "flora":
        assert all(g[k].abs().sum() == 0 for k in g if ".lora_B." in k)
    res = json.loads((out / "results.json").read_text())
    assert res["algorithm"] == algorithm
    down = len(save(g))  # down: the whole adapter with the residual; up: all but the residual
    up = len(save({k: v for k, v in g.items() if k not in deltas}))
    for r in lines(out / "metrics.jsonl"):
        assert all(r["bytes_down"][c] == down and r["bytes_up"][c] == up for c in r["clients"])
