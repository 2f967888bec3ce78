"""fellrec run, end to end on the tiny random Llama: the files it writes and what they hold."""

import json

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from fellrec.config import load_config
from fellrec.errors import ConfigError
from fellrec.run import run

FAST = ["model.name_or_path=tiny-random", "partition.method=attribute", "partition.attribute=gender",
        "train.batch_size=4", "eval.max_valid_samples=20", "eval.max_test_samples=30"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("backbone", ["ranker", "bigrec"])
def test_centralized_run_writes_every_file(tmp_path, backbone):
    extra = ["model.num_beams=2", "model.max_new_tokens=8"] if backbone == "bigrec" else []
    cfg = load_config(None, [*FAST, f"model.backbone={backbone}", "name=r", "train.steps=4", "eval.every=2",
                             *extra])
    out = run(cfg, runs_dir=tmp_path / "runs", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["adapters", "config.yaml", "metrics.jsonl", "results.json"]
    assert load_config(out / "config.yaml") == cfg
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == [1, 2, 3, 4]
    assert [e["step"] for e in events if e["event"] == "valid"] == [2, 4]
    r = json.loads((out / "results.json").read_text())
    assert r["backbone"] == backbone and r["algorithm"] == "centralized"
    assert set(r["clients"]) == {"0", "1"}  # F and M
    assert r["samples"]["test"] == 30 == sum(c["n"] for c in r["clients"].values())
    for metric in ("recall@10", "ndcg@20", "hit@5", "mrr@10"):
        per_client = [c[metric] for c in r["clients"].values()]
        weights = [c["n"] for c in r["clients"].values()]
        assert r["overall"][metric] == pytest.approx(np.average(per_client, weights=weights))
        assert set(r["imbalance"][metric]) == {"std", "min", "max", "max_min_ratio", "cv", "gini"}
    assert r["train"]["select_by"] == ("loss" if backbone == "bigrec" else "recall@10")
    assert r["train"]["best_step"] in (2, 4)
    adapter = load_file(out / "adapters" / "global.safetensors")
    assert len(adapter) == 8 and all("lora_" in k for k in adapter)


def test_finished_run_is_never_overwritten(tmp_path):
    cfg = load_config(None, [*FAST, "name=once", "train.steps=0"])
    out = run(cfg, runs_dir=tmp_path, progress=False)
    before = (out / "results.json").read_text()
    with pytest.raises(ConfigError, match="already holds a finished run"):
        run(cfg, runs_dir=tmp_path, progress=False)
    assert (out / "results.json").read_text() == before


def test_untrained_adapter_is_the_zero_step_run(tmp_path):
    cfg = load_config(None, [*FAST, "name=zero", "train.steps=0"])
    out = run(cfg, runs_dir=tmp_path, progress=False)
    r = json.loads((out / "results.json").read_text())
    assert r["train"]["steps"] == 0
    adapter = load_file(out / "adapters" / "global.safetensors")
    assert all(v.abs().sum() == 0 for k, v in adapter.items() if "lora_B" in k)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 0
