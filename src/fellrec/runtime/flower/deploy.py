"""A local Flower deployment (one SuperLink, one SuperNode per client, all on 127.0.0.1), and
submitting a fellrec run to a SuperLink and judging it.

Every process gets its own ``FLWR_HOME`` under the deployment's folder, its own process group and
its own log file; update checks and telemetry are off. The SuperLink runs with
``--disable-runtime-dependency-installation``: the app's code is fellrec, installed beside Flower.

A run is judged by the status the SuperLink recorded (``flwr ls``), never by ``flwr run``'s exit
code, which is 0 even when the ServerApp raised.

With ``tls`` the SuperLink serves TLS with a certificate for 127.0.0.1 from a CA made for the
deployment, and SuperNodes and the flwr CLI trust that CA; with ``auth`` as well, only SuperNodes
whose public key was registered (``flwr supernode register``) may connect
(``fellrec.runtime.flower.security`` makes the files).

``SimulationDeployment`` is the same SuperLink with Flower's simulation engine (Ray, the
``simulation`` extra) and no SuperNode processes: the ServerApp and ClientApps are the same.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from fellrec.errors import FellrecError

APP_DIR = Path(__file__).resolve().parent / "app"
CONNECTION = "fellrec-local"
FEDERATION = "@none/default"  # the federation of a SuperLink without federation management (Flower 1.41, 1.42)
TASK_POLL_S = 1.0  # s between a SuperExec's looks for messages (Flower's default; 0.1 costs 20% of a core)


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


def _healthy(url: str, ca: Path | None = None) -> bool:
    try:
        context = None
        if ca is not None:
            import ssl

            context = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(url, timeout=0.5, context=context) as r:
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


def write_connection(cli_home: Path, address: str, name: str = CONNECTION,
                     root_certificates: Path | None = None) -> Path:
    """The flwr CLI's config.toml with one connection, ``name``, the default: insecure, or over TLS
    trusting ``root_certificates``."""
    cli_home.mkdir(parents=True, exist_ok=True)
    path = cli_home / "config.toml"
    trust = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{trust}\n',
                    encoding="utf-8")
    return path


def _groups_below(pid: int) -> set[int]:
    """The process groups of ``pid``'s descendants other than this process's group. The SuperLink's
    SuperExec starts a group of its own: the ServerApp's process, or in simulation ``flwr-simulation``
    and Ray's processes, which outlive a SuperLink stopped mid-run."""
    import psutil  # a dependency of accelerate

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return set()
    groups = set()
    for child in children:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(child.pid))
    return groups - {os.getpgid(0)}


def _end_groups(groups: set[int], grace_s: float = 5.0) -> None:
    """SIGTERM to each process group, SIGKILL to those still there after ``grace_s``."""

    def alive(group: int) -> bool:
        try:
            os.killpg(group, 0)
        except OSError:  # gone, or (reused) not ours
            return False
        return True

    for group in groups:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while (groups := {g for g in groups if alive(g)}) and time.monotonic() < end:
        time.sleep(0.2)
    for group in groups:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)


class LocalDeployment:
    """A SuperLink and ``clients`` SuperNodes on 127.0.0.1 under ``home`` (a context manager).

    SuperNode i runs with ``--node-config "client-id=i state-dir=<home>/node-i/state threads=T worker=W"``:
    fellrec's client i, with its private state in that folder, ``threads`` CPU threads (by default the
    machine's cores divided among the clients, at least 1) and, with ``worker`` (the default), a worker
    process that keeps the client between messages (``fellrec.runtime.flower.worker``). Each
    SuperNode's SuperExec looks for messages every ``task_poll_s`` seconds. ``tls`` and ``auth``: see the
    module's doc; the certificates and keys are under ``<home>/security``.
    """

    def __init__(self, home: str | Path, clients: int, *, port: int | None = None, tls: bool = False,
                 auth: bool = False, worker: bool = True, threads: int | None = None,
                 task_poll_s: float = TASK_POLL_S):
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it on an insecure SuperLink)")
        self.home = Path(home).resolve()
        self.clients = clients
        self.port = port or free_port()
        self.tls, self.auth = tls, auth
        self.worker, self.task_poll_s = worker, task_poll_s
        self.threads = threads or max(1, (os.cpu_count() or 1) // max(1, clients))
        self.certificates = None
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

    def _spawn(self, name: str, cmd: list[str], flwr_home: Path, **env: str) -> subprocess.Popen:
        log = open(self.log_path(name), "ab")  # noqa: SIM115 (closed in stop)
        self._logs.append(log)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**flower_env(flwr_home), **env},
                                process_group=0)

    @property
    def security(self) -> Path:
        return self.home / "security"

    def start_link(self, *extra: str, **env: str) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        trust = ["--insecure"]
        if self.tls:
            from fellrec.runtime.flower.security import make_certificates

            self.certificates = c = make_certificates(self.security)
            trust = ["--ssl-ca-certfile", str(c.ca), "--ssl-certfile", str(c.cert), "--ssl-keyfile", str(c.key),
                     *(["--enable-supernode-auth"] if self.auth else [])]
        self.link = self._spawn("superlink", [flower_bin("flower-superlink"), *trust, "--host", "127.0.0.1",
                                              "--port", str(self.port), "--disable-runtime-dependency-installation",
                                              *extra], self.home / "superlink", **env)
        scheme, ca = ("https", self.certificates.ca) if self.tls else ("http", None)
        _wait(lambda: _healthy(f"{scheme}://{self.address}/health", ca), 60, "flower-superlink", self.link,
              self.log_path("superlink"))
        write_connection(self.cli_home, self.address, root_certificates=ca)

    def start(self) -> LocalDeployment:
        self.start_link()
        for i in range(self.clients):
            if self.auth:
                self.register_node(i)
            self.start_node(i, wait=False)
        for i in range(self.clients):
            self.wait_node(i)
        return self

    def node_key(self, i: int) -> tuple[Path, Path]:
        """SuperNode i's (private, public) key files, made the first time."""
        private, public = self.security / f"node-{i}.key", self.security / f"node-{i}.pub"
        if not private.exists():
            from fellrec.runtime.flower.security import make_node_keys

            make_node_keys(self.security, f"node-{i}")
        return private, public

    def register_node(self, i: int) -> None:
        """Register SuperNode i's public key with the SuperLink (``flwr supernode register``)."""
        _, public = self.node_key(i)
        done = flwr(self.cli_home, "supernode", "register", str(public), CONNECTION)
        if done.returncode != 0 or "registered" not in done.stdout:
            raise RuntimeError(f"flwr supernode register of node {i} failed: {done.stdout[-500:]}{done.stderr[-500:]}")

    def node_state(self, i: int) -> Path:
        return self.home / f"node-{i}" / "state"

    def start_node(self, i: int, wait: bool = True) -> subprocess.Popen:
        log = self.log_path(f"node-{i}")
        if log.exists():
            log.rename(log.with_suffix(f".{int(time.time() * 1000)}.log"))  # keep the old life's log apart
        config = (f'client-id={i} state-dir="{self.node_state(i)}" threads={self.threads} '
                  f'worker={str(self.worker).lower()}')
        trust = ["--insecure"]
        if self.tls:
            trust = ["--root-certificates", str(self.certificates.ca)]
            if self.auth:
                trust += ["--auth-supernode-private-key", str(self.node_key(i)[0])]
        self.nodes[i] = self._spawn(f"node-{i}", [flower_bin("flower-supernode"), *trust, "--superlink",
                                                  self.address, "--node-config", config, "--host", "127.0.0.1",
                                                  "--port", str(free_port())], self.home / f"node-{i}",
                                   FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(self.task_poll_s))
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
        groups = set().union(*(_groups_below(p.pid) for p in procs if p.poll() is None))
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        end = time.monotonic() + 15  # for them all: a SuperNode that hangs in its exit handler (e.g. on a
        for p in procs:              # loaded machine) is killed, not waited for one by one
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # whatever it left behind (superexec, clientapp)
        _end_groups(groups)
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


