"""FELLRec's dynamic balance against hand computation and the worked example of the research notes."""

import math

import pytest
import torch

from fellrec.strategies import ClientUpdate, make_strategy
from fellrec.strategies.fellrec import aggregate_personal, heating_weights, similarity_matrix

LOSSES = [2.09, 2.08, 2.21, 2.15, 2.09]  # research/fellrec.md §3.2


@pytest.mark.parametrize("t, beta, expected", [
    (0, 1, [1.00, 1.00, 0.80, 1.00, 1.00]),
    (0, 5, [0.84, 0.86, 0.64, 0.75, 0.84]),
    (1, 5, [1.00, 1.00, 0.83, 1.00, 1.00]),
    (1, 1, [1.00, 1.00, 0.94, 1.00, 1.00]),
])
def test_heating_weights_match_the_worked_example(t, beta, expected):
    p, w = heating_weights(LOSSES, t, alpha=0.7, beta=beta, tau=0.05)
    assert [round(x, 3) for x in p] == [0.058, 0.048, 0.642, 0.193, 0.058]
    assert [round(x, 2) for x in w] == expected


def test_heating_saturates_within_a_few_rounds():
    _, w = heating_weights(LOSSES, 4, alpha=0.7, beta=5, tau=0.05)
    assert min(w) > 0.999


def hand_example():
    # three clients, 2-dim adapters: cos(θ0,θ1) = 0, cos(θ0,θ2) = 1/√2, cos(θ1,θ2) = 1/√2
    theta = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    s = 0.5 * (1 + 1 / math.sqrt(2))
    return theta, s


def test_similarity_matrix_by_hand():
    theta, s = hand_example()
    sim = similarity_matrix(theta)
    assert torch.allclose(sim, torch.tensor([[1, 0.5, s], [0.5, 1, s], [s, s, 1]], dtype=torch.float64))
    assert torch.equal(similarity_matrix(theta, "uniform"), torch.ones(3, 3, dtype=torch.float64))


def test_aggregation_by_hand_snapshot_and_sequential():
    theta, s = hand_example()
    sim = similarity_matrix(theta)
    w = [0.5, 1.0, 0.2]
    out = aggregate_personal(theta, sim, w)
    # client 0: (θ0 + 0.5·0.5·θ1 + 0.5·s·θ2) / (1 + 0.25 + 0.5 s)
    expect0 = (theta[0] + 0.25 * theta[1] + 0.5 * s * theta[2]) / (1 + 0.25 + 0.5 * s)
    expect1 = (theta[1] + 0.5 * theta[0] + s * theta[2]) / (1 + 0.5 + s)
    expect2 = (theta[2] + 0.2 * s * theta[0] + 0.2 * s * theta[1]) / (1 + 0.4 * s)
    assert torch.allclose(out, torch.stack([expect0, expect1, expect2]))
    seq = aggregate_personal(theta, sim, w, sequential=True)
    # the released order: client 1 mixes the already-updated client 0, client 2 both updated ones
    s1 = (theta[1] + 0.5 * expect0 + s * theta[2]) / (1 + 0.5 + s)
    s2 = (theta[2] + 0.2 * s * expect0 + 0.2 * s * s1) / (1 + 0.4 * s)
    assert torch.allclose(seq, torch.stack([expect0, s1, s2]))


def test_no_heating_and_uniform_similarity_is_the_plain_mean():
    initial = {"a": torch.zeros(2), "b": torch.zeros(1)}
    s = make_strategy("fellrec", initial, ["0", "1", "2"], heating=False, similarity="uniform")
    ups = [ClientUpdate(c, {"a": torch.tensor(a), "b": torch.tensor(b)}, n, {"loss": x})
           for c, a, b, n, x in [("0", [1.0, 2.0], [3.0], 10, 2.0), ("1", [4.0, 0.0], [0.0], 99, 5.0),
                                 ("2", [1.0, 1.0], [6.0], 1, 1.0)]]
    log = s.aggregate(1, ups)
    assert log["w"] == [1.0, 1.0, 1.0]
    for c in ("0", "1", "2"):  # not sample-weighted: every client counts the same
        assert torch.allclose(s.configure_evaluate(c).tensors["a"], torch.tensor([2.0, 1.0]))
        assert torch.allclose(s.configure_evaluate(c).tensors["b"], torch.tensor([3.0]))


def test_strategy_keeps_a_personal_adapter_per_client_and_logs_the_round():
    initial = {"a": torch.zeros(2)}
    s = make_strategy("fellrec", initial, ["0", "1", "2"])
    theta, _ = hand_example()
    ups = [ClientUpdate(str(i), {"a": theta[i]}, 5, {"loss": x}) for i, x in enumerate([2.0, 2.1, 2.05])]
    log = s.aggregate(1, ups)
    p, w = heating_weights([2.0, 2.1, 2.05], 0, 0.7, 5.0, 0.05)
    expected = aggregate_personal(theta, similarity_matrix(theta), w)
    for i in range(3):
        assert torch.allclose(s.configure_fit(2, str(i)).tensors["a"], expected[i])
    assert log["p"] == pytest.approx(p) and log["w"] == pytest.approx(w)
    assert len(log["similarity"]) == 3 and log["similarity"][0][0] == pytest.approx(1.0)
    assert not torch.allclose(expected[0], expected[1])  # personal, not one global adapter
    t = make_strategy("fellrec", initial, ["0", "1", "2"])
    t.load_state(s.state())
    assert all(torch.equal(t.configure_evaluate(c).tensors["a"], s.configure_evaluate(c).tensors["a"])
               for c in "012")


