"""The packaged SmolLM2-135M-Instruct with LoRA, on real ML-100K samples (CI installs both)."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fellrec.adapters import add_lora
from fellrec.backbones.bigrec import BIGRec
from fellrec.backbones.prompts import Prompt
from fellrec.backbones.ranker import TextRanker
from fellrec.config import LoraConfig, load_config
from fellrec.llm import SMOLLM2, load_base, model_id
from fellrec.pipeline import prepare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setting():
    p = prepare(load_config(None, ["partition.method=attribute", "partition.attribute=gender"]))
    titles = p.dataset.items.title.tolist()
    tok, base = load_base(SMOLLM2)
    assert base.config.num_hidden_layers == 30 and base.config.hidden_size == 576
    model = add_lora(base, LoraConfig(), seed=0)
    return p, titles, tok, model


def fixed_batch(p, n=4):
    return p.samples.train.take(np.arange(n) * 1000)


def reset(model):
    with torch.no_grad():
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.zero_()


def test_ranker_lora_steps_lower_the_loss_and_it_scores_all_items(setting, train_a_little):
    p, titles, tok, model = setting
    reset(model)
    ranker = TextRanker(model, tok, titles, Prompt.for_dataset(p.dataset.name), cache_key=model_id(SMOLLM2))
    batch = fixed_batch(p)
    losses = train_a_little(model, ranker.loss, batch, steps=4, lr=2e-3)
    assert losses[-1] < losses[0]
    scores = ranker.rank(p.samples.test.take([0, 1]))
    assert scores.shape == (2, p.dataset.num_items) and torch.isfinite(scores).all()


def test_bigrec_lora_steps_lower_the_loss_and_generation_grounds(setting, train_a_little):
    p, titles, tok, model = setting
    reset(model)
    bigrec = BIGRec(model, tok, titles, Prompt.for_dataset(p.dataset.name), num_beams=2, max_new_tokens=16,
                    cache_key=model_id(SMOLLM2))
    batch = fixed_batch(p, 2)
    losses = train_a_little(model, bigrec.loss, batch, steps=4, lr=1e-3)
    assert losses[-1] < losses[0]
    test = p.samples.test.take([0, 1])
    texts = bigrec.generate(test)
    assert len(texts) == 2 and all(t.strip() for t in texts)
    scores = bigrec.ground(texts)
    assert scores.shape == (2, p.dataset.num_items) and torch.isfinite(scores).all()
    assert (scores <= 0).all()  # minus a distance
    assert (scores.std(1) > 0).all()  # the distances tell the items apart


def test_fedavg_round_on_smollm2_end_to_end(tmp_path):
    """The demo's path at a tiny budget: 5 k-means clients, one FedAvg round of one step each."""
    import json

    from fellrec.run import run

    cfg = load_config("configs/demo.yaml", ["name=ci", "algorithms=[]", "train.algorithm=fedavg",
                                            "train.rounds=1", "train.local_steps=1", "train.batch_size=2",
                                            "eval.max_valid_samples=2", "eval.max_test_samples=10"])
    out = run(cfg, runs_dir=tmp_path, progress=False)
    (r,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert r["clients"] == ["0", "1", "2", "3", "4"]
    assert all(np.isfinite(t["loss"]) and t["steps"] == 1 for t in r["train"].values())
    # what travels each way is the adapter: LoRA r=8 on q,k,v,o of the last 4 of 16 blocks (k and v
    # project 576 -> 192) and the item-token head, exactly the global adapter's safetensors file
    final = load_file(out / "adapters" / "global.safetensors")
    lora = {k: v for k, v in final.items() if "lora_" in k}
    assert sum(v.numel() for v in lora.values()) == 4 * 8 * (4 * 576 + 576 + 192 + 192 + 576)  # 4 A's, then B's
    assert {int(k.split(".layers.")[1].split(".")[0]) for k in lora} == {12, 13, 14, 15}
    size = os.path.getsize(out / "adapters" / "global.safetensors")
    assert r["bytes_up"] == r["bytes_down"] == {c: size for c in r["clients"]}
    res = json.loads((out / "results.json").read_text())
    assert res["samples"]["test"] == 10 and (out / "report.md").exists()
    assert ["only 10 test users" in w for w in res["warnings"]] == [True]


def test_split_smollm2_matches_the_whole_model(setting):
    """Flexible storage on the real model: cut at k=8 (client: blocks 0-7 and 29), BIGRec's loss."""
    from fellrec.adapters import adapter_parameters
    from fellrec.storage.model import SplitLM

    p, titles, tok, model = setting
    reset(model)
    with torch.no_grad():  # non-zero B so that every adapter tensor gets a gradient worth comparing
        for n, q in model.named_parameters():
            if "lora_B" in n:
                q.normal_(0, 0.01, generator=torch.Generator().manual_seed(len(n)))
    model.eval()  # no LoRA dropout: both passes see the same function
    model.zero_grad(set_to_none=True)  # the earlier tests' last training step left gradients behind
    bigrec = BIGRec(model, tok, titles, Prompt.for_dataset(p.dataset.name))
    batch = fixed_batch(p, 2)
    whole = bigrec.loss(batch)
    whole.backward()
    expected = {n: q.grad.clone() for n, q in adapter_parameters(model).items()}
    model.zero_grad(set_to_none=True)

    split = SplitLM(model, k=8)
    assert split.client.block_indices() == [*range(8), 29]
    bigrec.model = split
    loss = bigrec.loss(batch)
    loss.backward()
    assert loss.item() == pytest.approx(whole.item(), abs=1e-5)
    for n, g in expected.items():
        assert torch.allclose(adapter_parameters(model)[n].grad, g, atol=1e-5), n
    assert split.transport.bytes_up > 0 and split.transport.messages == 2
    model.zero_grad(set_to_none=True)
    reset(model)
