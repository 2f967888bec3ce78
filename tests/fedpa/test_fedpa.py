"""FedPA: features, model, strategy, LDP, metrics, pre-training and one end-to-end run on ML-100K."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import log_loss, precision_recall_fscore_support, roc_auc_score

from fellrec.data.tables import Dataset
from fellrec.fedpa import (
    CTRModel,
    FedPAModel,
    build_features,
    build_federation,
    ctr_metrics,
    load_pretrained,
    pooled_selection,
    pretrain,
    save_pretrained,
    select_public,
    split_users,
)
from fellrec.fedpa.features import PAD, log_bin_edges, log_binned
from fellrec.fedpa.metrics import per_user_auc
from fellrec.fedpa.model import param_names
from fellrec.fedpa.trainer import FedPATrainer, laplace
from fellrec.strategies.base import ClientUpdate
from fellrec.strategies.fedpa import FedPA

torch.set_num_threads(1)


def movie_dataset(n_users=30, n_items=25, per_user=(3, 14), seed=0) -> Dataset:
    """A small MovieLens-like dataset with user attributes, genres and years (some missing)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(*per_user))
        for k in range(n):
            rows.append((u + 1, int(rng.integers(1, n_items + 1)), float(1000 * u + k), float(rng.integers(1, 6))))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    genres = [("Drama",), ("Comedy", "Drama"), (), ("Action", "Comedy", "Sci-Fi"), ("Horror",)]
    items = pd.DataFrame({"item_id": np.arange(1, n_items + 1), "title": [f"M{i}" for i in range(n_items)],
                          "year": pd.array([None if i % 7 == 0 else 1930 + 3 * i for i in range(n_items)],
                                           dtype="Int64"),
                          "genres": [genres[i % 5] for i in range(n_items)]})
    users = pd.DataFrame({"user_id": np.arange(1, n_users + 1), "age": rng.integers(10, 70, n_users),
                          "gender": ["M" if u % 3 else "F" for u in range(n_users)],
                          "occupation": [["writer", "artist", "doctor"][u % 3] for u in range(n_users)],
                          "zip_code": [["12345", "9", "T8H1N", "55555"][u % 4] for u in range(n_users)]})
    return Dataset.from_raw("ml-100k", inter, items, users)


# ---- features ------------------------------------------------------------------------------------


def test_movielens_features_on_hand_made_dataset():
    inter = pd.DataFrame({"user_id": [1, 1, 2, 2, 3], "item_id": [10, 11, 10, 12, 11],
                          "timestamp": [1.0, 2.0, 3.0, 4.0, 5.0], "rating": [4.0, 3.0, 5.0, 1.0, 4.0]})
    items = pd.DataFrame({"item_id": [10, 11, 12], "title": ["a", "b", "c"],
                          "year": pd.array([1995, None, 1951], dtype="Int64"),
                          "genres": [("Drama", "Comedy"), (), ("Action",)]})
    users = pd.DataFrame({"user_id": [1, 2, 3], "age": [24, 56, 7], "gender": ["M", "F", "M"],
                          "occupation": ["writer", "artist", "writer"], "zip_code": ["94043", "T8H1N", None]})
    ds = Dataset.from_raw("ml-100k", inter, items, users)
    f = build_features(ds)
    assert f.user_fields == ["age", "gender", "occupation", "zip"] and f.item_fields == ["genres", "year"]
    assert all(v[0] == "<unk>" for v in f.vocab.values())
    names = {field: [f.vocab[field][c] for c in f.user_codes[:, j]] for j, field in enumerate(f.user_fields)}
    assert names == {"age": ["18-24", "56+", "<18"], "gender": ["M", "F", "M"],
                     "occupation": ["writer", "artist", "writer"], "zip": ["9", "other", "<unk>"]}
    assert f.vocab["gender"] == ["<unk>", "F", "M"]
    assert f.item_widths == [2, 1]
    g = f.vocab["genres"]
    assert g == ["<unk>", "Action", "Comedy", "Drama"]
    # item 10: Drama, Comedy; item 11: no genre -> unknown; item 12: Action. Year: 1995+, missing, 1950s.
    assert f.item_codes.tolist() == [[g.index("Drama"), g.index("Comedy"), f.vocab["year"].index("1995+")],
                                     [0, PAD, 0], [g.index("Action"), PAD, f.vocab["year"].index("1950s")]]
    # labels in interaction order (time order): rating >= 4
    assert f.label.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert f.user_cards == [8, 3, 3, 3] and f.item_cards == [4, 9]


