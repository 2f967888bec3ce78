"""fellrec.report on hand-written run directories (3 clients, 3 rounds, known numbers)."""

import json
import math

import pytest
import yaml

from fellrec.errors import FellrecError
from fellrec.report import compare, fmt, format_compare, human_bytes, load_run, write_report

NAMES = {"0": "north", "1": "south", "2": "east"}
# client -> round -> training loss; client -> round -> validation recall@10 (all different)
LOSSES = {"0": [7.0, 6.5, 6.1], "1": [6.0, 5.0, 4.6], "2": [5.0, 4.9, 4.2]}
VALID = {"0": [0.010, 0.020, 0.040], "1": [0.030, 0.090, 0.080], "2": [0.050, 0.060, 0.070]}
UP, DOWN = {"0": 1_000_000, "1": 2_000_000, "2": 3_000_000}, {"0": 4_000_000, "1": 5_000_000, "2": 6_000_000}

RUN_A = {
    "name": "alpha-fedavg", "algorithm": "fedavg", "backbone": "ranker",
    "overall": {"recall@10": 0.1234, "recall@20": 0.2345, "ndcg@10": 0.0567, "ndcg@20": 0.0789},
    "clients": {"0": {"recall@10": 0.1111, "recall@20": 0.2011, "ndcg@10": 0.0511, "ndcg@20": 0.0611, "n": 17},
                "1": {"recall@10": 0.2222, "recall@20": 0.3022, "ndcg@10": 0.0822, "ndcg@20": 0.0922, "n": 23},
                "2": {"recall@10": 0.0333, "recall@20": 0.1033, "ndcg@10": 0.0133, "ndcg@20": 0.0233, "n": 31}},
    "best_round": {"0": 3, "1": 2, "2": 1},
    "std": 0.0777, "max_min_ratio": 6.6727, "time_s": 754.0,
}
RUN_B = {
    "name": "beta-fedprox", "algorithm": "fedprox", "backbone": "bigrec",
    "overall": {"recall@10": 0.3456, "recall@20": 0.4567, "ndcg@10": 0.1678, "ndcg@20": 0.1789},
    "clients": {"0": {"recall@10": 0.3101, "recall@20": 0.4101, "ndcg@10": 0.1101, "ndcg@20": 0.1201, "n": 17},
                "1": {"recall@10": 0.4202, "recall@20": 0.5202, "ndcg@10": 0.2202, "ndcg@20": 0.2302, "n": 23},
                "2": {"recall@10": 0.2903, "recall@20": 0.3903, "ndcg@10": 0.1903, "ndcg@20": 0.2003, "n": 31}},
    "best_round": {"0": 1, "1": 3, "2": 3},
    "std": 0.0567, "max_min_ratio": 1.4475, "time_s": 42.5,
}


def round_record(r: int) -> dict:
    valid = {c: {"recall@10": VALID[c][r - 1] if r else 0.0, "loss": 9.0 - r} for c in NAMES}
    if r == 0:
        return {"round": 0, "time_s": 0.5, "valid": valid}
    return {"round": r, "time_s": 10.0 * r, "clients": [0, 1, 2],
            "train": {c: {"loss": LOSSES[c][r - 1], "steps": 5, "examples": 40} for c in NAMES},
            "bytes_up": dict(UP), "bytes_down": dict(DOWN), "valid": valid}


