"""LLM backbones on the tiny random Llama: prompts, losses, grounding, masking, adapters."""

import copy

import numpy as np
import pytest
import torch

from fellrec.adapters import adapter_parameters, add_lora, get_adapter, set_adapter
from fellrec.backbones import text
from fellrec.backbones.bigrec import BIGRec
from fellrec.backbones.prompts import HEADER, Prompt
from fellrec.backbones.ranker import TextRanker
from fellrec.config import LoraConfig
from fellrec.evaluate import evaluate
from fellrec.holdout import Samples
from fellrec.llm import tiny_random

TITLES = ["Alpha (1990)", "Beta (1991)", "Gamma Rays (1992)", "Delta Force (1993)", "Epsilon (1994)",
          "Zeta, The (1995)", "Eta Carinae (1996)", "Theta Waves (1997)"]
PROMPT = Prompt.for_dataset("ml-100k")


def samples(histories, targets, exclude=None):
    return Samples(np.arange(len(histories)), [np.asarray(h) for h in histories],
                   [np.asarray(t) for t in targets], None if exclude is None else [np.asarray(x) for x in exclude])


@pytest.fixture
def lm():
    tok, base = tiny_random([*TITLES, PROMPT.instruction(TITLES)], seed=0)
    plain = copy.deepcopy(base)  # the base model as it is, without any adapter
    return tok, add_lora(base, LoraConfig(), seed=0), plain


def test_prompt_text():
    assert PROMPT.history(["A (1)", "B"]) == 'The user has watched the following movies before: "A (1)", "B"'
    full = PROMPT.instruction(["A"])
    assert full.startswith(HEADER + "\n\n### Instruction:\nGiven a list of movies the user has watched before, "
                           "please recommend a new movie that the user likes to the user.\n\n### Input:\n")
    assert full.endswith('before: "A"\n\n### Response:\n')
    games = Prompt.for_dataset("amazon2018-Video_Games")
    assert (games.item, games.items, games.verb) == ("video game", "video games", "played")
    assert Prompt.for_dataset("somewhere", verb="liked").verb == "liked"
    assert Prompt.parse(' "Toy Story (1995)"\n"Other"') == "Toy Story (1995)"
    assert Prompt.parse("No quotes here") == "No quotes here"
    assert Prompt.parse('"Unclosed') == "Unclosed"


def test_bigrec_labels_cover_only_the_response(lm):
    tok, model, _ = lm
    bb = BIGRec(model, tok, TITLES, PROMPT)
    ex = bb.examples(samples([[0, 1]], [[2]]))
    ids, labels = ex["input_ids"][0], ex["labels"][0]
    answer = tok('"Gamma Rays (1992)"', add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labelled = labels[labels != -100].tolist()
    assert labelled == answer
    assert ids[-len(answer):].tolist() == answer  # the response closes the sequence
    full = BIGRec(model, tok, TITLES, PROMPT, train_on_inputs=True).examples(samples([[0, 1]], [[2]]))
    assert (full["labels"] == full["input_ids"]).all()


def test_bigrec_loss_equals_lm_cross_entropy(lm):
    """Our response-only loss (logits only where labelled) equals the HF model's own loss."""
    tok, model, _ = lm
    bb = BIGRec(model, tok, TITLES, PROMPT)
    batch = samples([[0, 1], [3, 4, 5]], [[2], [6]])
    ex = bb.examples(batch)
    model.eval()
    reference = model(input_ids=ex["input_ids"], attention_mask=ex["attention_mask"], labels=ex["labels"]).loss
    assert torch.allclose(bb.loss(batch), reference, atol=1e-5)


def test_grounding_finds_the_written_title_and_masking_hides_history(lm):
    tok, model, _ = lm
    bb = BIGRec(model, tok, TITLES, PROMPT)
    scores = bb.ground(["Gamma Rays (1992)", "Eta Carinae (1996)"])
    assert scores.shape == (2, len(TITLES))
    assert scores.argmax(1).tolist() == [2, 6]
    assert torch.allclose(scores[0, 2], torch.tensor(0.0), atol=1e-4)  # identical text: distance 0
    # The model "writes" Beta; Beta is the target. Unmasked it is a hit at rank 1; masked as history, never.
    def writes_beta(batch):  # BIGRec's rank: grounding what the model generates
        return bb.ground(["Beta (1991)"] * len(batch))

    hit = evaluate(writes_beta, samples([[0]], [[1]], [[0]]), ks=(1,))["hit@1"]
    masked = evaluate(writes_beta, samples([[0]], [[1]], [[0, 1]]), ks=(1, 5))
    assert hit.tolist() == [1.0]
    assert masked["hit@1"].tolist() == [0.0] and masked["hit@5"].tolist() == [0.0]


def test_bigrec_embeds_with_the_base_model_even_after_training(lm, train_a_little):
    tok, model, plain = lm
    bb = BIGRec(model, tok, TITLES, PROMPT)
    train_a_little(model, bb.loss, samples([[0, 1], [2, 3]], [[4], [5]]), steps=3)
    assert any(p.abs().sum() > 0 for n, p in adapter_parameters(model).items() if "lora_B" in n)
    expected = text.encode(plain, tok, TITLES, max_len=512, pooling="last")
    assert torch.allclose(bb.item_embeddings(), expected, atol=1e-5)


def test_generate_returns_text(lm):
    tok, model, _ = lm
    out = BIGRec(model, tok, TITLES, PROMPT, max_new_tokens=5, num_beams=2).generate(samples([[0], [1, 2]],
                                                                                             [[3], [4]]))
    assert len(out) == 2 and all(isinstance(s, str) for s in out)


@pytest.mark.parametrize("backbone", ["bigrec", "ranker-frozen", "ranker-adapted"])
def test_training_lowers_loss_and_moves_only_the_adapter(lm, backbone, train_a_little):
    tok, model, _ = lm
    if backbone == "bigrec":
        bb = BIGRec(model, tok, TITLES, PROMPT)
    else:
        bb = TextRanker(model, tok, TITLES, PROMPT, item_side=backbone.split("-")[1], negatives=3, seed=0)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = get_adapter(model)
    batch = samples([[0, 1], [2, 3], [4, 5, 6]], [[2], [4], [7]])
    losses = train_a_little(model, bb.loss, batch, steps=30, lr=5e-2)
    assert losses[-1] < losses[0] * 0.9
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), f"base weight {n} changed"
    after = get_adapter(model)
    assert set(after) == set(adapter_before)
    assert any(not torch.equal(after[k], adapter_before[k]) for k in after)