def test_log_binning_matches_the_released_recipe():
    x = np.exp(np.linspace(0, 12, 1000)) - 1
    edges = log_bin_edges(x)
    lx = np.log1p(x)
    assert len(edges) == 101
    assert edges[0] == pytest.approx(lx.min() - 1) and edges[-1] == pytest.approx(lx.max() + 1)
    np.testing.assert_allclose(edges[1:-1], np.linspace(*np.percentile(lx, [1, 99]), 99))
    codes, vocab = log_binned(pd.Series([*x, np.nan]), edges)
    assert len(vocab) == 101 and codes[-1] == 0
    assert codes[:-1].min() == 1 and codes[:-1].max() == 100
    expect = pd.cut(lx, edges, labels=False) + 1  # pandas' right-closed bins, shifted past the unknown code
    np.testing.assert_array_equal(codes[:-1], expect)


def test_kuairand_features():
    from fellrec.fedpa.features import KUAIRAND_BINNED, KUAIRAND_ITEM_FIELDS, KUAIRAND_USER_FIELDS

    rng = np.random.default_rng(0)
    users = pd.DataFrame({"user_id": [1, 2, 3], **{c: ["a", "b", None] for c in KUAIRAND_USER_FIELDS}})
    users["user_active_degree"] = ["full_active", "high_active", "full_active"]
    items = pd.DataFrame({"item_id": np.arange(1, 41), "title": "", "upload_type": ["Web", "App"] * 20,
                          "music_type": [1.0, np.nan] * 20, "tag": ["12,65", "3"] * 20,
                          **{c: rng.exponential(1000, 40) for c in KUAIRAND_BINNED}})
    inter = pd.DataFrame({"user_id": [1, 2, 3, 1], "item_id": [1, 2, 3, 4], "timestamp": [1.0, 2, 3, 4],
                          "rating": [1.0, 0.0, 0.0, 1.0]})
    ds = Dataset.from_raw("kuairand-pure", inter, items, users)
    f = build_features(ds)
    assert f.kind == "kuairand" and len(f.user_fields) == 23 and len(f.item_fields) == 6
    assert f.item_fields == [*KUAIRAND_ITEM_FIELDS, *KUAIRAND_BINNED]
    assert f.label.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert f.user_codes[2, f.user_field("is_live_streamer")] == 0  # missing -> reserved index
    assert f.vocab["tag"] == ["<unk>", "12,65", "3"]  # a whole tag string is one value
    assert [len(f.vocab[c]) for c in KUAIRAND_BINNED] == [101, 101, 101]
    assert f.vocab["user_active_degree"] == ["<unk>", "full_active", "high_active"]


