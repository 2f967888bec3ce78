"""A local Flower deployment (one SuperLink, one SuperNode per client, all on 127.0.0.1), and
submitting a fellrec run to a SuperLink and judging it.

Every process gets its own ``FLWR_HOME`` under the deployment's folder, its own process group and
its own log file; update checks and telemetry are off. The SuperLink runs with
``--disable-runtime-dependency-installation``: the app's code is fellrec, installed beside Flower.

A run is judged by the status the SuperLink recorded (``flwr ls``), never by ``flwr run``'s exit
code, which is 0 even when the ServerApp raised.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parent / "app"
CONNECTION = "fellrec-local"


def flower_bin(name: str) -> str:
    """A Flower command of this Python's environment (``flwr``, ``flower-superlink``, ...)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def flower_env(home: Path) -> dict[str, str]:
    """The environment of a Flower process: its own FLWR_HOME, no update check, no telemetry, and this
    Python's bin folder first on PATH (the SuperLink and SuperNodes start ``flower-superexec`` by name)."""
    Path(home).mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0",
                PATH=path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            return r.status == 200
    except OSError:
        return False


def _wait(ready, timeout_s: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{what} exited with code {proc.returncode}; its log {log} ends:\n{tail}")
        if ready():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s; see {log}")


def write_connection(cli_home: Path, address: str, name: str = CONNECTION) -> Path:
    """The flwr CLI's config.toml with one insecure connection, ``name``, the default."""
    cli_home.mkdir(parents=True, exist_ok=True)
    path = cli_home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\ninsecure = true\n',
                    encoding="utf-8")
    return path


class LocalDeployment:
    """A SuperLink and ``clients`` SuperNodes on 127.0.0.1 under ``home`` (a context manager).

    SuperNode i runs with ``--node-config "client-id=i state-dir=<home>/node-i/state"``: fellrec's
    client i, with its private state in that folder.
    """

    def __init__(self, home: str | Path, clients: int, *, port: int | None = None):
        self.home = Path(home).resolve()
        self.clients = clients
        self.port = port or free_port()
        self.link: subprocess.Popen | None = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self._logs: list[Any] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def cli_home(self) -> Path:
        return self.home / "cli"

    def log_path(self, name: str) -> Path:
        return self.home / f"{name}.log"

    def _spawn(self, name: str, cmd: list[str], flwr_home: Path) -> subprocess.Popen:
        log = open(self.log_path(name), "ab")  # noqa: SIM115 (closed in stop)
        self._logs.append(log)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=flower_env(flwr_home),
                                process_group=0)

    def start(self) -> LocalDeployment:
        self.home.mkdir(parents=True, exist_ok=True)
        self.link = self._spawn("superlink", [flower_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                              "--port", str(self.port), "--disable-runtime-dependency-installation"],
                                self.home / "superlink")
        _wait(lambda: _healthy(f"http://{self.address}/health"), 60, "flower-superlink", self.link,
              self.log_path("superlink"))
        for i in range(self.clients):
            self.start_node(i, wait=False)
        for i in range(self.clients):
            self.wait_node(i)
        write_connection(self.cli_home, self.address)
        return self

    def node_state(self, i: int) -> Path:
        return self.home / f"node-{i}" / "state"

    def start_node(self, i: int, wait: bool = True) -> subprocess.Popen:
        log = self.log_path(f"node-{i}")
        if log.exists():
            log.rename(log.with_suffix(f".{int(time.time() * 1000)}.log"))  # keep the old life's log apart
        config = f'client-id={i} state-dir="{self.node_state(i)}"'
        self.nodes[i] = self._spawn(f"node-{i}", [flower_bin("flower-supernode"), "--insecure", "--superlink",
                                                  self.address, "--node-config", config, "--host", "127.0.0.1",
                                                  "--port", str(free_port())], self.home / f"node-{i}")
        if wait:
            self.wait_node(i)
        return self.nodes[i]

    def wait_node(self, i: int) -> None:
        log = self.log_path(f"node-{i}")
        _wait(lambda: log.exists() and "SuperNode ID" in log.read_text(errors="replace"), 60,
              f"flower-supernode {i}", self.nodes[i], log)

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Stop SuperNode i at once (SIGKILL: as in a crash), with the processes it started."""
        proc = self.nodes[i]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait()

    def stop(self) -> None:
        procs = [*self.nodes.values(), *([self.link] if self.link else [])]  # SuperNodes first
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # whatever it left behind (superexec, clientapp)
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- runs -----------------------------------------------------------------------------------


class RunFailed(RuntimeError):
    pass


def flwr(cli_home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([flower_bin("flwr"), *args], env=flower_env(cli_home), capture_output=True, text=True,
                          timeout=timeout)


def submit(cli_home: Path, connection: str, run_config: dict[str, Any], config_file: Path,
           federation_config: str | None = None) -> int:
    """Start fellrec's app on the SuperLink of ``connection``; returns the run id at once.

    ``run_config`` goes through a TOML file (``config_file``): the fellrec config is many lines of
    YAML. ``federation_config`` is passed on as ``flwr run --federation-config`` (simulation).
    """
    import tomli_w

    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(tomli_w.dumps(run_config), encoding="utf-8")
    extra = ["--federation-config", federation_config] if federation_config else []
    r = flwr(cli_home, "run", str(APP_DIR), connection, "--format", "json", "--run-config", str(config_file),
             *extra)
    try:
        return int(json.loads(r.stdout)["run-id"])
    except (ValueError, KeyError, TypeError):
        raise RunFailed(f"flwr run did not start the run (exit {r.returncode}): "
                        f"{(r.stdout + r.stderr).strip()[-1500:]}") from None


def status(cli_home: Path, connection: str, run_id: int) -> dict[str, Any]:
    """The SuperLink's record of the run: ``status`` (pending, running, finished:completed, ...) and more."""
    r = flwr(cli_home, "ls", connection, "--run-id", str(run_id), "--format", "json")
    try:
        return json.loads(r.stdout)["runs"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise RunFailed(f"flwr ls: no record of run {run_id}: {(r.stdout + r.stderr).strip()[-500:]}") from None


def wait_run(cli_home: Path, connection: str, run_id: int, *, timeout_s: float, poll_s: float = 3.0,
             on_poll=None) -> dict[str, Any]:
    """Poll until the run has finished; raises RunFailed unless it finished:completed."""
    end = time.monotonic() + timeout_s
    while True:
        run = status(cli_home, connection, run_id)
        if str(run["status"]).startswith("finished"):
            break
        if on_poll is not None:
            on_poll(run)
        if time.monotonic() > end:
            flwr(cli_home, "stop", str(run_id), connection)
            raise RunFailed(f"run {run_id} still {run['status']} after {timeout_s:.0f} s; stopped it")
        time.sleep(poll_s)
    if run["status"] != "finished:completed":
        logs = flwr(cli_home, "log", str(run_id), connection, "--show").stdout
        raise RunFailed(f"run {run_id} {run['status']}: {run.get('status-details', '')}\n{logs[-3000:]}")
    return run