def make_run(root, spec: dict, scale: int = 1):
    """A finished run directory; ``scale`` multiplies the bytes so that runs differ."""
    out = root / spec["name"]
    out.mkdir()
    config = {"name": spec["name"], "train": {"algorithm": spec["algorithm"], "rounds": 3, "local_steps": 5},
              "model": {"backbone": spec["backbone"]}, "eval": {"ks": [10, 20]}}
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [json.dumps({"event": "start"})] + [json.dumps(round_record(r)) for r in range(4)]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    per_client = {c: {"bytes_up": 3 * UP[c] * scale, "bytes_down": 3 * DOWN[c] * scale} for c in NAMES}
    r10 = [v["recall@10"] for v in spec["clients"].values()]
    imbalance = {"recall@10": {"std": spec["std"], "min": min(r10), "max": max(r10),
                               "max_min_ratio": spec["max_min_ratio"], "cv": 0.5, "gini": None}}
    results = {
        "name": spec["name"], "algorithm": spec["algorithm"], "backbone": spec["backbone"], "dataset": "ml-1m",
        "overall": spec["overall"], "clients": spec["clients"], "client_names": NAMES, "imbalance": imbalance,
        "communication": {"bytes_up": sum(p["bytes_up"] for p in per_client.values()),
                          "bytes_down": sum(p["bytes_down"] for p in per_client.values()), "per_client": per_client},
        "time_s": spec["time_s"], "rounds": 3, "select_by": "recall@10", "best_round": spec["best_round"],
        "samples": {"train": 1000, "valid": 100, "test": 71},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return out


def table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]


def test_load_run(tmp_path):
    run = load_run(make_run(tmp_path, RUN_A))
    assert run.name == "alpha-fedavg"
    assert run.config["train"]["algorithm"] == "fedavg"
    assert [r["round"] for r in run.rounds] == [0, 1, 2, 3]  # the line without "round" is ignored
    assert run.results["overall"]["recall@10"] == 0.1234


def test_report_contents(tmp_path):
    out = write_report(make_run(tmp_path, RUN_A))
    assert out == tmp_path / "alpha-fedavg" / "report.md"
    text = out.read_text()
    assert "# Run alpha-fedavg" in text
    assert "fedavg" in text and "ranker" in text and "ml-1m" in text and "12 min 34 s" in text
    # bytes: up 3 rounds × (1+2+3) MB = 18.0 MB, down 3 × (4+5+6) MB = 45.0 MB
    assert "bytes up **18.0 MB**" in text and "bytes down **45.0 MB**" in text
    rows = table_rows(text)
    assert ["", "R@10", "R@20", "N@10", "N@20"] in rows
    assert ["mean", "0.1234", "0.2345", "0.0567", "0.0789"] in rows
    assert "(no intervals: this run was made before fellrec wrote them)" in text
    # per client: id, name, n, R@10, R@20, N@10, N@20, R@10 interval, best round, bytes up, bytes down
    assert ["0", "north", "17", "0.1111", "0.2011", "0.0511", "0.0611", "-", "3", "3.0 MB", "12.0 MB"] in rows
    assert ["1", "south", "23", "0.2222", "0.3022", "0.0822", "0.0922", "-", "2", "6.0 MB", "15.0 MB"] in rows
    assert ["2", "east", "31", "0.0333", "0.1033", "0.0133", "0.0233", "-", "1", "9.0 MB", "18.0 MB"] in rows
    # imbalance: std, min, max, max/min, cv, gini (None -> "-")
    assert ["R@10", "0.0777", "0.0333", "0.2222", "6.6727", "0.5000", "-"] in rows
    # rounds: round, clients trained, mean train loss, mean valid recall@10, cumulative bytes (21 MB per round)
    assert ["0", "0", "-", "0.0000", "0 B"] in rows
    assert ["1", "3", "6.0000", "0.0300", "21.0 MB"] in rows
    assert ["2", "3", "5.4667", "0.0567", "42.0 MB"] in rows
    assert ["3", "3", "4.9667", "0.0633", "63.0 MB"] in rows
    for name in ("clients", "learning", "convergence", "imbalance"):
        assert f"](plots/{name}.png)" in text


def test_plots_are_pngs(tmp_path):
    run_dir = make_run(tmp_path, RUN_A)
    write_report(run_dir)
    for name in ("clients", "learning", "convergence", "imbalance"):
        data = (run_dir / "plots" / f"{name}.png").read_bytes()
        assert data[:4] == b"\x89PNG"
        assert len(data) > 5000
    assert not [p for p in run_dir.rglob(".*")]  # no temporary file left behind