def test_public_selection_and_per_user_split():
    ds = movie_dataset(n_users=60, per_user=(2, 30))
    f = build_features(ds)
    pub = select_public(ds, f, fraction=0.25, seed=3)
    assert pub.sum() == 15 and np.array_equal(pub, select_public(ds, f, fraction=0.25, seed=3))
    by = select_public(ds, f, attribute="gender", values=["F"], fraction_in=1.0, fraction_out=0.0)
    gender = np.asarray(f.vocab["gender"])[f.user_codes[:, f.user_field("gender")]]
    assert np.array_equal(by, gender == "F")
    raw = select_public(ds, f, attribute="occupation", values=["doctor"], fraction_in=0.5, fraction_out=0.0)
    assert raw.sum() == round(0.5 * (ds.users["occupation"] == "doctor").sum())
    sp = split_users(ds, pub, min_interactions=5)
    size = np.bincount(ds.interactions["user"], minlength=ds.num_users)
    assert set(sp.dropped_users) == set(np.flatnonzero(~pub & (size < 5)))
    assert set(sp.private_users) == set(np.flatnonzero(~pub & (size >= 5)))
    assert len(sp.public_rows) == size[pub].sum()
    users = ds.interactions["user"].to_numpy()
    ts = ds.interactions["timestamp"].to_numpy()
    for u in sp.private_users:
        n = size[u]
        tr, va, te = (rows[users[rows] == u] for rows in (sp.train_rows, sp.valid_rows, sp.test_rows))
        assert (len(va), len(te)) == (int(0.2 * n), int(0.2 * n)) and len(tr) == n - 2 * int(0.2 * n)
        assert ts[tr].max() <= ts[va].min() and ts[va].max() <= ts[te].min()
    for rows in (sp.train_rows, sp.valid_rows, sp.test_rows):
        assert not np.isin(users[rows], sp.dropped_users).any() and not pub[users[rows]].any()


# ---- model ---------------------------------------------------------------------------------------


def small_model(zero_init=False, groups=None):
    torch.manual_seed(0)
    base = CTRModel([5, 3, 4], [6, 7], [2, 1], dim=4, hidden=(16, 8))
    item_codes = torch.tensor([[1, 2, 3], [4, PAD, 0], [0, PAD, 6], [5, 1, 2]])
    groups = {"g": 3, "h": 2} if groups is None else groups
    return FedPAModel(base, item_codes, group_cards=groups, rank=2, zero_init=zero_init, gate_hidden=(8, 4))


def test_model_shapes_and_gate():
    m = small_model()
    user = torch.tensor([1, 2, 3])
    items = torch.tensor([0, 1, 2, 3, 3])
    assert m.base(user.expand(5, -1), m.item_codes[items]).shape == (5,)
    assert m.item_table.shape == (4, 2 * 4)
    for variant in ("fedpa", "adapter", "full", "frozen"):
        params = {**m.private_initial(variant, user, seed=1), **m.shared_initial(variant, seed=2)}
        if variant == "fedpa":
            params = {**params, **FedPA(m.shared_initial("fedpa"), ["c"], client_groups={"c": {"g": 1, "h": 0}})
                      .client_tensors("c")}
        shared, private = param_names(m, variant)
        assert set(private) <= set(params) and set(shared) <= set(params)
        logits, gates = m.forward_detail(variant, params, user, items)
        assert logits.shape == (5,)
        if variant == "fedpa":
            assert params["user.0.A"].shape == (5 * 4, 2) and params["user.0.B"].shape == (2, 16)
            assert len(gates) == 2 and all(g.shape == (5, 4) for g in gates)  # K = 2 + 2 group attributes
            for g in gates:
                torch.testing.assert_close(g.sum(-1), torch.ones(5))
                assert (g > 0).all()
        # B = 0 at init: every adapted variant starts as the frozen model up to the gate's rescaling
        if variant in ("adapter", "full"):
            torch.testing.assert_close(logits, m.logits("frozen", {}, user, items))


def trainer_for(m, zero_seed=0, n=40, lr=0.05):
    g = torch.Generator().manual_seed(zero_seed)
    items = torch.randint(0, 4, (n,), generator=g)
    labels = (torch.rand(n, generator=g) < 0.5).float()
    from fellrec.fedpa.trainer import ClientData

    data = ClientData(items, labels, items[:5], labels[:5], items[5:10], labels[5:10])
    return FedPATrainer("c", m, data, torch.tensor([1, 2, 3]), variant="fedpa", lr=lr, seed=0)


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_adapters_never_learn_default_ones_do(zero_init):
    m = small_model(zero_init=zero_init)
    strategy = FedPA(m.shared_initial("fedpa", seed=0), ["c"], client_groups={"c": {"g": 2, "h": 1}})
    t = trainer_for(m)
    for rnd in (1, 2, 3):
        update = t.fit(strategy.configure_fit(rnd, "c"), rnd)
        strategy.aggregate(rnd, [update])
    adapters = {**{k: v for k, v in t.own.items() if k.startswith("user.") and k != "user.emb"},
                **{k: v for k, v in strategy.server.items() if k.startswith("group.g=2") or k.startswith("group.h=1")}}
    assert len(adapters) == 2 * 2 + 2 * 2 * 2
    if zero_init:
        assert all(torch.equal(v, torch.zeros_like(v)) for v in adapters.values())
        # ...while the rest learns: the gate and the private embeddings moved
        assert not torch.equal(t.own["user.emb"], m.user_rows(torch.tensor([1, 2, 3])))
    else:
        bs = {k: v for k, v in adapters.items() if k.endswith(".B")}
        assert all(v.abs().max() > 0 for v in bs.values())
    untouched = strategy.server["group.g=0.0.B"]  # no participant had g=0: kept as initialised
    assert torch.equal(untouched, torch.zeros_like(untouched))


