"""fellrec on real Flower processes: a local deployment (one SuperLink and three SuperNodes on
127.0.0.1) and Flower's simulation engine (Ray, the ``simulation`` extra). Each run is submitted with
``flwr run``, judged by the status the SuperLink recorded, and must equal the embedded run. The
shared deployment runs with TLS and SuperNode authentication (certificates and keys made in the
test), so every run on it is a run over TLS by registered SuperNodes; the deployment whose SuperNode
is killed and restarted is insecure, so both kinds are run.

These tests wait on Flower's latency (a process per ClientApp message, 3 s SuperNode polling) more
than they compute, so they live apart from the in-process tests of tests/runtime/flower/test_flower.py: pytest-xdist
runs this file beside the others.
"""

import importlib.util
import json
import os
import time

import psutil
import pytest
from test_flower import SPLIT, THREE, assert_same_run, embedded_runs, embedded_split_run, flower_run

from fellrec.cli import main
from fellrec.config import load_config
from fellrec.run import run
from fellrec.runtime.flower import deploy
from fellrec.runtime.flower.state import ClientState


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))  # the SuperLink's: the ServerApp's and ClientApps'


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return embedded_runs(tmp_path_factory.mktemp("embedded"))


@pytest.fixture(scope="module")
def embedded_split(tmp_path_factory):
    return embedded_split_run(tmp_path_factory.mktemp("embedded-split"), SPLIT)


# ---- a local deployment --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    home = tmp_path_factory.mktemp("flower")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FELLREC_CACHE", str(home / "cache"))  # the SuperNodes' environment
        with deploy.LocalDeployment(home, 3, tls=True, auth=True) as dep:
            yield dep