def test_imbalance_plot_needs_two_validated_clients(tmp_path):
    run_dir = make_run(tmp_path, RUN_A)
    lines = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "valid" in record:
            record["valid"] = {"1": record["valid"]["1"]}
        lines.append(json.dumps(record))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    text = write_report(run_dir).read_text()
    assert not (run_dir / "plots" / "imbalance.png").exists()
    assert (run_dir / "plots" / "convergence.png").exists()
    assert "plots/imbalance.png" not in text


def test_bad_metrics_line_names_file_and_line(tmp_path):
    run_dir = make_run(tmp_path, RUN_A)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[2] = '{"round": 2, "train": '
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(FellrecError, match=r"metrics\.jsonl:3: not valid JSON"):
        write_report(run_dir)
    assert not (run_dir / "report.md").exists()


def test_unfinished_run(tmp_path):
    run_dir = make_run(tmp_path, RUN_A)
    (run_dir / "results.json").unlink()
    with pytest.raises(FellrecError, match=r"results\.json: missing: the run is unfinished"):
        load_run(run_dir)
    with pytest.raises(FellrecError, match="no such run directory"):
        load_run(tmp_path / "nowhere")


def test_bad_results_json(tmp_path):
    run_dir = make_run(tmp_path, RUN_A)
    (run_dir / "results.json").write_text('{\n"name": "x",\n oops}')
    with pytest.raises(FellrecError, match=r"results\.json:3: not valid JSON"):
        load_run(run_dir)


def test_compare(tmp_path):
    a, b = make_run(tmp_path, RUN_A), make_run(tmp_path, RUN_B, scale=2)
    text, png = compare([a, b], out_dir=tmp_path / "cmp")
    rows = table_rows(text)
    assert ["run", "algorithm", "backbone", "users", "R@10", "R@20", "N@10", "N@20", "R@10 95% CI", "std R@10",
            "max/min R@10", "bytes up+down", "time"] in rows
    assert ["alpha-fedavg", "fedavg", "ranker", "71", "0.1234", "0.2345", "0.0567", "0.0789", "-", "0.0777",
            "6.6727", "63.0 MB", "12 min 34 s"] in rows
    assert ["beta-fedprox", "fedprox", "bigrec", "71", "0.3456", "0.4567", "0.1678", "0.1789", "-", "0.0567",
            "1.4475", "126.0 MB", "42.5 s"] in rows
    assert "Paired differences" not in text  # neither run has per-user results
    assert ["client", "alpha-fedavg", "beta-fedprox"] in rows
    assert ["north", "0.1111", "0.3101"] in rows
    assert ["south", "0.2222", "0.4202"] in rows
    assert ["east", "0.0333", "0.2903"] in rows
    assert ["overall", "0.1234", "0.3456"] in rows
    assert png == tmp_path / "cmp" / "compare.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert (tmp_path / "cmp" / "compare.md").read_text().startswith(text.rstrip("\n").split("\n")[0])


def test_compare_without_out_dir_writes_nothing(tmp_path):
    a, b = make_run(tmp_path, RUN_A), make_run(tmp_path, RUN_B)
    before = sorted(tmp_path.rglob("*"))
    text, png = compare([a, b])
    assert png is None and "beta-fedprox" in text
    assert sorted(tmp_path.rglob("*")) == before


def test_format_compare_is_plain_text(tmp_path):
    runs = [load_run(make_run(tmp_path, RUN_A)), load_run(make_run(tmp_path, RUN_B))]
    text = format_compare(runs)
    assert "|" not in text
    lines = text.splitlines()
    alpha = next(line for line in lines if line.startswith("alpha-fedavg"))
    assert alpha.split()[:8] == ["alpha-fedavg", "fedavg", "ranker", "71", "0.1234", "0.2345", "0.0567", "0.0789"]
    assert next(line for line in lines if line.startswith("south")).split() == ["south", "0.2222", "0.4202"]
    first = lines[:lines.index("")]
    assert len(first) == 4 and len({len(line) for line in first}) == 1  # header, rule, 2 runs: aligned


