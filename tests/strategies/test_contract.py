"""One table of every strategy in the registry, FedPA's included, through the same checks: the state a
checkpoint keeps gives back the same server, identical updates aggregate to themselves, and the
same updates give the same state. Each strategy's own rule is tested against hand computation in
test_strategies.py, test_fellrec.py and fedpa/test_fedpa.py."""

import inspect

import pytest
import torch

from fellrec.fedpa.trainer import FedPATrainer
from fellrec.strategies import POOLED, STRATEGIES, ClientTrainer, ClientUpdate, make_strategy
from fellrec.trainer import AdapterTrainer


def _initial(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"layer.lora_A.weight": torch.randn(2, 4, generator=g),
            "layer.lora_B.weight": torch.randn(4, 2, generator=g)}


def _residual_initial():
    """With a residual on the layer's frozen weight (FLoRA, FedEx-LoRA), non-zero as after a round."""
    return {**_initial(), "layer.delta_w": torch.randn(4, 4, generator=torch.Generator().manual_seed(3))}


def _fedpa_initial():
    g = torch.Generator().manual_seed(1)
    return {"gate.w": torch.randn(3, generator=g), "out.w": torch.randn(2, 2, generator=g),
            "group.age=0.l0.A": torch.randn(2, 3, generator=g), "group.age=1.l0.A": torch.randn(2, 3, generator=g)}


# name -> (initial adapter, clients, options): what a run gives each strategy
SETTINGS = {
    "centralized": (_initial, [POOLED], {}),
    "local": (_initial, ["0", "1", "2"], {}),
    "fedavg": (_initial, ["0", "1", "2"], {}),
    "fedprox": (_initial, ["0", "1", "2"], {"prox_mu": 0.1}),
    "fellrec": (_initial, ["0", "1", "2"], {"alpha": 0.7, "beta": 5.0, "tau": 0.05}),
    "ffa-lora": (_initial, ["0", "1", "2"], {}),
    "fedsa-lora": (_initial, ["0", "1", "2"], {}),
    "flora": (_residual_initial, ["0", "1", "2"], {"lora_scale": 2.0, "seed": 5}),
    "fedex-lora": (_residual_initial, ["0", "1", "2"], {"lora_scale": 2.0}),
    "fedpa": (_fedpa_initial, ["u1", "u2", "u3"],
              {"client_groups": {"u1": {"age": 0}, "u2": {"age": 1}, "u3": {"age": 1}}}),
}


def test_the_table_covers_the_registry():
    assert set(SETTINGS) == set(STRATEGIES)


def build(name):
    initial, clients, options = SETTINGS[name]
    return make_strategy(name, initial(), clients, **options), clients


def updates(strategy, clients, rnd, values):
    """Each client sends back ``values`` for the tensors it was sent (if it shares), ``n`` = 10 + i."""
    out = []
    for i, c in enumerate(clients):
        payload = strategy.configure_fit(rnd, c)
        sent = {k: values[k].clone() for k in payload.tensors} if payload.config.get("share", True) else {}
        out.append(ClientUpdate(c, sent, 10 + i, {"loss": 1.0 + i, "steps": 1}))
    return out


def some_values(strategy, clients, scale=1.0):
    names = {k for c in clients for k in strategy.configure_fit(1, c).tensors}
    g = torch.Generator().manual_seed(7)
    shapes = {k: v.shape for c in clients for k, v in strategy.configure_fit(1, c).tensors.items()}
    return {k: scale * torch.randn(shapes[k], generator=g) for k in sorted(names)}


def payloads(strategy, clients):
    return {c: (strategy.configure_fit(3, c), strategy.configure_evaluate(c)) for c in clients}


def same_payloads(a, b):
    for c in a:
        for pa, pb in zip(a[c], b[c], strict=True):
            assert pa.config == pb.config
            assert pa.tensors.keys() == pb.tensors.keys()
            assert all(torch.equal(pa.tensors[k], pb.tensors[k]) for k in pa.tensors)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_checkpointed_state_gives_back_the_same_server(name):
    s, clients = build(name)
    s.aggregate(1, updates(s, clients, 1, some_values(s, clients)))
    fresh, _ = build(name)
    fresh.load_state({k: v.clone() for k, v in s.state().items()})
    same_payloads(payloads(s, clients), payloads(fresh, clients))
    if s.global_tensors() is not None:
        g, h = s.global_tensors(), fresh.global_tensors()
        assert g.keys() == h.keys() and all(torch.equal(g[k], h[k]) for k in g)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_identical_updates_aggregate_to_themselves(name):
    s, clients = build(name)
    values = some_values(s, clients, scale=3.0)
    s.aggregate(1, updates(s, clients, 1, values))
    for c in clients:
        got = s.configure_evaluate(c).tensors
        shared = s.configure_fit(1, c).config.get("share", True)
        assert set(got) == (set(s.configure_fit(2, c).tensors) if shared else set())
        if "layer.delta_w" in got:  # FLoRA, FedEx-LoRA: the same effective weight W0 + ΔW + s·B·A
            def effective(t):
                return t["layer.delta_w"] + 2.0 * t["layer.lora_B.weight"] @ t["layer.lora_A.weight"]
            torch.testing.assert_close(effective(got), effective({**values, "layer.delta_w": _residual_initial()[
                "layer.delta_w"]}), rtol=1e-5, atol=1e-5)
            continue
        for k, v in got.items():  # every client now holds what they all sent
            torch.testing.assert_close(v, values[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_same_updates_give_the_same_state(name):
    a, clients = build(name)
    b, _ = build(name)
    for rnd, scale in ((1, 1.0), (2, -0.5)):
        ua, ub = (updates(s, clients, rnd, some_values(s, clients, scale)) for s in (a, b))
        for i, u in enumerate(ua):  # distinct updates, so that aggregation has something to mix
            for k in u.tensors:
                u.tensors[k] += 0.1 * i
                ub[i].tensors[k] += 0.1 * i
        assert a.aggregate(rnd, ua) == b.aggregate(rnd, ub)
    sa, sb = a.state(), b.state()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("trainer", [AdapterTrainer, FedPATrainer])
def test_every_trainer_has_the_client_trainer_methods(trainer):
    """The seam is declared once (``fellrec.strategies.ClientTrainer``); each trainer class has each of
    its methods, with the protocol's parameters in the protocol's order."""
    for name in ("fit", "evaluate", "test", "state", "load_state", "selected"):
        want = list(inspect.signature(getattr(ClientTrainer, name)).parameters)
        have = list(inspect.signature(getattr(trainer, name)).parameters)
        assert have[:len(want)] == want, (trainer.__name__, name, have)
