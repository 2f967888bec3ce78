"""The item-token backbone on tiny random Llamas: its scores against a direct computation through the
model's own forward pass, its loss, the cache of the frozen blocks, the adapter round trip, split
equal to unsplit, and the config errors."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fellrec.adapters import adapter_parameters, add_lora, get_adapter, set_adapter
from fellrec.backbones.item_tokens import ItemTokenRec
from fellrec.backbones.prompts import Prompt
from fellrec.config import LoraConfig, load_config
from fellrec.errors import ConfigError
from fellrec.holdout import Samples
from fellrec.llm import tiny_random
from fellrec.storage.model import SplitLM

TITLES = ["Alpha (1990)", "Beta (1991)", "Gamma Rays (1992)", "Delta Force (1993)", "Epsilon (1994)",
          "Zeta, The (1995)", "Eta Carinae (1996)", "Theta Waves (1997)", "Iota", "Kappa Kappa (2001)"]
PROMPT = Prompt.for_dataset("ml-100k")
HISTORIES = [[0, 1, 2], [3], [4, 5, 6, 7, 8], [9, 0]]
TARGETS = [[3], [4], [9], [1]]


def samples(histories=HISTORIES, targets=TARGETS):
    return Samples(np.arange(len(histories)), [np.asarray(h) for h in histories], [np.asarray(t) for t in targets])


def build(layers=2, last_blocks=None, item_dim=4, k=None, loss_positions="all", cache_mb=64.0, seed=0):
    tok, base = tiny_random([*TITLES, PROMPT.sequence_prefix()], seed=seed, layers=layers)
    model = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      last_blocks=last_blocks), seed=seed)
    nudge(dict(model.named_parameters()))  # every trainable tensor off its start, so that each one matters
    if k is not None:
        model = SplitLM(model, k)
    rec = ItemTokenRec(model, tok, TITLES, PROMPT, item_dim=item_dim, loss_positions=loss_positions,
                       cache_mb=cache_mb, seed=seed)
    nudge({f"items.{n}": p for n, p in rec.head.named_parameters()})
    return tok, model, rec


def nudge(params):
    with torch.no_grad():
        for name in sorted(params):
            if params[name].requires_grad:
                g = torch.Generator().manual_seed(sum(map(ord, name)))
                params[name].add_(torch.randn(params[name].shape, generator=g) * 0.1)


def direct_states(tok, model, rec, batch):
    """The last hidden states computed by the HF model's own forward pass: inputs_embeds of the
    prompt and the items' title vectors, the items' trainable input part added at block c by a
    forward pre-hook on that block."""
    inner = model.get_base_model()
    head = rec.head
    prefix = inner.model.embed_tokens(torch.tensor(prefix_ids(tok)))
    P = prefix.shape[0]
    out = []
    for h in batch.history:
        items = torch.as_tensor(np.asarray(h))
        ids = [tok(TITLES[i], add_special_tokens=False)["input_ids"] for i in h]
        e = torch.stack([inner.model.embed_tokens(torch.tensor(t)).mean(0) for t in ids])
        x = torch.cat([prefix, e]).unsqueeze(0)
        add = e @ head.w_in.T + head.x[items] @ head.u_in.T

        def hook(_module, args, kwargs, add=add):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = hidden.clone()
            hidden[0, P:] += add
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        handle = inner.model.layers[rec.cut].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            states = inner.model(inputs_embeds=x, attention_mask=torch.ones(1, x.shape[1], dtype=torch.long),
                                 use_cache=False).last_hidden_state
        finally:
            handle.remove()
        out.append(states[0, P:])
    return out, e_table(tok, inner)


def prefix_ids(tok):
    return tok(PROMPT.sequence_prefix(), add_special_tokens=False)["input_ids"]


def e_table(tok, inner):
    ids = tok(TITLES, add_special_tokens=False)["input_ids"]
    return torch.stack([inner.model.embed_tokens(torch.tensor(t)).mean(0) for t in ids])


def direct_scores(rec, u, e):
    v = F.normalize(e, dim=-1) @ rec.head.w_out.T + rec.head.y @ rec.head.u_out.T
    return u @ v.T / math.sqrt(e.shape[1]) + rec.head.bias


@pytest.mark.parametrize("layers, last_blocks", [(2, None), (3, 2), (3, 1)])
def test_scores_equal_a_direct_computation(layers, last_blocks):
    tok, model, rec = build(layers=layers, last_blocks=last_blocks)
    assert rec.cut == (0 if last_blocks is None else layers - last_blocks)
    batch = samples()
    got = rec.rank(batch)
    with torch.no_grad():
        states, e = direct_states(tok, model, rec, batch)
        want = torch.stack([direct_scores(rec, s[-1], e) for s in states])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got.shape == (len(HISTORIES), len(TITLES))


@pytest.mark.parametrize("positions", ["all", "last"])
def test_loss_is_the_softmax_cross_entropy_over_the_catalogue(positions):
    tok, model, rec = build(layers=3, last_blocks=2, loss_positions=positions)
    batch = samples()
    got = rec.loss(batch)
    with torch.no_grad():
        states, e = direct_states(tok, model, rec, batch)
    logits, labels = [], []
    for s, h, t in zip(states, HISTORIES, TARGETS, strict=True):
        nxt = [*h[1:], t[0]]
        keep = range(len(h)) if positions == "all" else [len(h) - 1]
        logits += [direct_scores(rec, s[j], e) for j in keep]
        labels += [nxt[j] for j in keep]
    want = F.cross_entropy(torch.stack(logits), torch.tensor(labels))
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_the_frozen_blocks_are_cached_and_give_the_same_numbers():
    _, model, rec = build(layers=3, last_blocks=1)
    batch = samples()
    first = rec.loss(batch)
    assert len(rec.cache) == len(HISTORIES) and rec.cache.used > 0
    second = rec.loss(batch)  # from the cache
    assert second.item() == pytest.approx(first.item(), rel=1e-6)
    _, _, none = build(layers=3, last_blocks=1, cache_mb=0)
    assert none.loss(batch).item() == pytest.approx(first.item(), rel=1e-6) and not none.cache
    # the gradient reaches the trainable parts through the cached states
    second.backward()
    params = adapter_parameters(model)
    assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in params if "lora_B" in n)
    assert params["items.w_in"].grad.abs().sum() > 0 and params["items.x"].grad.abs().sum() > 0


def test_the_item_part_is_part_of_the_adapter_and_round_trips():
    _, model, rec = build(layers=2)
    names = set(adapter_parameters(model))
    assert {"items.w_in", "items.w_out", "items.x", "items.y", "items.u_in", "items.u_out", "items.bias"} <= names
    assert any("lora_A" in n for n in names)
    saved = get_adapter(model)
    before = rec.rank(samples())
    set_adapter(model, {k: torch.zeros_like(v) for k, v in saved.items()})
    assert not torch.equal(rec.rank(samples()), before)
    set_adapter(model, saved)
    assert torch.equal(rec.rank(samples()), before)
    assert set(rec.private_names()) == {"items.x", "items.y", "items.bias"}


def test_no_item_vectors_and_the_first_state():
    """item_dim 0: no per-item vectors; untrained, the scores are the base model's states against the titles."""
    tok, base = tiny_random([*TITLES, PROMPT.sequence_prefix()], seed=0)
    model = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    rec = ItemTokenRec(model, tok, TITLES, PROMPT, item_dim=0)
    assert not any(n.startswith(("items.x", "items.y", "items.u_")) for n in adapter_parameters(model))
    with torch.no_grad():
        states, e = direct_states_plain(tok, model, samples())
    want = torch.stack([s[-1] @ F.normalize(e, dim=-1).T / math.sqrt(e.shape[1]) for s in states])
    torch.testing.assert_close(rec.rank(samples()), want, rtol=1e-4, atol=1e-5)


