"""Split execution (flexible storage) on a tiny random Llama: the same loss and gradients as the
whole model, no trunk weights on the client, and every byte counted."""

import pytest
import torch
import torch.nn.functional as F

from fellrec.adapters import adapter_parameters, add_lora
from fellrec.backbones import text
from fellrec.config import LoraConfig
from fellrec.llm import tiny_random
from fellrec.storage.decoder import SplitDecoder
from fellrec.storage.parts import adapter_of, cut
from fellrec.storage.transport import InProcessTransport, Message, decode, encode
from fellrec.storage.trunk import TrunkServer

TEXTS = ["the matrix (1999)", "toy story (1995)", "heat (1995)", "alien (1979)", "fargo (1996)"] * 4


class Recording(InProcessTransport):
    def __init__(self, server):
        super().__init__(server)
        self.seen = []

    def send(self, message):
        self.seen.append((message.kind, sorted(message.tensors)))
        return super().send(message)


def setup(layers=6, seed=0):
    tok, base = tiny_random(TEXTS, seed=seed, layers=layers)
    model = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), seed=seed)
    with torch.no_grad():  # B starts at 0; make the adapters matter so their gradients are not trivial
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(n) % 1000))
    batch = text.tokenize(tok, TEXTS[:6], max_len=32)
    return model, batch


def lm_loss(states, head, batch):
    labels = batch["input_ids"][:, 1:]
    keep = batch["attention_mask"][:, 1:].bool()
    return F.cross_entropy(head(states[:, :-1][keep]), labels[keep])