# ---- strategy ------------------------------------------------------------------------------------


def test_fedpa_aggregation_by_hand():
    initial = {"gate.0.w1": torch.zeros(2), "out.bias": torch.zeros(1),
               "group.g=0.0.A": torch.full((2,), 9.0), "group.g=1.0.A": torch.full((2,), 7.0),
               "group.g=2.0.A": torch.full((2,), 5.0)}
    groups = {"a": {"g": 0}, "b": {"g": 0}, "c": {"g": 1}}
    s = FedPA(initial, ["a", "b", "c"], client_groups=groups)
    p = s.configure_fit(1, "a")
    assert set(p.tensors) == {"gate.0.w1", "out.bias", "group.g.0.A"} and p.config["share"]
    assert torch.equal(p.tensors["group.g.0.A"], initial["group.g=0.0.A"])

    def up(c, n, x, grp):
        return ClientUpdate(c, {"gate.0.w1": torch.full((2,), x), "out.bias": torch.tensor([x]),
                                "group.g.0.A": torch.full((2,), grp)}, n)

    s.aggregate(1, [up("a", 1, 1.0, 10.0), up("b", 3, 2.0, 20.0), up("c", 4, 4.0, 100.0)])
    torch.testing.assert_close(s.server["gate.0.w1"], torch.full((2,), (1 * 1 + 3 * 2 + 4 * 4) / 8))
    torch.testing.assert_close(s.server["out.bias"], torch.tensor([(1 * 1 + 3 * 2 + 4 * 4) / 8]))
    torch.testing.assert_close(s.server["group.g=0.0.A"], torch.full((2,), (1 * 10 + 3 * 20) / 4))  # a, b only
    torch.testing.assert_close(s.server["group.g=1.0.A"], torch.full((2,), 100.0))  # c only
    torch.testing.assert_close(s.server["group.g=2.0.A"], torch.full((2,), 5.0))  # nobody: unchanged
    assert torch.equal(s.configure_evaluate("c").tensors["group.g.0.A"], s.server["group.g=1.0.A"])

    u = FedPA(initial, ["a", "b", "c"], client_groups=groups, weighting="uniform")
    u.aggregate(1, [up("a", 1, 1.0, 10.0), up("b", 3, 2.0, 20.0)])
    torch.testing.assert_close(u.server["gate.0.w1"], torch.full((2,), 1.5))
    torch.testing.assert_close(u.server["group.g=0.0.A"], torch.full((2,), 15.0))

    with pytest.raises(ValueError, match="not sent"):
        s.aggregate(2, [ClientUpdate("a", {"user.0.A": torch.zeros(2)}, 1)])
    restored = FedPA(initial, ["a", "b", "c"], client_groups=groups)
    restored.load_state(s.state())
    assert all(torch.equal(restored.server[k], s.server[k]) for k in s.server)


def test_user_adapter_never_uploaded():
    m = small_model()
    strategy = FedPA(m.shared_initial("fedpa"), ["c"], client_groups={"c": {"g": 0, "h": 1}})
    t = trainer_for(m)
    update = t.fit(strategy.configure_fit(1, "c"), 1)
    shared, private = param_names(m, "fedpa")
    assert set(update.tensors) == set(shared)
    assert not any(k.startswith("user.") for k in update.tensors)
    assert set(t.own) == set(private)
    strategy.aggregate(1, [update])


