"""fellrec run, end to end on the tiny random Llama: every algorithm, the files it writes and what
they hold, crash and resume, and the refusals."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fellrec.cli import main
from fellrec.config import dump, load_config
from fellrec.errors import ConfigError
from fellrec.results import read_test_users
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
                                                     "report.md", "results.json", "test_users.csv"]
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
    users = read_test_users(out)  # one row per test user, whose means are the overall metrics
    assert all(len(v) == 30 for v in users.values())
    assert np.mean(list(users["recall@10"].values())) == pytest.approx(res["overall"]["recall@10"])
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
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["clients.png", "convergence.png", "imbalance.png",
                                                                    "learning.png"]
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


KILLER = str(Path(__file__).with_name("killer.py"))


def killed_run(runs_dir, args, where, nth=1):
    """``fellrec run`` in a child process, SIGKILLed at the ``nth`` call of ``where`` (see killer.py)."""
    env = {**os.environ, "DIE_IN": where, "DIE_AT_CALL": str(nth), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, KILLER, "run", "--quiet", "--runs-dir", str(runs_dir), *args], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr


def same_results(a, b):
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    for r in (ra, rb):
        r.pop("time_s"), r.pop("train_time_s")
    assert ra == rb


@pytest.mark.parametrize("algorithm", ["fedavg", "local", "fellrec"])
def test_resume_after_a_kill_mid_round_ends_like_an_uninterrupted_run(tmp_path, algorithm):
    sets = [*FAST, f"train.algorithm={algorithm}", "train.rounds=3", "train.local_steps=3", "eval.every=1"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["run", "--quiet", "--runs-dir", str(tmp_path / "a"), "--set", "name=x", *args]) == 0

    # 2 clients: dies in round 2, at the 2nd client's local training
    killed_run(tmp_path / "b", ["--set", "name=x", *args], "fellrec/trainer.py:AdapterTrainer.fit", 4)
    cut = tmp_path / "b" / "x"
    assert (cut / "checkpoint.safetensors").exists() and not (cut / "results.json").exists()
    assert [r["round"] for r in lines(cut / "metrics.jsonl")] == [1]
    with pytest.raises(ConfigError, match="holds an unfinished run"):
        run(load_config(None, [*sets, "name=x"]), tmp_path / "b", progress=False)

    assert main(["run", "--quiet", "--resume", str(cut)]) == 0
    a, b = tmp_path / "a" / "x", cut
    same_results(a, b)
    la, lb = lines(a / "metrics.jsonl"), lines(b / "metrics.jsonl")
    for r in (*la, *lb):
        r.pop("time_s")
    assert la == lb
    for f in sorted(p.name for p in (a / "adapters").iterdir()):
        ta, tb = load_file(a / "adapters" / f), load_file(b / "adapters" / f)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), f
    assert not (b / "checkpoint.safetensors").exists()


# LoRA dropout high and a large step, so that scoring with dropout on would change the rankings
NOISY = [*FAST, "model.lora.dropout=0.5", "train.lr=0.05", "train.rounds=2", "name=x"]


def test_resume_after_a_kill_in_the_test_phase_gives_the_same_results(tmp_path):
    args = [a for s in NOISY for a in ("--set", s)]
    assert main(["run", "--quiet", "--runs-dir", str(tmp_path / "a"), *args]) == 0
    killed_run(tmp_path / "b", args, "fellrec/trainer.py:AdapterTrainer.test", 2)  # the second client's test
    cut = tmp_path / "b" / "x"
    assert (cut / "checkpoint.safetensors").exists() and not (cut / "results.json").exists()
    assert main(["run", "--quiet", "--resume", str(cut)]) == 0
    same_results(tmp_path / "a" / "x", cut)


@pytest.mark.parametrize("backbone", ["ranker", "bigrec"])
def test_scores_do_not_depend_on_the_mode_the_model_was_left_in(tmp_path, backbone):
    """Scoring straight after building the backbone (a resumed run, a Flower message) or after
    training gives the same numbers: every scoring path runs in eval mode, without gradients."""
    from fellrec.build import build_backbone, catalogue, pick_test, trainer_options
    from fellrec.pipeline import prepare
    from fellrec.strategies import Payload
    from fellrec.trainer import AdapterTrainer, read_full

    cfg = load_config(None, [*NOISY, f"model.backbone={backbone}", "model.num_beams=2", "model.max_new_tokens=6",
                             "eval.select_by=recall@10"])
    p = prepare(cfg, progress=False)
    test = pick_test(p).take(np.arange(8))
    backbone = build_backbone(cfg, *catalogue(p))
    assert not backbone.model.training  # a fresh adapter comes out in eval mode
    torch.manual_seed(0)
    adapter = {k: v + 0.5 * torch.randn_like(v) for k, v in read_full(backbone.model).items()}
    trainer = AdapterTrainer("0", backbone, test, test, **trainer_options(cfg, adapter))
    runs = []
    for mode in (True, False, True):
        backbone.model.train(mode)
        runs.append((trainer.test(test), trainer.evaluate(Payload(adapter, {}), 1)))
        assert backbone.model.training == mode  # the caller's mode is given back
    for tested, validated in runs[1:]:
        assert validated == runs[0][1]
        for k in tested:
            np.testing.assert_array_equal(tested[k], runs[0][0][k])


@pytest.mark.parametrize("where", ["fellrec/report.py:plot_convergence", "fellrec/report.py:render_report",
                                   "fellrec/rundir.py:finish"])
def test_resume_after_a_kill_while_the_outputs_are_written_completes_them(tmp_path, where):
    args = [a for s in [*FAST, "train.rounds=1", "name=x"] for a in ("--set", s)]
    assert main(["run", "--quiet", "--runs-dir", str(tmp_path / "a"), *args]) == 0
    killed_run(tmp_path / "b", args, where)
    cut = tmp_path / "b" / "x"
    assert main(["run", "--quiet", "--resume", str(cut)]) == 0
    a = tmp_path / "a" / "x"
    for sub in ("", "plots", "adapters"):  # every output file, and nothing else (no temporary leftovers)
        assert sorted(p.name for p in (cut / sub).iterdir()) == sorted(p.name for p in (a / sub).iterdir()), sub
    same_results(a, cut)
    report = [(d / "report.md").read_text().split("\n") for d in (a, cut)]
    assert report[0][3:] == report[1][3:]  # all but the title and the settings line (with the time)


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


@pytest.mark.parametrize("settings, message", [
    (["data.format=ml-csv", "data.path={bad}"], "ratings.csv:3"),
    (["data.format=ml-1m", "data.path={missing}"], "not found"),
    (["partition.method=kmeans", "partition.num_clients=5000"], "lower num_clients"),
    (["storage.k=7"], "storage.k"),
])
def test_a_failed_start_leaves_no_run_folder(tmp_path, capsys, settings, message):
    bad = tmp_path / "ml-bad"
    bad.mkdir()
    (bad / "movies.csv").write_text("movieId,title,genres\n1,Heat (1995),Action\n2,Up (2009),Comedy\n")
    (bad / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,10\n1,2,four,11\n")
    sets = [s.format(bad=bad, missing=tmp_path / "nothing") for s in settings]
    runs = tmp_path / "runs"
    args = [a for s in [*FAST, "name=f", *sets] for a in ("--set", s)]
    code = main(["run", "--quiet", "--runs-dir", str(runs), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (runs / "f").exists()


def test_a_failed_start_of_a_resumed_run_keeps_its_checkpoint(tmp_path):
    args = [a for s in [*FAST, "train.rounds=2", "name=x"] for a in ("--set", s)]
    killed_run(tmp_path, args, "fellrec/trainer.py:AdapterTrainer.fit", 3)  # in round 2
    cut = tmp_path / "x"
    before = sorted(p.name for p in cut.iterdir())
    assert "checkpoint.safetensors" in before
    killed_run(tmp_path, ["--resume", str(cut)], "fellrec/trainer.py:AdapterTrainer.fit", 1)
    assert sorted(p.name for p in cut.iterdir()) == before


def test_device_choice():
    from fellrec.build import pick_device

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