def grads(params):
    return {n: p.grad.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize("k", [0, 2, 4])
def test_split_gives_the_same_loss_and_gradients(k):
    model, batch = setup()
    whole = lm_loss(text.hidden(model, batch), text.lm_head(model), batch)
    whole.backward()
    expected = grads(adapter_parameters(model))
    model.zero_grad(set_to_none=True)

    client, trunk = cut(model, k)
    server = TrunkServer(trunk)
    decoder = SplitDecoder(client, InProcessTransport(server), client="0")
    states = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    split = lm_loss(states, client.lm_head, batch)
    split.backward()
    assert split.item() == pytest.approx(whole.item(), abs=1e-5)
    got = grads(adapter_parameters(model))  # the client's and the trunk's parameters together
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name


@pytest.mark.parametrize("k", [0, 2])
def test_split_clips_the_whole_adapters_gradient_as_unsplit(k):
    """One SGD step with clipping active: the split model (client and trunk stepping apart, the trunk's
    squared norm in its backward reply, the factor in the step) ends where the whole model does."""
    from fellrec.storage.model import SplitLM
    from fellrec.trainer import WithTrunk

    clip, lr = 0.05, 0.5
    model, batch = setup()
    params = adapter_parameters(model)
    lm_loss(text.hidden(model, batch), text.lm_head(model), batch).backward()
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
    assert norm > 4 * clip  # the clip is active
    torch.optim.SGD(list(params.values()), lr=lr).step()
    expected = {n: p.detach().clone() for n, p in params.items()}

    model, batch = setup()
    start = {n: p.detach().clone() for n, p in adapter_parameters(model).items()}
    split = SplitLM(model, k)
    split.reset_trunk_optimizer(lambda ps: torch.optim.SGD(ps, lr=lr))
    optimizer = WithTrunk(torch.optim.SGD([p for p in split.parameters() if p.requires_grad], lr=lr), split, clip)
    lm_loss(text.hidden(split, batch), text.lm_head(split), batch).backward()
    optimizer.step()
    got = adapter_parameters(model)  # the parts share the whole model's tensors in this process
    assert set(split.trunk_names()) and set(split.adapter_parameters())  # both sides hold a part
    for name, want in expected.items():
        moved = (want - start[name]).abs().max()
        assert torch.allclose(got[name], want, atol=1e-4 * float(moved) + 1e-9), name


def test_client_part_holds_no_trunk_weights():
    model, _ = setup()
    client, trunk = cut(model, 2, tail=1)
    assert client.block_indices() == [0, 1, 5] and trunk.block_indices() == [2, 3, 4]
    client_ids = {id(p) for p in client.parameters()}
    assert not client_ids & {id(p) for p in trunk.parameters()}
    assert not any(name.startswith("blocks.") for name, _ in client.named_parameters())
    names = set(adapter_of(client)) | set(adapter_of(trunk))
    assert names == set(adapter_parameters(model))  # together: the whole adapter, same names


def test_only_activations_masks_and_gradients_travel_and_are_counted():
    model, batch = setup()
    client, trunk = cut(model, 2)
    transport = Recording(TrunkServer(trunk))
    decoder = SplitDecoder(client, transport, client="7")
    states = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    lm_loss(states, client.lm_head, batch).backward()
    assert transport.seen == [("forward", ["attention_mask", "hidden", "position_ids", "train"]),
                              ("backward", ["grad"])]  # never token ids, labels or the loss
    b, t = batch["input_ids"].shape
    h = 64  # hidden size of the tiny model
    floats = b * t * h * 4
    # up: hidden states + int64 mask and positions + the flag, then the gradient; down: states, gradient
    assert floats * 2 + 2 * b * t * 8 < transport.bytes_up < floats * 2 + 2 * b * t * 8 + 1000
    assert 2 * floats < transport.bytes_down < 2 * floats + 1000


def test_a_cut_must_leave_the_server_a_block():
    model, _ = setup(layers=4)
    with pytest.raises(ValueError, match="needs 0 <= k < 3, so that the server runs at least one"):
        cut(model, 3)


def test_message_round_trip():
    m = Message("forward", "client-3", 12, {"x": torch.arange(6.0).reshape(2, 3)})
    back = decode(encode(m))
    assert (back.kind, back.client, back.request) == ("forward", "client-3", 12)
    assert torch.equal(back.tensors["x"], m.tensors["x"])


def test_server_keeps_a_trunk_adapter_per_client():
    model, batch = setup()
    client, trunk = cut(model, 1)
    server = TrunkServer(trunk, make_optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    start = server.adapter("a")
    for cid, n in (("a", 2), ("b", 6)):
        decoder = SplitDecoder(client, InProcessTransport(server), client=cid)
        part = {k: v[:n] for k, v in batch.items()}
        states = decoder(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).last_hidden_state
        lm_loss(states, client.lm_head, part).backward()
        decoder.step()
    a, b = server.adapter("a"), server.adapter("b")
    assert any(not torch.equal(a[k], start[k]) for k in a)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # b trained from the initial adapter, not from a's
    assert not server.pending


def test_split_run_trains_like_the_whole_model(tmp_path, monkeypatch):
    """fellrec run with storage.k: same losses and metrics as the unsplit run (with a gradient clip that
    is active at every step: the split clips the whole adapter's gradient too), only the client's part
    travels."""
    import json

    from fellrec.config import load_config
    from fellrec.run import run

    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))
    sets = ["model.name_or_path=tiny-random", "partition.method=attribute", "partition.attribute=gender",
            "train.batch_size=4", "train.local_steps=2", "train.max_train_samples=32", "eval.max_valid_samples=8",
            "eval.max_test_samples=20", "train.rounds=2", "train.algorithm=fellrec", "train.grad_clip=0.05",
            "model.negatives=8"]
    whole = run(load_config(None, [*sets, "name=whole"]), tmp_path, progress=False)
    split = run(load_config(None, [*sets, "name=split", "storage.k=0"]), tmp_path, progress=False)
    lw, ls = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole, split))
    for a, b in zip(lw, ls, strict=True):
        for c in a["train"]:
            assert b["train"][c]["loss"] == pytest.approx(a["train"][c]["loss"], abs=1e-4)
            assert b["train"][c]["split_bytes_up"] > 0 and b["train"][c]["split_bytes_down"] > 0
            # the tiny model has 2 blocks with equal adapters; block 0 is the trunk: half stays on the server
            assert b["bytes_up"][c] == pytest.approx(a["bytes_up"][c] / 2, rel=0.05)
    rw, rs = (json.loads((d / "results.json").read_text()) for d in (whole, split))
    for m in ("recall@10", "ndcg@10"):
        assert rs["overall"][m] == pytest.approx(rw["overall"][m], abs=1e-6)