def direct_states_plain(tok, model, batch):
    inner = model.get_base_model()
    prefix = inner.model.embed_tokens(torch.tensor(prefix_ids(tok)))
    e = e_table(tok, inner)
    out = []
    for h in batch.history:
        x = torch.cat([prefix, e[torch.as_tensor(np.asarray(h))]]).unsqueeze(0)
        out.append(inner.model(inputs_embeds=x, use_cache=False).last_hidden_state[0, prefix.shape[0]:])
    return out, e


@pytest.mark.parametrize("layers, last_blocks, k", [(2, None, 0), (4, 3, 2), (4, None, 1)])
def test_split_gives_the_same_loss_and_gradients(layers, last_blocks, k):
    _, whole_model, whole = build(layers=layers, last_blocks=last_blocks)
    loss = whole.loss(samples())
    loss.backward()
    expected = {n: p.grad.clone() for n, p in adapter_parameters(whole_model).items()}

    _, split_model, split = build(layers=layers, last_blocks=last_blocks, k=k)
    assert split.cut == whole.cut
    got_loss = split.loss(samples())
    got_loss.backward()
    assert got_loss.item() == pytest.approx(loss.item(), abs=1e-5)
    got = {n: p.grad for n, p in adapter_parameters(split_model).items()}
    trunk = split_model.server.trunk
    got.update({n: p.grad for n, p in zip(split_model.trunk_names(), (p for p in trunk.parameters() if p.requires_grad),
                                          strict=True)})
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(split.rank(samples()), whole.rank(samples()), rtol=1e-4, atol=1e-5)


