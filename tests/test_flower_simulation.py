"""fellrec on Flower's simulation engine (Ray, the ``simulation`` extra): the same ServerApp and
ClientApp, the clients run as virtual SuperNodes in Ray actors. A simulated run must equal the embedded
run, as a run on real SuperNodes does (tests/test_flower.py).
"""

import importlib.util
import os

import psutil
import pytest

from fellrec.cli import main
from fellrec.config import load_config
from fellrec.run import run
from fellrec.runtime.flower import deploy
from test_flower import THREE, assert_same_run, flower_run


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))  # the SuperLink's, so the ClientApps' too


def started_under(root) -> list[psutil.Process]:
    """Processes whose FLWR_HOME is under ``root``: the SuperLink and all it started, Ray's included."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("FLWR_HOME", "").startswith(str(root)):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_a_simulated_run_reproduces_the_embedded_run(tmp_path):
    pytest.importorskip("ray")
    cfg = load_config(None, [*THREE, "train.algorithm=fedavg", "name=fedavg"])
    expected = run(cfg, tmp_path / "embedded", progress=False)
    with deploy.SimulationDeployment(tmp_path / "sim", 3) as dep:
        record = flower_run(dep, cfg, tmp_path / "run", timeout_s=600)
    assert record["status"] == "finished:completed"
    assert_same_run(tmp_path / "run", expected)
    # virtual SuperNode i (node config partition-id=i) was client i, its state in $FELLREC_CACHE/flower-state
    (folder,) = (tmp_path / "cache" / "flower-state").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["client-0", "client-1", "client-2"]
    assert list((tmp_path / "sim" / "ray" / "ray").glob("session_*/logs"))  # Ray's files in the deployment's home
    assert not started_under(tmp_path)


def test_simulation_without_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    sets = [x for s in THREE for x in ("--set", s)]
    assert main(["flower", "run", "--simulation", "--home", str(tmp_path / "f"), *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fellrec: error: ") and "pip install -e '.[simulation]'" in err and "\n" not in err
    assert not (tmp_path / "f").exists()
