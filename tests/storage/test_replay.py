"""Split execution by replay (``fellrec.storage.replay``), the client's half alone
(``ClientSplitLM``) and a trunk server whose clients interleave (``ConcurrentTrunkServer``): what the
Flower runtime's split mode is built from, checked here without Flower."""


import pytest
import torch
import torch.nn.functional as F

from fellrec.adapters import add_lora, get_adapter
from fellrec.backbones import text
from fellrec.config import LoraConfig
from fellrec.llm import tiny_random
from fellrec.storage.decoder import SplitDecoder
from fellrec.storage.model import SplitLM
from fellrec.storage.parts import adapter_of, cut, load_adapter
from fellrec.storage.replay import NeedReplies, ReplayDiverged, ReplayTransport
from fellrec.storage.transport import InProcessTransport, Message, decode, encode
from fellrec.storage.trunk import ConcurrentTrunkServer, TrunkServer

TEXTS = ["the matrix (1999)", "toy story (1995)", "heat (1995)", "alien (1979)", "fargo (1996)"] * 4


def lora_model(layers=6):
    tok, base = tiny_random(TEXTS, seed=0, layers=layers)
    model = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), seed=0)
    with torch.no_grad():  # B starts at 0: make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return tok, model


def lm_loss(states, head, batch):
    labels = batch["input_ids"][:, 1:]
    keep = batch["attention_mask"][:, 1:].bool()
    return F.cross_entropy(head(states[:, :-1][keep]), labels[keep])


def batches(tok):
    return [text.tokenize(tok, TEXTS[i:i + 3], max_len=32) for i in (0, 3, 6)]