def test_items_must_enter_on_the_client_in_split_mode():
    with pytest.raises(ValueError, match="first adapted block is 3, above the cut k=1"):
        build(layers=4, last_blocks=1, k=1)


def test_config_errors(tmp_path):
    from fellrec.run import run

    base = ["model.name_or_path=tiny-random", "model.backbone=item-tokens", "partition.method=attribute",
            "partition.attribute=gender", "train.rounds=1", "train.local_steps=1", "eval.max_test_samples=5"]
    for setting, message in [
        ("model.lora.last_blocks=5", "model.lora.last_blocks: 5 asked for, the model has 2 blocks"),
        ("model.blocks=9", "model.blocks: 9 asked for, the model has 2 blocks"),
        ("model.lora.targets=[q_proj,w_proj]", "model.lora.targets: the model has no linear layer named w_proj"),
    ]:
        with pytest.raises(ConfigError, match=message):
            run(load_config(None, [*base, setting, "name=x"]), tmp_path, progress=False)
        assert not (tmp_path / "x").exists()
    for setting, message in [
        ("model.item_dim=-1", "model.item_dim: must be 0"),
        ("model.backbone=items", "model.backbone: 'items' is not one of item-tokens"),
        ("split.train_stride=0", "split.train_stride: must be at least 1"),
        ("model.item_vectors=secret", "model.item_vectors: 'secret' is not one of shared, private"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*base, setting])
    with pytest.raises(ConfigError, match=r"storage\.k: the first adapted block is 1, above the cut k=0"):
        run(load_config(None, [*base, "model.lora.last_blocks=1", "storage.k=0", "name=y"]), tmp_path, progress=False)