@pytest.mark.parametrize(("value", "text"), [(None, "-"), (math.nan, "-"), (0.12344, "0.1234"), (3, "3")])
def test_fmt(value, text):
    assert fmt(value) == text


@pytest.mark.parametrize(("n", "text"), [(None, "-"), (999, "999 B"), (12_345, "12.3 kB"), (12_300_000, "12.3 MB"),
                                         (4_560_000_000, "4.6 GB")])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


def write_users(out, values: dict[int, float], client_of=lambda u: u % 3):
    lines = ["user,client,recall@10,ndcg@10"]
    lines += [f"{u},{client_of(u)},{v!r},{v / 2!r}" for u, v in values.items()]
    (out / "test_users.csv").write_text("\n".join(lines) + "\n")


def test_compare_gives_paired_differences_on_the_users_both_runs_tested(tmp_path):
    import numpy as np

    from fellrec.stats import paired_difference

    rng = np.random.default_rng(0)
    a_vals = {u: float(rng.random() < 0.3) for u in range(300)}
    b_vals = {u: float(rng.random() < 0.1) for u in range(20, 320)}  # 280 users in common
    a, b = make_run(tmp_path, RUN_A), make_run(tmp_path, RUN_B)
    write_users(a, a_vals)
    write_users(b, b_vals)
    text, _ = compare([a, b])
    rows = table_rows(text.split("## Paired differences")[1].split("##")[0])
    assert rows[0][:4] == ["A", "B", "users", "R@10 A − B"]
    want = paired_difference(a_vals, b_vals)
    assert want.n == 280 and want.significant
    assert rows[2][:6] == ["alpha-fedavg", "beta-fedprox", "280", f"{want.mean:+.4f}",
                           f"[{want.low:.4f}, {want.high:.4f}]", "*"]
    half = paired_difference({u: v / 2 for u, v in a_vals.items()}, {u: v / 2 for u, v in b_vals.items()})
    assert rows[2][6] == f"{half.mean:+.4f}"
    # a run on another test set (other data) is not paired with them
    c = make_run(tmp_path, {**RUN_B, "name": "gamma-other"})
    config = yaml.safe_load((c / "config.yaml").read_text())
    (c / "config.yaml").write_text(yaml.safe_dump({**config, "data": {"format": "ml-1m"}}))
    write_users(c, b_vals)
    text, _ = compare([a, b, c])
    rows = table_rows(text.split("## Paired differences")[1].split("##")[0])
    assert [r[:2] for r in rows[2:]] == [["alpha-fedavg", "beta-fedprox"]]


def test_compare_summarises_runs_that_differ_only_in_seed(tmp_path):
    runs = []
    for i, (seed, r10) in enumerate([(1, 0.10), (2, 0.14), (3, 0.12)]):
        out = make_run(tmp_path, {**RUN_A, "name": f"s{i}", "overall": {**RUN_A["overall"], "recall@10": r10}})
        config = yaml.safe_load((out / "config.yaml").read_text())
        (out / "config.yaml").write_text(yaml.safe_dump({**config, "name": f"s{i}", "seed": seed}))
        runs.append(out)
    runs.append(make_run(tmp_path, RUN_B))  # another algorithm: not grouped
    text, _ = compare(runs)
    rows = table_rows(text.split("## Over seeds")[1].split("##")[0])
    header, row = rows[0], rows[2]
    assert len(rows) == 3 and row[:3] == ["s0 (+2)", "fedavg", "1, 2, 3"]
    assert row[header.index("R@10")] == "0.1200 ± 0.0200"
    assert header[-4:] == ["std R@10", "min R@10", "max/min R@10", "gini R@10"]  # the spread across clients
    assert row[-4] == f"{RUN_A['std']:.4f} ± 0.0000" and row[-1] == "-"  # these runs have no Gini