def test_the_deployment_serves_tls_with_a_certificate_for_loopback(deployment):
    import ipaddress
    import socket
    import ssl

    from cryptography import x509

    ca = x509.load_pem_x509_certificate(deployment.certificates.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(deployment.certificates.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    host, port = deployment.address.split(":")
    context = ssl.create_default_context(cafile=str(deployment.certificates.ca))
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:  # the handshake checks the chain and the name
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        served = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    assert served == cert
    with socket.create_connection((host, int(port)), timeout=5) as raw, pytest.raises(ssl.SSLError):
        ssl.create_default_context().wrap_socket(raw, server_hostname=host)  # not trusted without our CA
    toml = (deployment.cli_home / "config.toml").read_text()
    assert f'root-certificates = "{deployment.certificates.ca}"' in toml and "insecure" not in toml


@pytest.mark.slow
def test_an_unregistered_supernode_is_refused(deployment):
    """SuperNode 9 has a key pair but its public key was never registered: the SuperLink refuses to
    activate it and it exits, while the registered SuperNodes stay connected (the runs of the tests
    around this one)."""
    proc = deployment.start_node(9, wait=False)
    try:
        assert proc.wait(timeout=120) != 0
    finally:
        deployment.kill_node(9)
        del deployment.nodes[9]
    assert "Failed to activate SuperNode" in deployment.log_path("node-9").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in deployment.log_path("superlink").read_text(
        errors="replace")
    assert all(p.poll() is None for p in deployment.nodes.values())


def test_authentication_needs_tls(tmp_path):
    with pytest.raises(ValueError, match="SuperNode authentication needs TLS"):
        deploy.LocalDeployment(tmp_path, 1, auth=True)


@pytest.mark.slow
def test_a_real_deployment_reproduces_the_embedded_fellrec_run(deployment, embedded, tmp_path):
    """FELLRec here; FedAvg on a real deployment is the next test's run (with a SuperNode killed)."""
    algorithm = "fellrec"
    cfg = load_config(None, [*THREE, f"train.algorithm={algorithm}", f"name={algorithm}"])
    record = flower_run(deployment, cfg, tmp_path / "run")
    assert record["status"] == "finished:completed"
    assert_same_run(tmp_path / "run", embedded[algorithm])
    # every message went to its client's worker (fellrec flower up's default), one worker per client
    rows = [json.loads(x) for x in (tmp_path / "run" / "messages.jsonl").read_text().splitlines()]
    # setup, two rounds of training (round 2's carrying round 1's validation), round 2's validation, test
    assert len(rows) == 3 + 6 + 3 + 3 and all(r["worker"] > 0 for r in rows)
    assert {c: len({r["worker"] for r in rows if r["client"] == c}) for c in "012"} == dict.fromkeys("012", 1)
    # a ClientApp process per message, created after the message was sent
    assert all(r["pushed"] < r["created"] < r["called"] <= r["returned"] < r["pulled"] for r in rows)


@pytest.mark.slow
def test_a_supernode_killed_mid_run_comes_back_and_the_run_finishes(tmp_path, embedded):
    cfg = load_config(None, [*THREE, "train.algorithm=fedavg", "name=fedavg"])
    with deploy.LocalDeployment(tmp_path / "flower", 3) as dep:  # its own: this test restarts a node
        log = dep.log_path("node-1")
        killed = []

        def kill_in_round_one(_run):
            # whoami, setup, then the first training message: kill the SuperNode while it trains
            if not killed and log.read_text(errors="replace").count("Start `flwr-clientapp` process") >= 3:
                time.sleep(1.0)
                dep.kill_node(1)
                dep.start_node(1)
                killed.append(True)

        record = flower_run(dep, cfg, tmp_path / "run", on_poll=kill_in_round_one)
    assert killed and record["status"] == "finished:completed"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    lives = sorted(p.name for p in (tmp_path / "flower").glob("node-1*.log"))
    starts = [p.read_text(errors="replace").count("Start `flwr-clientapp` process")
              for p in sorted((tmp_path / "flower").glob("node-1*.log"))]
    story = f"(node-1 logs {lives}, ClientApps started {starts}, runtime {results['runtime']})"
    assert results["runtime"]["messages_resent"] >= 1, story
    # the client's worker died with its SuperNode's process group, and the message sent again started another
    lives = (tmp_path / "flower" / "node-1" / "state" / "worker-client-1.log").read_text().count("listening on")
    assert lives == 2, story
    # client 1's state survived: each round's files, the selected round, the adapter its test used
    state = next((tmp_path / "flower" / "node-1" / "state").glob("fedavg-*/client-1"))
    names = sorted(p.name for p in state.iterdir())
    assert names == ["adapter.safetensors", "data.pkl", "state-1-0.safetensors", "state-1-1.safetensors",
                     "state-2-0.safetensors", "state-2-1.safetensors"], story
    expected = json.loads((embedded["fedavg"] / "results.json").read_text())["best_round"]["1"]
    assert ClientState(state).before(2, 2)[1]["best_round"] == expected, story
    try:
        assert_same_run(tmp_path / "run", embedded["fedavg"])
    except AssertionError as err:
        raise AssertionError(f"{err} {story}") from None


@pytest.mark.slow
def test_a_real_deployment_runs_split_mode_as_the_embedded_split_run(deployment, embedded_split, tmp_path):
    record = flower_run(deployment, load_config(None, SPLIT), tmp_path / "run")
    assert record["status"] == "finished:completed"
    assert_same_run(tmp_path / "run", embedded_split)


# ---- Flower's simulation engine ----------------------------------------------------------------------


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


def test_flower_up_refuses_worker_options_in_a_simulation_and_bad_threads(tmp_path, capsys):
    home = tmp_path / "f"
    assert main(["flower", "up", "--clients", "2", "--simulation", "--no-worker", "--home", str(home)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fellrec: error: --threads, --no-worker: for a deployment") and "\n" not in err
    assert main(["flower", "up", "--clients", "2", "--threads", "0", "--home", str(home)]) == 2
    assert "--threads: need at least 1, got 0" in capsys.readouterr().err
    assert not home.exists()


def test_simulation_without_ray_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    sets = [x for s in THREE for x in ("--set", s)]
    assert main(["flower", "run", "--simulation", "--home", str(tmp_path / "f"), *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fellrec: error: ") and "pip install -e '.[simulation]'" in err and "\n" not in err
    assert not (tmp_path / "f").exists()


@pytest.mark.slow
def test_flower_up_with_tls_and_auth_starts_a_secured_deployment_and_stops_on_ctrl_c(tmp_path):
    """`fellrec flower up --tls --auth` as a user runs it: it makes the certificates and keys, registers
    its SuperNodes, writes a TLS connection for `fellrec flower run`, and Ctrl-C stops every process."""
    import signal
    import subprocess
    import sys

    home = tmp_path / "flower"
    env = {**os.environ, "FELLREC_CACHE": str(tmp_path / "cache")}
    # SIGINT as in a terminal: a suite started in the background (`cmd &`) ignores it, and children inherit that
    proc = subprocess.Popen([sys.executable, "-m", "fellrec", "flower", "up", "--clients", "2", "--tls", "--auth",
                             "--home", str(home)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C stops"):
                break
        text = "".join(lines)
        assert "TLS: the SuperLink's certificate is signed by" in text
        assert "only the 2 registered SuperNodes may connect" in text
        toml = (home / "cli" / "config.toml").read_text()
        assert f'root-certificates = "{home.resolve() / "security" / "ca.crt"}"' in toml
        link = (home / "superlink.log").read_text(errors="replace")
        assert link.count("[ControlServicer.RegisterNode] Created node_id") == 2
        assert link.count("[Fleet.ActivateNode] Activated node_id") == 2
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "stopping the deployment" in rest
    time.sleep(1)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