def test_ldp_noise_scale_and_zero_scale():
    g = torch.Generator().manual_seed(0)
    x = laplace((200_000,), 0.3, g)
    assert x.abs().mean().item() == pytest.approx(0.3, rel=0.02)
    assert x.mean().item() == pytest.approx(0.0, abs=0.01)

    m = small_model()
    initial = m.shared_initial("fedpa")
    groups = {"c": {"g": 0, "h": 1}}
    clean_t = trainer_for(m)
    clean = clean_t.fit(FedPA(initial, ["c"], client_groups=groups).configure_fit(1, "c"), 1)
    zero = trainer_for(m).fit(FedPA(initial, ["c"], client_groups=groups, ldp_scale=0.0).configure_fit(1, "c"), 1)
    noisy_t = trainer_for(m)
    noisy = noisy_t.fit(FedPA(initial, ["c"], client_groups=groups, ldp_scale=0.5).configure_fit(1, "c"), 1)
    assert all(torch.equal(clean.tensors[k], zero.tensors[k]) for k in clean.tensors)
    diff = torch.cat([(noisy.tensors[k] - clean.tensors[k]).reshape(-1) for k in clean.tensors])
    assert diff.abs().mean().item() == pytest.approx(0.5, rel=0.15)  # a few hundred draws
    assert (diff != 0).all()
    # the noise is on the upload only: the client's private tensors are those of the clean run
    assert all(torch.equal(noisy_t.own[k], clean_t.own[k]) for k in clean_t.own)


def test_training_is_reproducible_and_state_round_trips():
    m = small_model()
    initial = m.shared_initial("fedpa", seed=4)
    groups = {"c": {"g": 1, "h": 0}}
    ups = []
    for _ in range(2):
        s = FedPA(initial, ["c"], client_groups=groups)
        t = trainer_for(m)
        ups.append(t.fit(s.configure_fit(3, "c"), 3))
    assert all(torch.equal(ups[0].tensors[k], ups[1].tensors[k]) for k in ups[0].tensors)
    metrics = t.evaluate(s.configure_evaluate("c"), 3)
    assert set(metrics) >= {"logloss", "auc", "n"} and t.best_round == 3
    tensors, meta = t.state()
    json.dumps(meta)
    fresh = trainer_for(m)
    fresh.load_state(tensors, meta)
    assert all(torch.equal(fresh.own[k], t.own[k]) for k in t.own)
    np.testing.assert_array_equal(fresh.test()["test"], t.test()["test"])


# ---- metrics -------------------------------------------------------------------------------------


def test_ctr_metrics_against_sklearn_and_hand():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500).astype(float)
    p = np.round(np.clip(0.3 * y + rng.random(500) * 0.7, 0, 1), 2)  # rounded: many ties
    p[:3] = [0.5, 0.0, 1.0]
    users = rng.integers(0, 20, 500)
    m = ctr_metrics(p, y, users)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["logloss"] == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)))
    pr, rc, f1, _ = precision_recall_fscore_support(y, np.round(p), average="weighted")
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((pr, rc, f1))
    per = [roc_auc_score(y[users == u], p[users == u]) for u in np.unique(users)
           if len(np.unique(y[users == u])) == 2]
    weights = [np.sum(users == u) for u in np.unique(users) if len(np.unique(y[users == u])) == 2]
    assert m["gauc"] == pytest.approx(np.mean(per)) and m["gauc_users"] == len(per)
    assert m["gauc_weighted"] == pytest.approx(np.average(per, weights=weights))
    # by hand: user 0 ranks its positive above 1 of 2 negatives, user 1 perfectly, user 2 has one class
    hand = per_user_auc(np.array([0.9, 0.95, 0.1, 0.8, 0.2, 0.5]), np.array([1, 0, 0, 1, 0, 1]),
                        np.array([0, 0, 0, 1, 1, 2]))
    assert hand["user"].tolist() == [0, 1] and hand["auc"].tolist() == [0.5, 1.0]
    one_class = ctr_metrics(np.array([0.2, 0.7]), np.array([1.0, 1.0]))
    assert np.isnan(one_class["auc"])