def test_compare_pairs_seed_groups_seed_by_seed(tmp_path):
    import numpy as np

    from fellrec.stats import paired_difference

    rng = np.random.default_rng(3)
    values = {}
    for spec, p in ((RUN_A, 0.3), (RUN_B, 0.2)):
        for seed in (7, 8, 9):
            name = f"{spec['name']}-s{seed}"
            out = make_run(tmp_path, {**spec, "name": name})
            config = yaml.safe_load((out / "config.yaml").read_text())
            (out / "config.yaml").write_text(yaml.safe_dump({**config, "name": name, "seed": seed}))
            values[spec["algorithm"], seed] = {u: float(rng.random() < p) for u in range(200)}
            write_users(out, values[spec["algorithm"], seed])
    text, _ = compare(sorted(tmp_path.iterdir()))
    assert "## Paired differences on the same test users" not in text  # every pair is within the seed groups
    rows = table_rows(text.split("## Paired differences over seeds")[1].split("##")[0])
    assert rows[0][:10] == ["A", "B", "seeds", "users", "R@10 A − B", "95% CI", "", "seeds", "t CI over seeds", ""]
    a_mean = {u: np.mean([values["fedavg", s][u] for s in (7, 8, 9)]) for u in range(200)}
    b_mean = {u: np.mean([values["fedprox", s][u] for s in (7, 8, 9)]) for u in range(200)}
    want = paired_difference(a_mean, b_mean)  # the mean of differences is the difference of means
    each = [np.mean([values["fedavg", s][u] - values["fedprox", s][u] for u in range(200)]) for s in (7, 8, 9)]
    assert rows[2][:8] == ["alpha-fedavg-s*", "beta-fedprox-s*", "3", "200", f"{want.mean:+.4f}",
                           f"[{want.low:.4f}, {want.high:.4f}]", "*" if want.significant else "",
                           f"{min(each):+.4f} to {max(each):+.4f}"]
    half = 4.302653 * np.std(each, ddof=1) / np.sqrt(3)  # Student's t over the 3 seeds, 2 df
    assert rows[2][8] == f"[{np.mean(each) - half:.4f}, {np.mean(each) + half:.4f}]"
    assert rows[2][9] == ("*" if abs(np.mean(each)) > half else "")


def test_compare_pairs_the_spread_across_clients_seed_by_seed(tmp_path):
    import numpy as np

    gini = {("fedavg", 7): 0.20, ("fedavg", 8): 0.14, ("fedavg", 9): 0.17, ("fedavg", 10): 0.11,
            ("fedprox", 7): 0.15, ("fedprox", 8): 0.13, ("fedprox", 9): 0.10, ("fedprox", 10): 0.12}
    for spec in (RUN_A, RUN_B):
        for seed in (7, 8, 9, 10):
            name = f"{spec['name']}-s{seed}"
            out = make_run(tmp_path, {**spec, "name": name})
            config = yaml.safe_load((out / "config.yaml").read_text())
            (out / "config.yaml").write_text(yaml.safe_dump({**config, "name": name, "seed": seed}))
            results = json.loads((out / "results.json").read_text())
            results["imbalance"]["recall@10"]["gini"] = gini[spec["algorithm"], seed]
            (out / "results.json").write_text(json.dumps(results))
    text, _ = compare(sorted(tmp_path.iterdir()))
    rows = table_rows(text.split("## Spread of recall@10 across clients")[1].split("##")[0])
    assert rows[0][:3] == ["A", "B", "seeds"] and rows[0][-4:] == ["Gini A − B", "seeds", "t CI over seeds", ""]
    (row,) = rows[2:]
    each = [gini["fedavg", s] - gini["fedprox", s] for s in (7, 8, 9, 10)]  # 0.05, 0.01, 0.07, -0.01
    half = 3.182446 * np.std(each, ddof=1) / 2  # Student's t over the 4 seeds, 3 df, from a table
    assert row[:3] == ["alpha-fedavg-s*", "beta-fedprox-s*", "4"]
    assert row[-4:] == ["+0.0300", "-0.0100 to +0.0700", f"[{0.03 - half:.4f}, {0.03 + half:.4f}]", ""]
    # the std and minimum are the same in every seed of either run: their differences, without spread
    std = RUN_A["std"] - RUN_B["std"]
    assert row[3:7] == [f"{std:+.4f}", f"{std:+.4f} to {std:+.4f}", f"[{std:.4f}, {std:.4f}]", "*"]


