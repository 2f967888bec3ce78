"""Split execution (flexible storage) on a tiny random Llama: the same loss and gradients as the
whole model, no trunk weights on the client, and every byte counted."""

import pytest
import torch
import torch.nn.functional as F

from fellrec.adapters import adapter_parameters, add_lora
from fellrec.backbones import text
from fellrec.config import LoraConfig
from fellrec.llm import tiny_random
from fellrec.storage.client import SplitDecoder
from fellrec.storage.parts import adapter_of, cut
from fellrec.storage.server import TrunkServer
from fellrec.storage.transport import InProcessTransport, Message, decode, encode

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


@pytest.mark.parametrize("k", [0, 2, 5])
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
    """fellrec run with storage.k: same losses and metrics as the unsplit run (gradient clipping off:
    the split clips the client's and the trunk's gradients apart), only the client's part travels."""
    import json

    from fellrec.config import load_config
    from fellrec.run import run

    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))
    sets = ["model.name_or_path=tiny-random", "partition.method=attribute", "partition.attribute=gender",
            "train.batch_size=4", "train.local_steps=2", "train.max_train_samples=32", "eval.max_valid_samples=8",
            "eval.max_test_samples=20", "train.rounds=2", "train.algorithm=fellrec", "train.grad_clip=0",
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