# ---- pre-training and end to end -----------------------------------------------------------------


def test_pretrain_checkpoint_round_trip(tmp_path):
    ds = movie_dataset(n_users=40)
    f = build_features(ds)
    users, items = ds.interactions["user"].to_numpy(), ds.interactions["item"].to_numpy()
    res = pretrain(f, users, items, np.arange(len(users)), epochs=3, hidden=(8, 4), seed=1)
    assert res.epoch >= 1 and len(res.history) == 3
    path = save_pretrained(tmp_path / "pre" / "model.safetensors", res.model, f, extra={"epoch": res.epoch})
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    model, meta = load_pretrained(path, f)
    assert meta["epoch"] == res.epoch
    uc, ic = torch.from_numpy(f.user_codes[users]), torch.from_numpy(f.item_codes[items])
    torch.testing.assert_close(model(uc, ic), res.model(uc, ic))
    f.vocab["age"] = [*f.vocab["age"], "extra"]
    with pytest.raises(ValueError, match="other features"):
        load_pretrained(path, f)


@pytest.mark.parametrize("algorithm", ["fedavg-adapter", "fedavg-full", "local", "frozen"])
def test_baselines_run_in_the_embedded_runtime(tmp_path, algorithm):
    from fellrec.runtime.embedded import embedded

    ds = movie_dataset(n_users=25)
    f = build_features(ds)
    sp = split_users(ds, select_public(ds, f, fraction=0.2))
    base = CTRModel(f.user_cards, f.item_cards, f.item_widths, hidden=(8, 4))
    fed = build_federation(ds, f, sp, base, algorithm=algorithm, gate_hidden=(4, 4), lr=0.05)
    rounds = 0 if algorithm == "frozen" else 2
    embedded(fed.strategy, fed.trainers, fed.trainers, rounds=rounds, client_fraction=1.0, eval_every=1,
                    seed=0, run_dir=tmp_path, progress=False).run()
    sel = pooled_selection(fed.trainers)
    assert sel["best_round"] in range(rounds + 1) and 0.0 <= sel["test"]["auc"] <= 1.0


@pytest.mark.slow
def test_end_to_end_ml100k(tmp_path):
    """Open_Train on the public users of ML-100K, then FedPA rounds over ALL private users."""
    from fellrec.data.registry import load_dataset
    from fellrec.runtime.embedded import embedded

    ds = load_dataset("ml-100k-recbole", None)
    f = build_features(ds)
    sp = split_users(ds, select_public(ds, f, fraction=0.2, seed=0))
    assert len(sp.private_users) == ds.num_users - round(0.2 * ds.num_users) and len(sp.dropped_users) == 0
    users, items = ds.interactions["user"].to_numpy(), ds.interactions["item"].to_numpy()
    res = pretrain(f, users, items, sp.public_rows, epochs=3, seed=0)
    save_pretrained(tmp_path / "foundation.safetensors", res.model, f)
    base, _ = load_pretrained(tmp_path / "foundation.safetensors", f)
    fed = build_federation(ds, f, sp, base, algorithm="fedpa", group_attributes=("gender", "age"), lr=0.1,
                           seed=0)
    assert len(fed.trainers) == len(sp.private_users)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runtime = embedded(fed.strategy, fed.trainers, fed.trainers, rounds=2, client_fraction=1.0, eval_every=1,
                              seed=0, run_dir=run_dir, progress=False)
    runtime.run()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and len(json.loads(lines[-1])["clients"]) == len(sp.private_users)
    up = json.loads(lines[-1])["bytes_up"]
    assert max(up.values()) < 20_000  # gate + output + 2 group adapters, never the model
    sel = pooled_selection(fed.trainers)
    assert sel["test"]["auc"] > 0.5 and sel["valid"]["auc"] > 0.5
    assert set(sel["rounds"]) == {1, 2}