def test_report_shows_intervals_and_warnings(tmp_path):
    out = make_run(tmp_path, RUN_A)
    results = json.loads((out / "results.json").read_text())
    results["intervals"] = {"overall": {m: [v - 0.01, v + 0.02] for m, v in RUN_A["overall"].items()},
                            "clients": {"1": {"recall@10": [0.2, 0.25]}}}
    results["warnings"] = ["only 71 test users (temporal split): one hit moves recall@K by about 0.014"]
    (out / "results.json").write_text(json.dumps(results))
    text = (write_report(out)).read_text()
    assert "## Warnings\n\n- only 71 test users" in text
    overall = table_rows(text.split("## Overall (test)")[1].split("##")[0])
    assert overall[3][0] == "95% CI" and overall[3][overall[0].index("R@10")] == "[0.1134, 0.1434]"
    clients = table_rows(text.split("## Clients (test)")[1].split("##")[0])
    ci = clients[0].index("R@10 95% CI")
    assert [r[ci] for r in clients[2:]] == ["-", "[0.2000, 0.2500]", "-"]
    assert (out / "plots" / "learning.png").exists()


def test_runs_saved_by_versions_with_fewer_keys_still_pair(tmp_path):
    """A key added later (here data.domain_by, null by default) must not make two runs on the same data
    look like runs on different test sets."""
    import numpy as np

    rng = np.random.default_rng(1)
    a, b = make_run(tmp_path, RUN_A), make_run(tmp_path, RUN_B)
    config = yaml.safe_load((b / "config.yaml").read_text())
    (b / "config.yaml").write_text(yaml.safe_dump({**config, "data": {"domain_by": None, "domain_values": []}}))
    for out in (a, b):
        write_users(out, {u: float(rng.random() < 0.3) for u in range(50)})
    text, _ = compare([a, b])
    rows = table_rows(text.split("## Paired differences")[1].split("##")[0])
    assert [r[:3] for r in rows[2:]] == [["alpha-fedavg", "beta-fedprox", "50"]]


def test_seed_groups_with_one_seed_in_common_keep_their_run_pair(tmp_path):
    """Groups that share fewer than two seeds are not paired seed by seed, so the one pair of runs with
    the same seed stays in the run-by-run table."""
    import numpy as np

    rng = np.random.default_rng(2)
    for spec, seeds in ((RUN_A, (7, 8)), (RUN_B, (7, 9))):
        for seed in seeds:
            name = f"{spec['name']}-s{seed}"
            out = make_run(tmp_path, {**spec, "name": name})
            config = yaml.safe_load((out / "config.yaml").read_text())
            (out / "config.yaml").write_text(yaml.safe_dump({**config, "name": name, "seed": seed}))
            write_users(out, {u: float(rng.random() < 0.3) for u in range(40)})
    text, _ = compare(sorted(tmp_path.iterdir()))
    assert "## Paired differences over seeds" not in text
    rows = table_rows(text.split("## Paired differences on the same test users")[1].split("##")[0])
    pairs = {(r[0], r[1]) for r in rows[2:]}
    assert ("alpha-fedavg-s7", "beta-fedprox-s7") in pairs
    assert ("alpha-fedavg-s7", "alpha-fedavg-s8") not in pairs  # the same group: over seeds, not pairs
