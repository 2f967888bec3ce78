"""fellrec run with model.backbone=ctr: FedPA's Open_Train then Fed_Train through the CLI."""

import json

import pytest

from fellrec.cli import main
from fellrec.config import load_config
from fellrec.errors import ConfigError

pytestmark = pytest.mark.slow


def test_fedpa_through_the_cli(tmp_path, capsys):
    code = main(["run", "configs/fedpa-ml100k.yaml", "--quiet", "--runs-dir", str(tmp_path), "--set", "name=f",
                 "--set", "algorithms=[fedpa, frozen]", "--set", "train.rounds=2", "--set", "fedpa.pretrain_epochs=2"])
    assert code == 0
    shown = capsys.readouterr().out
    for alg in ("fedpa", "frozen"):
        out = tmp_path / f"f-{alg}"
        r = json.loads((out / "results.json").read_text())
        assert r["algorithm"] == f"fedpa:{alg}" and r["users"]["private"] + r["users"]["public"] == 943
        assert 0.5 < r["overall"]["auc"] < 1 and str(r["best_round"]) in r["per_round"]
        assert f"{r['overall']['auc']:.4f}" in shown
        assert (out / "foundation.safetensors").exists() and "## Overall (test)" in (out / "report.md").read_text()
    fed = json.loads((tmp_path / "f-fedpa" / "results.json").read_text())
    assert fed["rounds"] == 2 and 0 < fed["communication"]["bytes_up"] < 20_000 * 754 * 2
    frozen = json.loads((tmp_path / "f-frozen" / "results.json").read_text())
    assert frozen["rounds"] == 0 and frozen["communication"]["bytes_up"] == 0
    assert fed["task"] == frozen["task"] == "ctr"  # results.json's one schema, with what its metrics measure
    # the comparison that ends the command shows the pooled metrics, not empty ranking columns
    table = shown[shown.index("run  "):]
    assert table.split("\n")[0].split() == ["run", "algorithm", "auc", "gauc", "logloss", "valid", "auc", "round",
                                            "bytes", "up+down", "time"]
    row = next(line for line in table.split("\n") if line.startswith("f-fedpa "))
    assert f"{fed['overall']['auc']:.4f}" in row and f"{fed['valid']['auc']:.4f}" in row
    assert "per client" not in table


def test_fedpa_config_errors():
    with pytest.raises(ConfigError, match=r"algorithms\[0\]: 'fedavg' is not one of fedpa, fedavg-adapter"):
        load_config(None, ["model.backbone=ctr", "algorithms=[fedavg]"])
    with pytest.raises(ConfigError, match=r"--set train\.algorithm: train\.algorithm: 'fedprox' is not one of fedpa"):
        load_config(None, ["model.backbone=ctr", "train.algorithm=fedprox"])
    with pytest.raises(ConfigError, match=r"'frozen' is not one of centralized.*need model\.backbone=ctr"):
        load_config(None, ["train.algorithm=frozen"])
    with pytest.raises(ConfigError, match=r"--set fedpa\.lr: fedpa\.lr: moved to train\.lr"):
        load_config(None, ["model.backbone=ctr", "fedpa.lr=0.01"])
    with pytest.raises(ConfigError, match=r"eval\.select_by: 'recall@10': FedPA selects its round by the pooled"):
        load_config(None, ["model.backbone=ctr", "eval.select_by=recall@10"])


def test_fedpa_takes_the_released_settings_where_the_config_does_not_set_them():
    cfg = load_config(None, ["model.backbone=ctr", "train.lr=0.01"])
    t = cfg.train
    assert (t.algorithm, t.lr, t.local_epochs, t.batch_size, cfg.eval.select_by) == ("fedpa", 0.01, 1.0, 1024, "auc")
    llm = load_config(None, [])
    assert (llm.train.algorithm, llm.train.lr, llm.train.batch_size, llm.eval.select_by) == ("fedavg", 5e-4, 8, "auto")
