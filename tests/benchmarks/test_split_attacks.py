"""Inversion attacks on what the server sees in split mode, on a tiny random Llama: the candidate pass
and the views agree with the model's own forward pass, the white-box search reads the history back
when it knows the weights, the score counts history tokens only, and the learned attack never trains
on a victim's titles."""

import sys
from pathlib import Path

import pytest
import torch

from fellrec.adapters import add_lora
from fellrec.backbones.prompts import Prompt
from fellrec.config import LoraConfig
from fellrec.llm import tiny_random

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # research code, not the library
import split_attacks as A

TITLES = ["Toy Story (1995)", "Heat (1995)", "Alien (1979)", "Fargo (1996)", "Cable Guy, The (1996)",
          "Space Jam (1996)", "Casablanca (1942)", "Vertigo (1958)", "Babe (1995)", "Jaws (1975)",
          "Twister (1996)", "Heat (1995)", "Sabrina (1995)", "Clueless (1995)"]  # "Heat" twice, as in real catalogues
PROMPT = Prompt.for_dataset("ml-100k")
LAYERS = 4


TEXTS = [PROMPT.instruction(TITLES), *TITLES]


@pytest.fixture(scope="module")
def tiny():
    tok, base = tiny_random(TEXTS, seed=3, layers=LAYERS)  # the attacker's copy of the public base model
    return tok, base


def with_adapter(b_std):
    """The client's model: the same base weights with a LoRA adapter whose B is drawn with ``b_std``."""
    _, client_base = tiny_random(TEXTS, seed=3, layers=LAYERS)
    model = add_lora(client_base, LoraConfig(r=4, alpha=8, dropout=0.0), seed=1)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
    return model


def ids_of(tok, v):
    return torch.tensor([v.ids]), torch.ones((1, len(v.ids)), dtype=torch.long)


def test_views_and_candidate_pass_match_the_models_own_forward(tiny):
    tok, base = tiny
    v = A.victim(tok, PROMPT, TITLES, [0, 3, 5])
    ids, mask = ids_of(tok, v)
    reference = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    got = A.block_inputs(base, ids, mask, range(LAYERS))
    for layer in range(LAYERS):  # hidden_states[j] is the input of block j for j < L
        assert torch.allclose(got[layer][0], reference[layer][0], atol=1e-5), layer
    # candidates at position p after the true prefix: as if each were the token there
    p = v.end() - 3
    cands = torch.tensor([v.ids[p], 7, 42, 101])
    cache = A.DynamicCache(config=base.config)
    A._feed(base, cache, LAYERS - 1, v.ids[:p], 0)
    states = A.candidate_states(base, cache, p, cands, range(LAYERS))
    for c, token in enumerate(cands.tolist()):
        row = torch.tensor([[*v.ids[:p], token]])
        ref = base(input_ids=row, output_hidden_states=True).hidden_states
        for layer in range(LAYERS):
            assert torch.allclose(states[layer][c], ref[layer][0, p], atol=1e-5), (token, layer)


def test_server_view_is_the_cut_and_the_trunk_output_with_the_clients_adapter(tiny):
    tok, base = tiny
    model = with_adapter(0.3)
    v = A.victim(tok, PROMPT, TITLES, [1, 2])
    ids, mask = ids_of(tok, v)
    at_cut, trunk_out = A.server_view(model, ids, mask, k=1)
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.allclose(at_cut, ref[1], atol=1e-5) and torch.allclose(trunk_out, ref[LAYERS - 1], atol=1e-5)
    plain = A.block_inputs(base, ids, mask, [1])[1]
    assert not torch.allclose(at_cut, plain, atol=1e-3)  # the adapter changes what the server sees


def test_owner_marks_exactly_the_tokens_inside_history_titles(tiny):
    tok, _ = tiny
    v = A.victim(tok, PROMPT, TITLES, [4, 6])
    # this tokenizer glues the closing quote (and comma) to a title's last token, not the opening one
    for j, spelled in enumerate(['Cable Guy, The (1996)",', 'Casablanca (1942)"']):
        assert tok.decode([t for t, o in zip(v.ids, v.owner, strict=True) if o == j]) == spelled
    template = tok.decode([t for t, o in zip(v.ids, v.owner, strict=True) if o < 0])
    assert "Cable" not in template and "Casablanca" not in template and "### Response:" in template
    assert v.ids[:len(A.known_prefix(tok, PROMPT))] == A.known_prefix(tok, PROMPT)
    assert v.end(1) < v.end() and v.owner[v.end() - 1] == 1 and all(o < 0 for o in v.owner[v.end():])


def test_recovery_counts_only_history_tokens():
    true = [10, 11, 12, 13, 14, 15, 16, 17]
    owner = [-1, 0, 0, -1, 1, 1, 1, -1]
    guess = [99, 11, 12, 99, 14, 98, 16, 99]  # template all wrong, title 0 right, title 1 one token wrong
    r = A.recovery(true, guess, owner)
    assert (r.tokens_right, r.tokens, r.titles_right, r.titles) == (4, 5, 1, 2)
    assert r.token_share == 0.8 and r.title_share == 0.5
    short = A.recovery(true, guess[:5], owner)  # a missing guess is wrong
    assert (short.tokens_right, short.titles_right) == (3, 1)
    total = r + short
    assert (total.tokens, total.titles) == (10, 4)


