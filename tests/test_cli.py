"""The fellrec command, run as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fellrec.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "fellrec", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_demo_config_prints_five_kmeans_clients():
    out = run("data", "stats", "configs/demo.yaml", "--quiet")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "dataset        ml-100k" in lines
    rows = [ln.split() for ln in lines if ln.split() and ln.split()[0].isdigit() and "cluster-" in ln]
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "4"]
    users = sum(int(r[2].replace(",", "")) for r in rows)
    assert f"total: {users:,} users" in out.stdout
    assert out.stderr == ""  # --quiet: no progress bar


def test_stats_json_is_consistent():
    out = run("data", "stats", "configs/demo.yaml", "--quiet", "--json", "--set", "partition.num_clients=3")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    clients = data["clients"]
    assert len(clients) == 3 == data["summary"]["clients"]
    assert sum(c["users"] for c in clients) == data["summary"]["users_in_clients"]
    assert sum(c["train"] for c in clients) == data["summary"]["samples_train"]
    assert sum(c["test"] for c in clients) == data["summary"]["samples_test"]
    assert data["summary"]["users"] == 943 and data["summary"]["interactions"] == 99_287


def test_attribute_partition_from_the_command_line(capsys):
    code = main(["data", "stats", "--quiet", "--json", "--set", "partition.method=attribute",
                 "--set", "partition.attribute=gender", "--set", "data.kcore=0"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(c["name"] for c in data["clients"]) == ["F", "M"]


def test_bad_config_is_one_line_and_status_2(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data:\n  kcroe: 3\n")
    out = run("data", "stats", str(cfg))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert f"{cfg}:2: data.kcroe: unknown key" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_data_file_is_one_line_and_status_2(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::yesterday\n")
    (d / "movies.dat").write_text("1193::Film (1975)::Drama\n661::Other (1996)::Comedy\n")
    (d / "users.dat").write_text("1::F::1::10::48067\n")
    out = run("data", "stats", "--set", "data.format=ml-1m", "--set", f"data.path={d}")
    assert out.returncode == 2
    assert out.stderr.strip() == (f"fellrec: error: {d / 'ratings.dat'}:2: column 'timestamp': 'yesterday' "
                                  "is not a number")


def test_missing_dataset_path_names_the_key(capsys):
    assert main(["data", "stats", "--set", "data.format=goodreads"]) == 2
    assert "data.path: format 'goodreads' needs a path" in capsys.readouterr().err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for group, _ in COMMANDS:
        assert group in text
    for group, name in COMMANDS:
        with pytest.raises(SystemExit):
            build_parser().parse_args([group, *([name] if name else []), "--help"])
        shown = " ".join(capsys.readouterr().out.split())
        assert " ".join(COMMANDS[(group, name)].__doc__.split()) in shown


def test_config_keys_and_show(capsys):
    assert main(["config", "keys"]) == 0
    keys = capsys.readouterr().out
    assert "partition.num_clients = 5" in keys and "data.kcore = 5" in keys
    assert main(["config", "show", "configs/demo.yaml", "--set", "seed=7"]) == 0
    assert "seed: 7" in capsys.readouterr().out
