"""The scripts in experiments/ that docs/RESULTS.md's tables come from."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(root: Path, name: str, clients: dict[str, float], overall: float) -> Path:
    out = root / name
    out.mkdir()
    results = {"overall": {"recall@10": overall}, "client_names": {"0": "cluster-0", "1": "cluster-1"},
               "clients": {c: {"recall@10": v, "n": 10 + int(c)} for c, v in clients.items()},
               "intervals": {"overall": {}, "clients": {}}}
    (out / "results.json").write_text(json.dumps(results))
    return out


def test_per_client_over_seeds_gives_each_clients_mean_and_std_over_the_seeds(tmp_path, capsys):
    runs = [write_run(tmp_path, "x-s1-fedavg", {"0": 0.1, "1": 0.3}, 0.2),
            write_run(tmp_path, "x-s2-fedavg", {"0": 0.2, "1": 0.5}, 0.4),
            write_run(tmp_path, "x-s1-fellrec", {"0": 0.4, "1": 0.6}, 0.5)]
    assert load("per_client").main([*map(str, runs), "--metrics", "recall@10", "--over-seeds"]) == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["client", "test users", "metric", "x-s*-fedavg (2 seeds)", "x-s*-fellrec (1 seed)"]
    # cluster-0: mean of 0.1 and 0.2, sample std sqrt(0.005) = 0.0707; one seed has no std
    assert rows[2] == ["cluster-0", "10", "recall@10", "0.1500 ± 0.0707", "0.4000"]
    assert rows[3] == ["cluster-1", "11", "recall@10", "0.4000 ± 0.1414", "0.6000"]
    assert rows[4] == ["overall", "21", "recall@10", "0.3000 ± 0.1414", "0.5000"]
