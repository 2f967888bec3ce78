"""The server-side algorithms' maths, checked against hand computation."""

import pytest
import torch

from fellrec.strategies import ClientUpdate, make_strategy, weighted_mean
from fellrec.strategies.centralized import POOLED
from fellrec.trainer import proximal


def update(client, n, **tensors):
    return ClientUpdate(client, {k: torch.tensor(v) for k, v in tensors.items()}, n, {"loss": 1.0})


def test_fedavg_is_the_sample_weighted_mean():
    initial = {"a": torch.zeros(2), "b": torch.zeros(1, 2)}
    s = make_strategy("fedavg", initial, ["0", "1", "2"])
    assert torch.equal(s.configure_fit(1, "0").tensors["a"], torch.zeros(2))
    s.aggregate(1, [update("0", 1, a=[1.0, 2.0], b=[[0.0, 4.0]]), update("1", 3, a=[5.0, -2.0], b=[[8.0, 0.0]])])
    # by hand: a = (1*[1,2] + 3*[5,-2]) / 4 = [4, -1]; b = (1*[0,4] + 3*[8,0]) / 4 = [6, 1]
    assert torch.allclose(s.global_tensors()["a"], torch.tensor([4.0, -1.0]))
    assert torch.allclose(s.global_tensors()["b"], torch.tensor([[6.0, 1.0]]))
    for c in ("0", "1", "2"):  # every client, trained this round or not, gets the new global adapter
        assert torch.equal(s.configure_fit(2, c).tensors["a"], torch.tensor([4.0, -1.0]))
        assert torch.equal(s.configure_evaluate(c).tensors["b"], torch.tensor([[6.0, 1.0]]))


def test_weighted_mean_is_independent_of_client_order():
    ups = [update(str(i), n, w=[float(i) * 0.1 + 1e-7 * i, 3.0]) for i, n in enumerate([5, 7, 11])]
    forward, backward = weighted_mean(ups)["w"], weighted_mean(ups[::-1])["w"]
    assert torch.equal(forward, backward)


def test_weighted_mean_rejects_mismatched_updates():
    with pytest.raises(ValueError, match="client 1 sent other tensors"):
        weighted_mean([update("0", 1, a=[1.0]), update("1", 1, b=[1.0])])
    with pytest.raises(ValueError, match="positive sum"):
        weighted_mean([update("0", 0, a=[1.0])])


def test_fedprox_sends_mu_and_averages_like_fedavg():
    initial = {"a": torch.zeros(2)}
    prox, avg = make_strategy("fedprox", initial, ["0", "1"], prox_mu=0.5), make_strategy("fedavg", initial, ["0", "1"])
    assert prox.configure_fit(1, "0").config["prox_mu"] == 0.5
    assert "prox_mu" not in avg.configure_fit(1, "0").config
    ups = [update("0", 2, a=[1.0, 1.0]), update("1", 6, a=[3.0, -1.0])]
    prox.aggregate(1, ups)
    avg.aggregate(1, ups)
    assert torch.equal(prox.global_tensors()["a"], avg.global_tensors()["a"])
    assert torch.allclose(prox.global_tensors()["a"], torch.tensor([2.5, -0.5]))


def test_proximal_term_value_and_gradient():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    anchor = {"w": torch.tensor([0.0, 2.0, 5.0])}
    loss = proximal(lambda batch: (w * 0).sum() + 7.0, {"w": w}, anchor, mu=0.2)
    value = loss(None)
    # by hand: 7 + 0.1 * (1 + 0 + 4) = 7.5; gradient mu * (w - anchor) = [0.2, 0, -0.4]
    assert value.item() == pytest.approx(7.5)
    value.backward()
    assert torch.allclose(w.grad, torch.tensor([0.2, 0.0, -0.4]))


def test_local_shares_nothing_and_keeps_no_server_state():
    s = make_strategy("local", {"a": torch.ones(2)}, ["0", "1"])
    assert not s.communicates
    p = s.configure_fit(1, "0")
    assert p.tensors == {} and p.config["share"] is False
    assert s.aggregate(1, [update("0", 1, a=[9.0, 9.0])]) == {}
    assert s.configure_evaluate("1").tensors == {} and s.global_tensors() is None


def test_centralized_takes_the_pooled_trainers_adapter():
    s = make_strategy("centralized", {"a": torch.zeros(2)}, [POOLED])
    s.aggregate(1, [update(POOLED, 100, a=[1.0, 2.0])])
    assert torch.equal(s.configure_evaluate("3").tensors["a"], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="pooled trainer"):
        s.aggregate(2, [update("0", 1, a=[1.0, 2.0])])


def test_strategy_state_round_trips():
    s = make_strategy("fedavg", {"a": torch.zeros(2)}, ["0"])
    s.aggregate(1, [update("0", 1, a=[1.0, 2.0])])
    t = make_strategy("fedavg", {"a": torch.zeros(2)}, ["0"])
    t.load_state(s.state())
    assert torch.equal(t.global_tensors()["a"], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="unknown algorithm 'fedsgd'"):
        make_strategy("fedsgd", {}, [])


def test_weighted_mean_can_leave_tensors_out():
    ups = [update("0", 1, a=[1.0], b=[5.0]), update("1", 3, a=[5.0], b=[9.0])]
    out = weighted_mean(ups, skip=lambda k: k == "b")
    assert set(out) == {"a"} and torch.allclose(out["a"], torch.tensor([4.0]))
