"""fellrec run, end to end on the tiny random Llama: every algorithm, the files it writes and what
they hold, crash and resume, and the refusals."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fellrec.cli import main
from fellrec.config import dump, load_config
from fellrec.errors import ConfigError
from fellrec.run import run

FAST = ["model.name_or_path=tiny-random", "partition.method=attribute", "partition.attribute=gender",
        "train.batch_size=4", "train.local_steps=2", "train.max_train_samples=64", "eval.max_valid_samples=12",
        "eval.max_test_samples=30"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("backbone", ["ranker", "bigrec"])
def test_fedavg_run_writes_every_output(tmp_path, backbone):
    extra = ["model.num_beams=2", "model.max_new_tokens=8"] if backbone == "bigrec" else []
    cfg = load_config(None, [*FAST, f"model.backbone={backbone}", "name=r", "train.algorithm=fedavg",
                             "train.rounds=2", *extra])
    out = run(cfg, runs_dir=tmp_path / "runs", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["adapters", "config.yaml", "metrics.jsonl", "plots",
                                                     "report.md", "results.json"]
    assert load_config(out / "config.yaml") == cfg
    rounds = lines(out / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [1, 2]
    adapter_size = os.path.getsize(out / "adapters" / "global.safetensors")
    select_by = "loss" if backbone == "bigrec" else "recall@10"
    for r in rounds:
        assert r["clients"] == ["0", "1"]
        assert all(r["train"][c]["steps"] == 2 and r["train"][c]["examples"] == 64 for c in ("0", "1"))
        assert all(np.isfinite(r["train"][c]["loss"]) for c in ("0", "1"))
        # what travels is one adapter each way: the size of its safetensors file
        assert r["bytes_up"] == r["bytes_down"] == {"0": adapter_size, "1": adapter_size}
        assert set(r["valid"]) == {"0", "1"} and all(select_by in v for v in r["valid"].values())
    res = json.loads((out / "results.json").read_text())
    assert res["backbone"] == backbone and res["algorithm"] == "fedavg" and res["rounds"] == 2
    assert res["communication"]["bytes_up"] == res["communication"]["bytes_down"] == 4 * adapter_size
    assert res["select_by"] == select_by and set(res["best_round"].values()) <= {1, 2}
    assert res["client_names"] == {"0": "F", "1": "M"} and res["time_s"] >= res["train_time_s"] > 0
    assert res["samples"]["test"] == 30 == sum(c["n"] for c in res["clients"].values())
    for metric in ("recall@10", "ndcg@20", "hit@5", "mrr@10"):
        per_client = [c[metric] for c in res["clients"].values()]
        weights = [c["n"] for c in res["clients"].values()]
        assert res["overall"][metric] == pytest.approx(np.average(per_client, weights=weights))
        assert set(res["imbalance"][metric]) == {"std", "min", "max", "max_min_ratio", "cv", "gini"}
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["client-0.safetensors", "client-1.safetensors",
                                                                     "global.safetensors"]
    final = load_file(out / "adapters" / "global.safetensors")
    assert len(final) == 8 and all("lora_" in k for k in final)
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)  # it trained
    for c in ("0", "1"):  # each client's adapter is the global one of its best round
        chosen = load_file(out / "adapters" / f"client-{c}.safetensors")
        if res["best_round"][c] == 2:
            assert all(torch.equal(chosen[k], final[k]) for k in final)
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["clients.png", "convergence.png", "imbalance.png"]
    assert "# Run r" in (out / "report.md").read_text()


def test_local_clients_train_apart_and_send_nothing(tmp_path):
    out = run(load_config(None, [*FAST, "name=l", "train.algorithm=local", "train.rounds=1"]), tmp_path, False)
    res = json.loads((out / "results.json").read_text())
    assert res["communication"]["bytes_up"] == res["communication"]["bytes_down"] == 0
    a, b = (load_file(out / "adapters" / f"client-{c}.safetensors") for c in ("0", "1"))
    assert not (out / "adapters" / "global.safetensors").exists()
    lora_b = [k for k in a if "lora_B" in k]
    assert all(a[k].abs().sum() > 0 and b[k].abs().sum() > 0 for k in lora_b)
    assert not all(torch.equal(a[k], b[k]) for k in lora_b)  # two private adapters


def test_fellrec_logs_its_balance_and_keeps_personal_adapters(tmp_path):
    out = run(load_config(None, [*FAST, "name=fl", "train.algorithm=fellrec", "train.rounds=2"]), tmp_path, False)
    rounds = lines(out / "metrics.jsonl")
    for r in rounds:
        st = r["strategy"]
        assert st["clients"] == ["0", "1"] and len(st["similarity"]) == 2 and len(st["similarity"][0]) == 2
        assert st["loss"] == [r["train"][c]["loss"] for c in ("0", "1")]
        assert sum(st["p"]) == pytest.approx(1.0) and all(0 < w <= 1 for w in st["w"])
    res = json.loads((out / "results.json").read_text())
    assert res["communication"]["bytes_up"] > 0 and not (out / "adapters" / "global.safetensors").exists()
    a, b = (load_file(out / "adapters" / f"client-{c}.safetensors") for c in ("0", "1"))
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert {"similarity.png", "heating.png"} <= {p.name for p in (out / "plots").iterdir()}


def test_centralized_trains_one_pooled_adapter_with_the_same_budget(tmp_path):
    out = run(load_config(None, [*FAST, "name=c", "train.algorithm=centralized", "train.rounds=1"]), tmp_path, False)
    (r,) = lines(out / "metrics.jsonl")
    assert list(r["train"]) == ["all"]
    assert r["train"]["all"]["steps"] == 2 * 2  # local_steps x clients
    assert r["train"]["all"]["examples"] == 2 * 64
    res = json.loads((out / "results.json").read_text())
    assert res["communication"]["bytes_up"] == 0 and res["steps_per_round"] == {"all": 4}


def test_fedprox_keeps_clients_nearer_the_global_adapter(tmp_path):
    def drift(algorithm, mu):
        out = run(load_config(None, [*FAST, f"name={algorithm}{mu}", f"train.algorithm={algorithm}",
                                     "train.rounds=1", "train.local_steps=4", "train.lr=5e-2",
                                     f"train.prox_mu={mu}", "eval.every=0"]), tmp_path, False)
        g = load_file(out / "adapters" / "global.safetensors")
        return sum(float((v ** 2).sum()) for k, v in g.items() if "lora_B" in k)  # B starts at 0

    assert drift("fedprox", 1e4) < 0.5 * drift("fedavg", 0.0)


def test_client_fraction_draws_a_seeded_subset(tmp_path):
    cfg = load_config(None, [*FAST, "name=f", "partition.method=attribute", "partition.attribute=occupation",
                             "train.client_fraction=0.2", "train.rounds=3", "train.local_steps=1", "eval.every=0"])
    out = run(cfg, tmp_path, False)
    chosen = [r["clients"] for r in lines(out / "metrics.jsonl")]
    assert all(len(c) == 5 for c in chosen)  # ceil(0.2 x 21 occupations)
    assert len({tuple(c) for c in chosen}) > 1  # a new draw each round


def test_untrained_adapter_is_the_zero_round_run(tmp_path):
    out = run(load_config(None, [*FAST, "name=zero", "train.rounds=0"]), tmp_path, progress=False)
    (r,) = lines(out / "metrics.jsonl")
    assert r["round"] == 0 and "train" not in r and set(r["valid"]) == {"0", "1"}
    adapter = load_file(out / "adapters" / "global.safetensors")
    assert all(v.abs().sum() == 0 for k, v in adapter.items() if "lora_B" in k)
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["rounds"] == 0


def test_finished_run_is_never_overwritten(tmp_path):
    cfg = load_config(None, [*FAST, "name=once", "train.rounds=0"])
    out = run(cfg, runs_dir=tmp_path, progress=False)
    before = (out / "results.json").read_text()
    with pytest.raises(ConfigError, match="already holds a finished run"):
        run(cfg, runs_dir=tmp_path, progress=False)
    assert run(cfg, runs_dir=tmp_path, progress=False, resume=True) == out
    assert (out / "results.json").read_text() == before


KILLER = """
import os, signal, sys
from fellrec import client
calls = {"n": 0}
fit = client.AdapterTrainer.fit
def fit_then_die(self, payload, rnd, on_step=None):
    calls["n"] += 1
    if calls["n"] == int(os.environ["DIE_AT_FIT"]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit: as a power cut would
    return fit(self, payload, rnd, on_step)
client.AdapterTrainer.fit = fit_then_die
from fellrec.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("algorithm", ["fedavg", "local", "fellrec"])
def test_resume_after_a_kill_mid_round_ends_like_an_uninterrupted_run(tmp_path, algorithm):
    sets = [*FAST, f"train.algorithm={algorithm}", "train.rounds=3", "train.local_steps=3", "eval.every=1"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["run", "--quiet", "--runs-dir", str(tmp_path / "a"), "--set", "name=x", *args]) == 0

    env = {**os.environ, "DIE_AT_FIT": "4", "OMP_NUM_THREADS": "1"}  # 2 clients: dies in round 2, 2nd client
    killed = subprocess.run([sys.executable, "-c", KILLER, "run", "--quiet", "--runs-dir", str(tmp_path / "b"),
                             "--set", "name=x", *args], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    cut = tmp_path / "b" / "x"
    assert (cut / "checkpoint.safetensors").exists() and not (cut / "results.json").exists()
    assert [r["round"] for r in lines(cut / "metrics.jsonl")] == [1]
    with pytest.raises(ConfigError, match="holds an unfinished run"):
        run(load_config(None, [*sets, "name=x"]), tmp_path / "b", progress=False)

    assert main(["run", "--quiet", "--resume", str(cut)]) == 0
    a, b = tmp_path / "a" / "x", cut
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for r in (ra, rb):
        r.pop("time_s"), r.pop("train_time_s")
    assert ra == rb
    la, lb = lines(a / "metrics.jsonl"), lines(b / "metrics.jsonl")
    for r in (*la, *lb):
        r.pop("time_s")
    assert la == lb
    for f in sorted(p.name for p in (a / "adapters").iterdir()):
        ta, tb = load_file(a / "adapters" / f), load_file(b / "adapters" / f)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), f
    assert not (b / "checkpoint.safetensors").exists()


def test_resume_refuses_a_changed_config(tmp_path):
    run_dir = tmp_path / "x"
    run_dir.mkdir()
    cfg = load_config(None, [*FAST, "name=x", "train.rounds=1"])
    (run_dir / "config.yaml").write_text(dump(load_config(None, [*FAST, "name=x", "train.rounds=5"])))
    (run_dir / "checkpoint.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"train.rounds: the run was started with train.rounds = 5, not 1"):
        run(cfg, tmp_path, progress=False, resume=True)


def test_reference_points_reject_federated_algorithms():
    with pytest.raises(ConfigError, match="fedavg needs an LLM backbone; sasrec is a centralized reference"):
        load_config(None, ["model.backbone=sasrec", "train.algorithm=fedavg"])


def test_several_algorithms_run_in_turn_and_are_compared(tmp_path, capsys):
    code = main(["run", "--quiet", "--runs-dir", str(tmp_path), *(a for s in FAST for a in ("--set", s)),
                 "--set", "name=d", "--set", "train.rounds=1", "--set", "algorithms=[fedavg, local]"])
    assert code == 0
    shown = capsys.readouterr().out
    for name in ("d-fedavg", "d-local"):
        res = json.loads((tmp_path / name / "results.json").read_text())
        assert res["algorithm"] == name.split("-")[1]
        assert f"{res['overall']['recall@10']:.4f}" in shown
    assert "recall@10 per client" in shown


@pytest.mark.parametrize("setting, message", [
    ("train.rouds=3", "--set train.rouds: train.rouds: unknown key (did you mean train.rounds?)"),
    ("train.rounds=many", "--set train.rounds: train.rounds: expected int, got 'many'"),
    ("train.algorithm=fedsgd", "train.algorithm: 'fedsgd' is not one of centralized, local, fedavg, fedprox"),
    ("data.path=/no/such/ml-1m", "/no/such/ml-1m"),
])
def test_bad_config_is_one_line_and_exit_2(tmp_path, capsys, setting, message):
    extra = ["--set", "data.format=ml-1m"] if setting.startswith("data.") else []
    code = main(["run", "--quiet", "--runs-dir", str(tmp_path), "--set", "name=bad", *extra, "--set", setting])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fellrec: error: ") and message in err
    assert not (tmp_path / "bad" / "results.json").exists()


def test_device_choice():
    from fellrec.run import pick_device

    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"model\.device: cuda asked for, but this torch sees no GPU"):
            pick_device("cuda")
    with pytest.raises(ConfigError, match=r"model\.device: 'gpu' is not a device"):
        pick_device("gpu")


def test_sgd_optimizer_trains_too(tmp_path):
    out = run(load_config(None, [*FAST, "name=sgd", "train.optimizer=sgd", "train.lr=0.5", "train.rounds=1",
                                 "eval.every=0"]), tmp_path, False)
    final = load_file(out / "adapters" / "global.safetensors")
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora_B" in k)