def test_the_frozen_states_are_kept_on_disk_for_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path))
    tok, base = tiny_random([*TITLES, PROMPT.sequence_prefix()], seed=0, layers=3)
    first_model = add_lora(copy.deepcopy(base), LoraConfig(r=4, dropout=0.0, last_blocks=1), seed=0)
    first = ItemTokenRec(first_model, tok, TITLES, PROMPT, cache_key="tiny:0")
    expected = first.rank(samples())
    first.save_cache()
    assert len(list((tmp_path / "states").iterdir())) == 1
    second = ItemTokenRec(add_lora(base, LoraConfig(r=4, dropout=0.0, last_blocks=1), seed=0), tok, TITLES, PROMPT,
                          cache_key="tiny:0")
    assert len(second.cache._stored) == len(HISTORIES)
    torch.testing.assert_close(second.rank(samples()), expected)
    assert second.cache.new == 0  # every row came from the file
    other = ItemTokenRec(add_lora(copy.deepcopy(base), LoraConfig(r=4, dropout=0.0, last_blocks=2), seed=0), tok,
                         TITLES, PROMPT, cache_key="tiny:0")
    assert not other.cache._stored  # another cut: other states, another file


RUN = ["model.name_or_path=tiny-random", "model.backbone=item-tokens", "partition.method=attribute",
       "partition.attribute=gender", "split.method=leave-one-out", "split.history_len=6", "split.train_stride=6",
       "train.batch_size=8", "train.local_steps=3", "train.rounds=2", "train.lr=0.01", "eval.max_valid_samples=20",
       "eval.max_test_samples=60", "model.lora.last_blocks=1"]


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("algorithm", ["fedavg", "fellrec", "local", "centralized"])
def test_every_algorithm_runs_the_item_token_backbone(tmp_path, private_cache, algorithm):
    import json

    from safetensors.torch import load_file

    from fellrec.run import run

    out = run(load_config(None, [*RUN, f"train.algorithm={algorithm}", "name=x"]), tmp_path, progress=False)
    res = json.loads((out / "results.json").read_text())
    assert res["backbone"] == "item-tokens" and res["samples"]["test"] == 60
    low, high = res["intervals"]["overall"]["recall@10"]
    assert low <= res["overall"]["recall@10"] <= high
    rows = (out / "test_users.csv").read_text().splitlines()
    assert len(rows) == 61 and rows[0].startswith("user,client,")
    adapter = load_file(out / "adapters" / "client-0.safetensors")
    assert "items.bias" in adapter and any("lora_A" in k for k in adapter)
    assert (tmp_path / "cache" / "states").is_dir()  # the frozen block's states, kept for the next run


def test_private_item_vectors_never_leave_the_clients(tmp_path, private_cache):
    import json

    from safetensors.torch import load_file

    from fellrec.run import run

    shared = run(load_config(None, [*RUN, "name=shared"]), tmp_path, progress=False)
    kept = run(load_config(None, [*RUN, "name=kept", "model.item_vectors=private"]), tmp_path, progress=False)
    glob = load_file(kept / "adapters" / "global.safetensors")
    assert "items.w_in" in glob and not any(k in glob for k in ("items.x", "items.y", "items.bias"))
    a, b = (json.loads((d / "results.json").read_text())["communication"]["bytes_up"] for d in (shared, kept))
    assert b < a
    # each client's own per-item tensors differ (they were trained apart); the shared ones are the global ones
    c0, c1 = (load_file(kept / "adapters" / f"client-{c}.safetensors") for c in (0, 1))
    assert not torch.equal(c0["items.bias"], c1["items.bias"])


def test_a_killed_item_token_run_resumes_to_the_same_results(tmp_path, private_cache):
    from fellrec.cli import main
    from test_run import killed_run, same_results

    args = [a for s in [*RUN, "train.algorithm=fellrec", "model.lora.dropout=0.3", "name=x"] for a in ("--set", s)]
    assert main(["run", "--quiet", "--runs-dir", str(tmp_path / "a"), *args]) == 0
    killed_run(tmp_path / "b", args, "fellrec/trainer.py:AdapterTrainer.fit", 3)  # round 2, first client
    assert main(["run", "--quiet", "--resume", str(tmp_path / "b" / "x")]) == 0
    same_results(tmp_path / "a" / "x", tmp_path / "b" / "x")