def test_adapter_tensors_round_trip(lm):
    _, model, _ = lm
    tensors = get_adapter(model)
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in tensors)
    assert {k.split(".self_attn.")[1].split(".")[0] for k in tensors} == {"q_proj", "v_proj"}
    assert len(tensors) == 2 * 2 * 2  # layers × (q, v) × (A, B)
    assert all(".default." not in k for k in tensors)
    assert all(torch.count_nonzero(v) == 0 for k, v in tensors.items() if "lora_B" in k)  # B = 0 at start
    changed = {k: torch.randn_like(v) for k, v in tensors.items()}
    set_adapter(model, changed)
    got = get_adapter(model)
    assert all(torch.equal(got[k], changed[k]) for k in changed)
    with pytest.raises(ValueError, match="do not match"):
        set_adapter(model, {"nope": torch.zeros(1)})


def test_fresh_adapter_leaves_the_model_unchanged(lm):
    tok, model, plain = lm
    batch = text.tokenize(tok, TITLES, 64)
    assert torch.allclose(text.hidden(model, batch), text.hidden(plain, batch), atol=1e-6)


def test_ranker_scores_every_item_and_caches_the_frozen_table(lm):
    tok, model, plain = lm
    ranker = TextRanker(model, tok, TITLES, PROMPT, pooling="mean")
    table = ranker.item_table()
    assert ranker.item_table() is table  # computed once
    expected = torch.nn.functional.normalize(text.encode(plain, tok, TITLES, max_len=512, pooling="mean"), dim=-1)
    assert torch.allclose(table, expected, atol=1e-5)
    scores = ranker.rank(samples([[0, 1], [2]], [[3], [4]]))
    assert scores.shape == (2, len(TITLES)) and torch.isfinite(scores).all()
    assert scores.abs().max() <= 1 / 0.05 + 1e-4  # cosine / τ


def test_frozen_item_vectors_are_cached_on_disk(lm, tmp_path, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path))
    tok, model, _ = lm
    first = TextRanker(model, tok, TITLES, PROMPT, cache_key="tiny-random:seed=0").item_table()
    assert len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 1
    again = TextRanker(model, tok, TITLES, PROMPT, cache_key="tiny-random:seed=0")
    again._encode = None  # would fail if called: the table must come from the file
    assert torch.allclose(again.item_table(), first)
    bigrec = BIGRec(model, tok, TITLES, PROMPT, cache_key="tiny-random:seed=0")
    assert torch.allclose(torch.nn.functional.normalize(bigrec.item_embeddings(), dim=-1), first, atol=1e-6)


def test_pooling():
    states = torch.arange(2 * 3 * 2, dtype=torch.float).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert text.pool(states, mask, "last").tolist() == [[2.0, 3.0], [10.0, 11.0]]
    assert text.pool(states, mask, "mean").tolist() == [[1.0, 2.0], [8.0, 9.0]]


def test_history_keeps_the_end_when_cut(lm):
    tok, _, _ = lm
    ids = text.tokenize(tok, ["one two three four five six"], max_len=3)["input_ids"][0].tolist()
    assert tok.decode(ids).endswith("six")
    assert len(ids) == 3


def test_tiny_random_is_deterministic():
    a = tiny_random(TITLES, seed=3)[1].state_dict()
    b = tiny_random(TITLES, seed=3)[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