def require_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise FellrecError("Flower's simulation engine needs Ray, which is not installed: "
                           "pip install -e '.[simulation]'")


class SimulationDeployment(LocalDeployment):
    """A SuperLink with Flower's simulation engine on 127.0.0.1 under ``home`` (a context manager),
    its federation set to ``clients`` virtual SuperNodes.

    There are no SuperNode processes. For each run the SuperLink starts ``flwr-simulation``, which
    starts Ray (its files in ``<home>/ray``), runs the ServerApp, and runs the ClientApp of
    virtual SuperNode i in a Ray actor with node config ``partition-id=i``: fellrec's client i. A
    virtual SuperNode has no ``state-dir``; its client keeps its state under
    ``$FELLREC_CACHE/flower-state`` (see ``fellrec.runtime.flower.state``). Each ClientApp gets
    ``client_cpus`` of Ray's CPUs (Flower's default: 2), so at most cpu_count / client_cpus
    clients work at once, and ``client_gpus`` of a GPU (Flower's default: none; Ray then hides the GPUs).
    Ray's processes belong to the run, not to the SuperLink: ``stop`` ends them too.
    """

    def __init__(self, home: str | Path, clients: int, *, port: int | None = None, client_cpus: int | None = None,
                 client_gpus: float | None = None):
        super().__init__(home, clients, port=port)
        self.client_cpus, self.client_gpus = client_cpus, client_gpus
        self._ray_link: Path | None = None

    @property
    def ray_dir(self) -> Path:
        """Ray's temporary files: a ``ray/session_*`` folder per run, with Ray's logs."""
        return self.home / "ray"

    def federation_options(self) -> list[str]:
        """The options of ``flwr federation simulation-config`` that size the federation."""
        options = ["--num-supernodes", str(self.clients)]
        if self.client_cpus is not None:
            options += ["--client-resources-num-cpus", str(self.client_cpus)]
        if self.client_gpus is not None:
            options += ["--client-resources-num-gpus", str(self.client_gpus)]
        return options

    def start(self) -> SimulationDeployment:
        require_ray()
        if self.clients < 1:
            raise FellrecError(f"a simulation needs at least 1 virtual SuperNode, got {self.clients}")
        self.ray_dir.mkdir(parents=True, exist_ok=True)
        # Ray puts its sockets under RAY_TMPDIR, and a socket's path may have at most 107 bytes: Ray gets
        # a short link in /tmp to <home>/ray
        self._ray_link = Path(tempfile.mkdtemp(prefix="fellrec-ray-", dir="/tmp" if os.path.isdir("/tmp") else None),
                              "ray")
        self._ray_link.symlink_to(self.ray_dir, target_is_directory=True)
        self.start_link("--simulation", RAY_TMPDIR=str(self._ray_link))
        r = flwr(self.cli_home, "federation", "simulation-config", FEDERATION, CONNECTION, *self.federation_options())
        if r.returncode != 0:
            raise RuntimeError(f"flwr federation simulation-config failed (exit {r.returncode}): "
                               f"{(r.stdout + r.stderr).strip()[-1500:]}")
        return self

    def stop(self) -> None:
        super().stop()
        if self._ray_link is not None:
            with contextlib.suppress(OSError):
                self._ray_link.unlink()
                self._ray_link.parent.rmdir()
            self._ray_link = None


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