def test_split_generation_keeps_the_trunk_cache_on_the_server_and_matches_the_whole_model():
    from fellrec.storage.generate import beam_search, whole_model_step
    from fellrec.storage.model import SplitLM

    model, _ = setup()
    model.eval()
    tok, _ = tiny_random(TEXTS, seed=0, layers=6)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("toy story (1995) heat", "alien", "fargo (19")]
    batch = text.pad(prompts, tok.pad_token_id, left=True)
    whole = beam_search(whole_model_step(model), batch["input_ids"], batch["attention_mask"], num_beams=3,
                        max_new_tokens=6, eos_token_id=tok.eos_token_id)
    # the same search without any cache (the whole sequence re-run at every step) finds the same
    seq = {}

    def no_cache(ids, mask, pos, beam_idx):
        seq["ids"] = ids if beam_idx is None else torch.cat([seq["ids"][beam_idx], ids], dim=1)
        full = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=seq["ids"], attention_mask=mask, position_ids=full).logits[:, -1]

    assert beam_search(no_cache, batch["input_ids"], batch["attention_mask"], num_beams=3, max_new_tokens=6,
                       eos_token_id=tok.eos_token_id) == whole
    assert any(len(w) > 1 for w in whole)

    split = SplitLM(model, k=2)
    transport = Recording(split.server)
    split.transport = transport
    out = split.generate(batch["input_ids"], batch["attention_mask"], num_beams=3, max_new_tokens=6,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    new = [[t for t in row[batch["input_ids"].shape[1]:].tolist() if t != tok.pad_token_id] for row in out]
    assert new == [[t for t in w if t != tok.pad_token_id] for w in whole]
    kinds = [k for k, _ in transport.seen]
    assert kinds[0] == "decode" and kinds[-1] == "release" and "reorder" in kinds
    assert all(keys == ["attention_mask", "hidden", "position_ids", "session"] for k, keys in transport.seen
               if k == "decode")
    assert not split.server.sessions  # released


def test_split_bigrec_run_generates_and_grounds(tmp_path, monkeypatch):
    import json

    from fellrec.config import load_config
    from fellrec.run import run

    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, ["model.name_or_path=tiny-random", "partition.method=attribute",
                             "partition.attribute=gender", "model.backbone=bigrec", "model.num_beams=2",
                             "model.max_new_tokens=6", "train.batch_size=4", "train.local_steps=1",
                             "train.max_train_samples=16", "eval.max_valid_samples=4", "eval.max_test_samples=6",
                             "train.rounds=1", "train.algorithm=fellrec", "storage.k=0", "name=b"])
    out = run(cfg, tmp_path, progress=False)
    r = json.loads((out / "results.json").read_text())
    assert r["samples"]["test"] == 6 and all(0 <= v["recall@20"] <= 1 for v in r["clients"].values())


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_split_item_token_run_trains_like_the_whole_model(tmp_path, monkeypatch, algorithm):
    """The item-token backbone split at k = 0 (LoRA on both blocks of the tiny model, the items enter at
    the input, on the client; block 0 is the trunk): the same losses and metrics as unsplit, and the
    trunk's LoRA does not travel. FedProx: the trunk's proximal term is the server's, its value part
    of the client's loss."""
    import json

    from fellrec.config import load_config
    from fellrec.run import run

    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))
    sets = ["model.name_or_path=tiny-random", "model.backbone=item-tokens", "partition.method=attribute",
            "partition.attribute=gender", "split.method=leave-one-out", "split.history_len=6",
            "split.train_stride=6", "train.batch_size=8", "train.local_steps=2", "eval.max_valid_samples=8",
            "eval.max_test_samples=30", "train.rounds=2", f"train.algorithm={algorithm}", "train.grad_clip=0.05",
            "train.lr=0.01", "train.local_steps=3", "train.prox_mu=1.0"]
    whole = run(load_config(None, [*sets, "name=whole"]), tmp_path, progress=False)
    split = run(load_config(None, [*sets, "name=split", "storage.k=0"]), tmp_path, progress=False)
    lw, ls = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (whole, split))
    for a, b in zip(lw, ls, strict=True):
        for c in a["train"]:
            assert b["train"][c]["loss"] == pytest.approx(a["train"][c]["loss"], abs=1e-4)
            assert b["train"][c]["split_bytes_up"] > 0
            assert b["bytes_up"][c] < a["bytes_up"][c]  # the trunk's LoRA stays on the server
    rw, rs = (json.loads((d / "results.json").read_text()) for d in (whole, split))
    for m in ("recall@10", "ndcg@10"):
        assert rs["overall"][m] == pytest.approx(rw["overall"][m], abs=1e-6)