def test_client_that_did_not_train_keeps_its_adapter():
    s = make_strategy("fellrec", {"a": torch.zeros(2)}, ["0", "1", "2"])
    s.aggregate(1, [ClientUpdate("0", {"a": torch.tensor([1.0, 0.0])}, 1, {"loss": 1.0}),
                    ClientUpdate("1", {"a": torch.tensor([0.0, 1.0])}, 1, {"loss": 1.0})])
    assert torch.equal(s.configure_fit(2, "2").tensors["a"], torch.zeros(2))


# ---- issue 16 §2: what the attention compares, and relative losses -------------------------------

def _one_round(**options):
    """Three clients from the same start (A = [10, 10], B = 0) take small steps: the shared A (the
    start) dominates the whole vectors, the learned B differs only in sign between clients 0 and 2."""
    initial = {"x.lora_A.weight": torch.tensor([10.0, 10.0]), "x.lora_B.weight": torch.tensor([0.0, 0.0])}
    s = make_strategy("fellrec", initial, ["0", "1", "2"], heating=False, **options)
    sent = {c: s.configure_fit(1, c).tensors for c in "012"}  # all the initial adapter
    steps = {"0": [1.0, 0.0], "1": [1.0, 0.1], "2": [-1.0, 0.0]}
    ups = [ClientUpdate(c, {"x.lora_A.weight": sent[c]["x.lora_A.weight"] + torch.tensor(steps[c]),
                            "x.lora_B.weight": torch.tensor(steps[c])}, 1, {"loss": 1.0}) for c in "012"]
    return s.aggregate(1, ups), ups


def _cos01(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a @ b / a.norm() / b.norm() + 1) / 2)


def test_similarity_of_adapter_update_and_b():
    log, ups = _one_round()  # the paper's: whole vectors [A, B], A's shared start dominates
    whole = {c: [*u.tensors["x.lora_A.weight"].tolist(), *u.tensors["x.lora_B.weight"].tolist()]
             for c, u in zip("012", ups, strict=True)}
    assert log["similarity"][0][2] == pytest.approx(_cos01(whole["0"], whole["2"]))
    assert log["similarity"][0][2] > 0.9
    log, _ = _one_round(similarity_of="update")  # [A - A_sent, B - B_sent] = [step, step]
    assert log["similarity"][0][2] == pytest.approx(_cos01([1, 0, 1, 0], [-1, 0, -1, 0]))  # = 0
    assert log["similarity"][0][1] == pytest.approx(_cos01([1, 0, 1, 0], [1, 0.1, 1, 0.1]))
    log, _ = _one_round(similarity_of="lora_b")
    assert log["similarity"][0][2] == pytest.approx(0.0)
    assert log["similarity"][0][1] == pytest.approx(_cos01([1, 0], [1, 0.1]))


def test_update_similarity_is_measured_from_what_each_client_was_sent():
    s = make_strategy("fellrec", {"a": torch.zeros(2)}, ["0", "1"], heating=False, similarity_of="update")
    s.aggregate(1, [ClientUpdate("0", {"a": torch.tensor([4.0, 0.0])}, 1, {"loss": 1.0}),
                    ClientUpdate("1", {"a": torch.tensor([0.0, 4.0])}, 1, {"loss": 1.0})])
    start = {c: s.configure_fit(2, c).tensors["a"].clone() for c in "01"}  # personal mixes
    assert not torch.equal(start["0"], start["1"])
    log = s.aggregate(2, [ClientUpdate("0", {"a": start["0"] + torch.tensor([1.0, 1.0])}, 1, {"loss": 1.0}),
                          ClientUpdate("1", {"a": start["1"] + torch.tensor([2.0, 2.0])}, 1, {"loss": 1.0})])
    assert log["similarity"][0][1] == pytest.approx(1.0)  # both learned along (1, 1)


def test_relative_losses_by_hand():
    losses = [2.0, 2.2, 1.8]
    p, w = heating_weights(losses, 0, alpha=0.7, beta=5.0, tau=0.05, scale="relative")
    x = [v / 2.0 - 1 for v in losses]  # mean 2.0
    e = [math.exp(v / 0.05) for v in x]
    assert p == pytest.approx([v / sum(e) for v in e])
    assert w == pytest.approx([math.tanh(0.7 / q ** 0.2) for q in p])
    raw, _ = heating_weights([v * 10 for v in losses], 0, 0.7, 5.0, 0.05, scale="relative")
    assert raw == pytest.approx(p)  # relative losses do not depend on the loss's scale
    s = make_strategy("fellrec", {"a": torch.zeros(1)}, ["0", "1", "2"], losses="relative")
    log = s.aggregate(1, [ClientUpdate(str(i), {"a": torch.tensor([float(i)])}, 1, {"loss": v})
                          for i, v in enumerate(losses)])
    assert log["p"] == pytest.approx(p)


@pytest.mark.parametrize("options, message", [
    ({"similarity_of": "delta"}, "similarity_of must be one of adapter, update, lora_b"),
    ({"losses": "z"}, "losses must be one of raw, relative"),
    ({"similarity_of": "lora_b"}, "the adapter has no LoRA B matrix"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        make_strategy("fellrec", {"a": torch.zeros(1)}, ["0"], **options)