def test_whitebox_at_the_embeddings_is_a_lookup(tiny):
    tok, base = tiny
    model = with_adapter(0.0)
    cands = A.catalogue_candidates(tok, PROMPT, TITLES)
    known = A.known_prefix(tok, PROMPT)
    v = A.victim(tok, PROMPT, TITLES, [0, 7, 9, 13])
    ids, mask = ids_of(tok, v)
    observed = A.server_view(model, ids, mask, k=0)[0][0]
    got = A.whitebox(base, {0: observed}, known=known, end=v.end(), candidates=cands)[0]
    # independently: the nearest row of the embedding matrix, among the candidates
    emb = base.get_input_embeddings().weight
    nearest = cands[torch.cdist(observed[len(known):v.end()], emb[cands]).argmin(1)].tolist()
    assert got == nearest == v.ids[len(known):v.end()]
    r = A.recovery(v.ids[:v.end()], [*known, *got], v.owner[:v.end()])
    assert r.token_share == 1.0 and r.title_share == 1.0


def test_whitebox_reads_every_layer_back_when_the_adapter_is_fresh(tiny):
    tok, base = tiny
    model = with_adapter(0.0)  # B = 0: the client's states are the base model's
    cands = A.catalogue_candidates(tok, PROMPT, TITLES)
    known = A.known_prefix(tok, PROMPT)
    v = A.victim(tok, PROMPT, TITLES, [2, 4, 10])
    ids, mask = ids_of(tok, v)
    view = A.block_inputs(model, ids, mask, [1, 2, 3])
    got = A.whitebox(base, {k: s[0] for k, s in view.items()}, known=known, end=v.end(), candidates=cands, chunk=16)
    for layer in (1, 2, 3):
        assert got[layer] == v.ids[len(known):v.end()], layer


def test_whitebox_attacks_layers_together_as_it_would_apart(tiny):
    tok, base = tiny
    model = with_adapter(2.0)  # a large unknown adapter: the layers' guesses part ways
    cands = A.catalogue_candidates(tok, PROMPT, TITLES)
    known = A.known_prefix(tok, PROMPT)
    v = A.victim(tok, PROMPT, TITLES, [1, 5, 8])
    ids, mask = ids_of(tok, v)
    view = {k: s[0] for k, s in A.block_inputs(model, ids, mask, [1, 2, 3]).items()}
    together = A.whitebox(base, view, known=known, end=v.end(), candidates=cands, chunk=32)
    apart = {k: A.whitebox(base, {k: view[k]}, known=known, end=v.end(), candidates=cands, chunk=32)[k]
             for k in view}
    assert together == apart
    assert len({tuple(g) for g in together.values()}) > 1  # the groups did split
    truth = v.ids[len(known):v.end()]
    assert any(g != truth for g in together.values())


def test_learned_attack_trains_on_the_attackers_titles_only(tiny):
    tok, base = tiny
    victims = [[0, 3, 5], [4, 1]]  # item 1 is "Heat (1995)"; item 11 has the same title
    owned = A.owned_items(TITLES, victims)
    assert owned == [2, 6, 7, 8, 9, 10, 12, 13]
    histories = A.attacker_histories(owned, 20, length=4, seed=0)
    assert {i for h in histories for i in h} == set(owned)
    assert all(len(set(h)) == 4 for h in histories)
    known = A.known_prefix(tok, PROMPT)
    states, tokens = A.training_pairs(base, tok, PROMPT, TITLES, histories, [0, 2], known=known)
    spelled = tok.decode(tokens.tolist())
    for i in (0, 1, 3, 4, 5):
        assert TITLES[i].split(" (")[0] not in spelled
    assert "Casablanca" in spelled
    assert states[0].shape == states[2].shape == (len(tokens), base.config.hidden_size)
    # at the embeddings, the decoder names the tokens it was trained on
    cands = A.catalogue_candidates(tok, PROMPT, TITLES)
    dec = A.train_decoder(states[0], tokens, cands, base.get_input_embeddings().weight[cands], epochs=30, lr=1e-2)
    v = A.victim(tok, PROMPT, TITLES, [6, 7, 8])  # owned titles: seen in training
    ids, mask = ids_of(tok, v)
    observed = A.block_inputs(base, ids, mask, [0])[0][0]
    guess = dec.tokens(observed[len(known):v.end()])
    assert A.recovery(v.ids[:v.end()], [*known, *guess], v.owner[:v.end()]).token_share == 1.0


def test_identify_maps_recovered_text_to_catalogue_titles():
    text = 'Toy Story (1995)", "Casablanca (1943)", "Vrtigo (1958)", "zzzz", "Heat (1995)",'
    assert A.identify(text, TITLES) == [0, 6, 7, 1]  # a duplicate title names its first item


def test_bad_input_is_a_one_line_error_naming_the_key(tiny):
    tok, base = tiny
    cands = A.catalogue_candidates(tok, PROMPT, TITLES)
    observed = torch.zeros(50, base.config.hidden_size)
    with pytest.raises(ValueError, match=r"^layer: 4 is not the input of a block of this 4-block model \(expected "
                                         r"0 <= layer <= 3\)$"):
        A.whitebox(base, {4: observed}, known=[1, 2], end=10, candidates=cands)
    with pytest.raises(ValueError, match=r"^metric: expected 'l2' or 'cosine', got 'dot'$"):
        A.whitebox(base, {1: observed}, known=[1, 2], end=10, candidates=cands, metric="dot")
    with pytest.raises(ValueError, match=r"^end: 60 must lie between"):
        A.whitebox(base, {1: observed}, known=[1, 2], end=60, candidates=cands)
    with pytest.raises(ValueError, match=r"^layer: -1 "):
        A.block_inputs(base, torch.ones((1, 3), dtype=torch.long), torch.ones((1, 3), dtype=torch.long), [-1])
    with pytest.raises(ValueError, match=r"a cut at k=3 with 1 tail block\(s\) needs 0 <= k < 3"):
        A.server_view(with_adapter(0.0), torch.ones((1, 3), dtype=torch.long),
                      torch.ones((1, 3), dtype=torch.long), k=3)