def train(client, decoder, data, step_trunk):
    """Three SGD steps of the client's part (the trunk's through ``step_trunk``); the losses."""
    params = [p for p in client.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    losses = []
    for batch in data:
        states = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        loss = lm_loss(states, client.lm_head, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_trunk()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("k", [0, 2])
def test_replayed_passes_train_as_the_in_process_split(k):
    """The client re-runs its whole work from the start with the replies it has, each pass sending the
    requests it could not get past, until a pass needs no placeholder: same losses and adapters."""
    tok, model = lora_model()
    data = batches(tok)
    client, trunk = cut(model, k)
    start, trunk_start = adapter_of(client), adapter_of(trunk)
    server = TrunkServer(trunk, make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
    decoder = SplitDecoder(client, InProcessTransport(server), client="a")
    expected = train(client, decoder, data, decoder.step)
    expected_client, expected_trunk = adapter_of(client), server.adapter("a")

    load_adapter(trunk, trunk_start)  # the TrunkServer trained the trunk's own weights
    server = ConcurrentTrunkServer(trunk, make_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.5))
    replies, passes, sizes = {}, 0, []
    while True:
        passes += 1
        transport = ReplayTransport(replies)
        decoder = SplitDecoder(client, transport, client="a")
        load_adapter(client, start)  # the pass starts from the start: no checkpoint here
        try:
            losses = train(client, decoder, data, decoder.step)
        except NeedReplies:
            losses = None
        if losses is not None and transport.placeholders == 0 and not transport.pending:
            break
        sizes.append(len(transport.pending))
        for m in transport.pending:  # what the server does with a client's message
            replies[(m.kind, m.request)] = decode(encode(server.handle(decode(encode(m)))))
    assert losses == pytest.approx(expected, abs=1e-6)
    for name, value in adapter_of(client).items():
        torch.testing.assert_close(value, expected_client[name], atol=1e-6, rtol=1e-5)
    for name, value in server.adapter("a").items():
        torch.testing.assert_close(value, expected_trunk[name], atol=1e-6, rtol=1e-5)
    # k > 0: a step's forward, then its backward and step (2 exchanges a step); k = 0: nothing
    # trainable before the cut, so a step's backward and step go with the next step's forward
    assert passes == (7 if k else 5)
    if k == 0:
        assert max(sizes) == 3  # backward, step, next forward in one message


def test_clients_interleaved_on_a_concurrent_trunk_server_train_as_one_after_the_other():
    tok, model = lora_model()
    data = batches(tok)
    client, trunk = cut(model, 2)
    start, trunk_start = adapter_of(client), adapter_of(trunk)
    make = lambda ps: torch.optim.SGD(ps, lr=0.5)  # noqa: E731

    expected = {}
    server = TrunkServer(trunk, make_optimizer=make)
    for c, batch in (("a", data[0]), ("b", data[1])):
        load_adapter(client, start)
        decoder = SplitDecoder(client, InProcessTransport(server), client=c)
        states = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        lm_loss(states, client.lm_head, batch).backward()
        decoder.step()
        expected[c] = server.adapter(c)
        client.zero_grad(set_to_none=True)

    load_adapter(trunk, trunk_start)
    server = ConcurrentTrunkServer(trunk, make_optimizer=make)
    load_adapter(client, start)
    losses = {}
    for c, batch in (("a", data[0]), ("b", data[1])):  # both forwards before either backward
        decoder = SplitDecoder(client, InProcessTransport(server), client=c)
        decoder.restart(10 if c == "b" else 0)
        states = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        losses[c] = (lm_loss(states, client.lm_head, batch), decoder)
    assert len(server.pending) == 2
    for c in ("b", "a"):
        losses[c][0].backward()
        losses[c][1].step()
    for c in ("a", "b"):
        for name, value in server.adapter(c).items():
            torch.testing.assert_close(value, expected[c][name], atol=1e-6, rtol=1e-5)


def test_a_client_half_holds_no_trunk_and_gives_the_whole_models_states_with_and_without_adapter():
    tok, model = lora_model()
    batch = text.tokenize(tok, TEXTS[:4], max_len=32)
    with torch.no_grad():
        whole = text.hidden(model, batch)
        with model.disable_adapter():
            base = text.hidden(model, batch)
    split = SplitLM(model, k=2)
    server = ConcurrentTrunkServer(split.server.trunk)
    trunk_ids = {id(p) for p in split.server.trunk.parameters()}
    half = split.client_half(InProcessTransport(server))
    half.use_client("a")
    assert not trunk_ids & {id(p) for p in half.parameters()}
    assert not any(".layers.2." in n or ".layers.4." in n for n in get_adapter(half))
    assert half.trunk_names() == [] and half.trunk_adapter() == {}
    with torch.no_grad():
        torch.testing.assert_close(text.hidden(half, batch), whole, atol=1e-5, rtol=1e-5)
        with half.disable_adapter():  # the request says adapter = 0: the server runs its trunk without
            torch.testing.assert_close(text.hidden(half, batch), base, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text.hidden(half, batch), whole, atol=1e-5, rtol=1e-5)  # on again


def test_a_request_that_comes_back_changed_is_refused():
    h = torch.ones(2, 3, 4)
    forward = Message("forward", "a", 0, {"hidden": h, "train": torch.tensor(0)})
    first = ReplayTransport()
    with pytest.raises(NeedReplies):
        first.send(Message("decode", "a", 1, {"hidden": h}))  # a decode's reply steers: never a placeholder
    assert [m.kind for m in first.pending] == ["decode"]
    t = ReplayTransport()
    assert torch.equal(t.send(forward).tensors["hidden"], torch.zeros_like(h))  # no graph: a 0 placeholder
    from fellrec.storage.replay import fingerprint

    known = {("forward", 0): Message("forward", "a", 0, {"hidden": h})}
    ok = ReplayTransport(known, sent={("forward", 0): fingerprint(forward)})
    assert torch.equal(ok.send(forward).tensors["hidden"], h) and ok.clean
    changed = Message("forward", "a", 0, {"hidden": h * 1.01, "train": torch.tensor(0)})
    with pytest.raises(ReplayDiverged, match="forward request 0 of client 'a' differs"):
        ReplayTransport(known, sent={("forward", 0): fingerprint(forward)}).send(changed)


def test_a_stopped_pass_sends_nothing_more():
    t = ReplayTransport()
    with pytest.raises(NeedReplies):
        t.send(Message("decode", "a", 0, {"hidden": torch.ones(1, 1, 2)}))
    with pytest.raises(NeedReplies):  # e.g. the release in a finally: not the work's next request
        t.send(Message("release", "a", 1, {"session": torch.tensor(0)}))
    assert [m.request for m in t.pending] == [0]


def test_a_request_after_a_nan_placeholder_stops_the_pass():
    t = ReplayTransport()
    h = torch.ones(1, 2, 3)
    out = t.send(Message("forward", "a", 0, {"hidden": h, "train": torch.tensor(1)}))
    assert out.tensors["hidden"].isnan().all()  # in training: NaN marks what depends on it
    t.send(Message("forward", "a", 1, {"hidden": h, "train": torch.tensor(1)}))  # independent: queued too
    with pytest.raises(NeedReplies):
        t.send(Message("backward", "a", 0, {"grad": out.tensors["hidden"]}))
    assert [(m.kind, m.request) for m in t.pending] == [("forward", 0), ("forward", 1)]
