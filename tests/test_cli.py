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


def ml_csv(folder: Path, ratings: list[str], movies: list[str] | None = None) -> list[str]:
    """An ml-latest-small style folder; the --set arguments that load it."""
    folder.mkdir()
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(r + "\n" for r in ratings))
    movies = movies or ["1,Heat (1995),Action", "2,Up (2009),Comedy", "3,Big (1988),Comedy"]
    (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(m + "\n" for m in movies))
    return ["--set", "data.format=ml-csv", "--set", f"data.path={folder}"]


def test_nothing_usable_after_skipping_says_how_many_lines_were_skipped(tmp_path, capsys):
    stats = ["data", "stats", "--quiet", "--set", "data.skip_bad_lines=true", "--set", "partition.num_clients=2"]
    every_line_bad = ml_csv(tmp_path / "ml", ["1,1,4.0,yesterday", "2,1,x,10", "1,9,4.0,11"])
    for split in ("temporal", "per-user"):  # was: "partition kmeans: 2 clients but only 0 users ..." (per-user)
        assert main([*stats, *every_line_bad, "--set", f"split.method={split}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"fellrec: error: {tmp_path / 'ml'}: nothing usable is left: no interaction could be "
                              "read; 3 bad lines were skipped (data.skip_bad_lines): 3 in ")
        assert "ratings.csv (first at line 2: column 'timestamp': 'yesterday' is not a number)" in err
    # two good lines, the rest bad: the 5-core filter, or else the split, leaves nobody to train
    two_good = ml_csv(tmp_path / "ml2", ["1,1,4.0,10", "1,2,4.0,10", "1,1,4.0,x", "2,1,x,12"])
    assert main([*stats, *two_good]) == 2
    err = capsys.readouterr().err
    assert "nothing usable is left: 2 interactions were read, the data.kcore=5 filter kept 0; 2 bad lines were " \
           "skipped" in err
    assert main([*stats, *two_good, "--set", "data.kcore=0"]) == 2
    err = capsys.readouterr().err
    assert "nothing usable is left: the temporal split of the 2 interactions left after filtering gives no user a " \
           "training interaction; 2 bad lines were skipped" in err


def test_stats_density_counts_distinct_pairs_and_shows_repeats(tmp_path, capsys):
    # user 1 rates item 1 three times: 5 interactions, 3 distinct pairs of 2 users x 2 items
    sets = ml_csv(tmp_path / "ml", ["1,1,4.0,10", "1,1,3.0,11", "1,2,4.0,12", "1,1,5.0,13", "2,1,4.0,14"])
    base = ["data", "stats", "--quiet", *sets, "--set", "data.kcore=0", "--set", "partition.method=user",
            "--set", "split.method=per-user"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "interactions   5  (3 distinct user-item pairs, density 75.0000%; 2 interactions repeat an earlier " \
           "pair)" in out.splitlines()
    assert main([*base, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert (summary["pairs"], summary["repeated_pairs"], summary["density"]) == (3, 2, 0.75)


def test_movie_without_title_is_a_note_on_the_terminal_not_an_error(tmp_path, capsys):
    sets = ml_csv(tmp_path / "ml", ["1,1,4.0,10", "1,2,4.0,11", "1,3,4.0,12", "2,1,4.0,13", "2,2,4.0,14"],
                  ["1,Heat (1995),Action", "2,,Comedy", "3, ,Comedy"])
    args = [*sets, "--set", "data.kcore=0", "--set", "partition.method=user", "--set", "split.method=per-user"]
    note = ("2 items have no title and are named by their id instead ('item 2', ...); the first is at "
            f"{tmp_path / 'ml' / 'movies.csv'}:3")
    assert main(["data", "stats", "--quiet", *args]) == 0
    out, err = capsys.readouterr()
    assert f"note           {note}" in out.splitlines() and err == ""  # once, in the summary
    # `fellrec run` starts from the same prepare(), which prints the notes on stderr
    from fellrec.config import load_config
    from fellrec.pipeline import prepare

    p = prepare(load_config(None, [a for a in args if a != "--set"]))
    assert capsys.readouterr().err == f"fellrec: note: {note}\n"
    assert p.dataset.items.title.tolist() == ["Heat (1995)", "item 2", "item 3"]


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
