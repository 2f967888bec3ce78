"""Config loading: defaults, overrides, and errors that name the key, the file and the line."""

import re
from pathlib import Path

import pytest

from fellrec.config import Config, describe, dump, load_config
from fellrec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.format == "ml-100k-recbole" and cfg.data.kcore == 5
    assert cfg.split.ratios == [0.8, 0.1, 0.1] and cfg.partition.num_clients == 5


def test_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\ndata:\n  kcore: 3\npartition:\n  method: attribute\n  attribute: occupation\n")
    cfg = load_config(f, ["partition.num_clients=8", "data.min_rating=4", "split.ratios=[0.6, 0.2, 0.2]"])
    assert cfg.name == "x" and cfg.data.kcore == 3
    assert cfg.partition.method == "attribute" and cfg.partition.num_clients == 8
    assert cfg.data.min_rating == 4.0 and isinstance(cfg.data.min_rating, float)
    assert cfg.split.ratios == [0.6, 0.2, 0.2]
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3  # YAML 1.1 reads 1e-3 as text


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\ndata:\n  format: ml-1m\n  kcroe: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:4: data\.kcroe: unknown key \(did you mean data\.kcore"):
        load_config(f)


def test_all_problems_reported_at_once(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: many\nsplit:\n  method: random\npartition:\n  num_clients: 2.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert "c.yaml:1: seed: expected int, got 'many'" in msg
    assert "c.yaml:3: split.method: 'random' is not one of temporal, per-user, leave-one-out" in msg
    assert "c.yaml:5: partition.num_clients: expected int, got 2.5" in msg
    assert "\n" not in msg


def test_override_errors_name_the_flag():
    with pytest.raises(ConfigError, match=r"--set data\.kcore: data\.kcore: expected int, got 'five'"):
        load_config(None, ["data.kcore=five"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["data.kcore"])


def test_cross_key_checks():
    with pytest.raises(ConfigError, match=r"partition\.attribute: method=attribute needs"):
        load_config(None, ["partition.method=attribute"])
    with pytest.raises(ConfigError, match=r"split.ratios: expected three non-negative shares"):
        load_config(None, ["split.ratios=[0.5, 0.5]"])


def test_a_bad_value_names_its_one_key_its_value_and_where_it_came_from(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\ntrain:\n  lr: 0.001\n  local_epochs: -0.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(err.value) == f"{f}:4: train.local_epochs: must not be negative, got -0.5"
    with pytest.raises(ConfigError) as err:  # the file's train section is fine; --set gave the bad value
        load_config(f, ["train.local_epochs=1", "train.rounds=-1"])
    assert str(err.value) == "--set train.rounds: train.rounds: must not be negative, got -1"
    with pytest.raises(ConfigError) as err:
        load_config(f, ["train.local_epochs=0", "fellrec.beta=0"])
    assert str(err.value) == "--set fellrec.beta: fellrec.beta: must be positive, got 0.0"
    with pytest.raises(ConfigError) as err:  # two problems: each with its own key and place
        load_config(f, ["fellrec.tau=-1"])
    assert str(err.value) == (f"{f}:4: train.local_epochs: must not be negative, got -0.5; "
                              "--set fellrec.tau: fellrec.tau: must be positive, got -1.0")


def test_cross_key_problem_points_at_the_key_that_was_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 1\npartition:\n  num_clients: 3\n  method: attribute\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(f))}:4: partition\.attribute: method=attribute needs"):
        load_config(f)
    with pytest.raises(ConfigError, match=r"^--set model\.backbone: train\.algorithm: fedavg needs an LLM backbone"):
        load_config(None, ["model.backbone=sasrec"])
    with pytest.raises(ConfigError, match=r"^--set algorithms: algorithms\[1\]: 'fedsgd' is not one of"):
        load_config(None, ["algorithms=[fedavg, fedsgd]"])


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  kcore: [1,\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+: not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_domains_list_of_sections(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  domains:\n    - {name: comics, format: goodreads, path: a.json.gz}\n"
                 "    - {name: crime, format: goodreads, path: b.json.gz, colour: red}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:4: data\.domains\[1\]\.colour: unknown key"):
        load_config(f)


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["partition.num_clients=7", "data.min_rating=4"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump(cfg))
    assert load_config(f) == cfg


def test_every_key_is_documented():
    rows = describe()
    assert {k for k, _, _ in rows} >= {"seed", "data.format", "data.kcore", "split.method",
                                       "partition.num_clients", "partition.mf_epochs"}
    assert all(doc for _, _, doc in rows)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    text = path.read_text()
    assert text.startswith("#"), "every shipped config opens with a comment saying what it runs"
    load_config(path)


PARTS = ["loo", "ablation", "temporal", "lora", "attention", "split", "noniid", "crossdomain",
         "crossdomain-private", "fedprox"]


@pytest.mark.parametrize("part", PARTS)
def test_every_command_of_the_claims_experiments_makes_a_valid_config(tmp_path, part):
    """experiments/claims.sh (docs/RESULTS.md's commands): each run it would start, recorded by a stand-in
    for `fellrec`, loads with its --set overrides, and runs under its own name."""
    import json
    import os
    import subprocess
    import sys

    record = tmp_path / "calls.jsonl"
    fake = tmp_path / "fellrec"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(record)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    subprocess.run(["bash", str(ROOT / "experiments" / "claims.sh"), part], cwd=ROOT, check=True,
                   env={**os.environ, "FELLREC": str(fake), "SEEDS": "2024 2025"})
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert calls and all(c[:1] == ["run"] and "--resume" in c for c in calls)
    names = []
    for c in calls:
        sets = [c[i + 1] for i, a in enumerate(c) if a == "--set"]
        cfg = load_config(ROOT / c[1], sets)
        assert str(cfg.seed) in cfg.name and cfg.seed in (2024, 2025)
        names.append((cfg.name, tuple(cfg.algorithms)))
    assert len(set(names)) == len(names)  # no run started twice


def test_the_claims_experiments_refuse_an_unknown_part():
    import subprocess

    out = subprocess.run(["bash", str(ROOT / "experiments" / "claims.sh"), "nope"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 2 and "experiments/claims.sh fedprox" in out.stdout
