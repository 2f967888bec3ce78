"""A client's worker: a process that outlives one Flower message, so that a deployed client pays for
its imports, its data and its base model once per run instead of once per message.

A deployed SuperNode starts a fresh ClientApp process for every message (Flower 1.41/1.42; see
docs/FLOWER.md). With the node config ``worker=true`` (``fellrec flower up`` sets it) the ClientApp
process only imports Flower and this module: it hands the message to the client's worker over a Unix
socket and returns the worker's reply. The first message of a run starts the worker (from then on it
serves that client of that run, one message at a time, until it has been idle ``worker-idle-s``
seconds, 600 by default). The worker runs in the ClientApp's process group, so stopping the SuperNode's
group (Ctrl-C in its terminal, ``fellrec flower up``'s stop, a crash test's SIGKILL) stops it too.

The worker keeps only what a fresh process would build again the same way (``client.CACHE``: the
client's data, base model and trainer). Every message still starts from the client's state on disk
and writes it back before its reply (``fellrec.runtime.flower.state``), so a SuperNode or worker that
dies loses nothing: the message is delivered again and a new worker gives the same reply. A worker
that dies while it works is started again once for the same message.

Every reply carries a ``timing`` MetricRecord (``TIMING``): when the ClientApp's process was created,
when its handler was called and returned (seconds since the epoch, this machine's clock), the
seconds spent building the client, building the base model, and working, and the worker's process
id (0 without one). The ServerApp writes them with its own send and receive times to the run
folder's ``messages.jsonl``.

This module imports only the standard library and Flower: it runs in every ClientApp process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict

from fellrec.runtime.flower.state import CONFIG_KEY, client_id, state_root

TIMING = "timing"  # created, called, returned (epoch s); build, model, work (s); worker (its pid, or 0)
IDLE_S = 600.0
START_TIMEOUT_S = 600.0
_FRAME = struct.Struct(">IQ")  # header length, body length


class WorkerFailed(RuntimeError):
    """The client's worker raised while it handled a message, or could not be started."""


def wanted(context: Context) -> bool:
    """Whether this node's messages go to a worker: the node config's ``worker`` (off by default)."""
    value = str(context.node_config.get("worker", "false")).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"node config worker={value!r}: use true or false")


def process_created() -> float:
    """When this process was created, in seconds since the epoch (to 10 ms on Linux, where psutil's is
    only good to a second)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # seconds after boot
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, IndexError, ValueError, AttributeError):
        import psutil

        return psutil.Process().create_time()


def answer(msg: Message, context: Context) -> Message:
    """The ClientApp's reply to ``msg``: from the client's worker, or built in this process."""
    called = time.time()
    if wanted(context):
        content, parts = ask(msg, context)
    else:
        from fellrec.runtime.flower.client import handle  # torch, the model code: only where the work is

        content, parts = handle(msg, context)
        parts["worker"] = 0.0
    content[TIMING] = MetricRecord({"created": process_created(), "called": called, "returned": time.time(),
                                    **parts})
    return Message(content, reply_to=msg)


# ---- the ClientApp's side ------------------------------------------------------------------------


def address(context: Context) -> Path:
    """The Unix socket of the worker of this run's client on this node, in a folder only this user may
    read (a socket's path may have at most 107 bytes, so it is named by a hash)."""
    folder = Path(tempfile.gettempdir()) / f"fellrec-workers-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise WorkerFailed(f"{folder} belongs to another user or others may open it: remove it")
    from fellrec import __version__

    key = json.dumps([str(context.run_config[CONFIG_KEY]), client_id(context), str(state_root(context)),
                      sys.executable, __version__])
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.sock"


def log_path(context: Context) -> Path:
    return state_root(context) / f"worker-client-{client_id(context)}.log"


def ask(msg: Message, context: Context) -> tuple[RecordDict, dict[str, float]]:
    """The worker's reply content and timings for ``msg``, starting the worker if it is not running."""
    from flwr.common.serde import message_to_proto, recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    request = message_to_proto(msg).SerializeToString()
    header = {"run_config": dict(context.run_config), "node_config": dict(context.node_config)}
    for attempt in (1, 2):
        conn = connect(context)
        peer = _peer(conn)
        try:
            with conn:
                send(conn, header, request)
                reply, body = receive(conn)
            break
        except OSError:  # the worker went away (connection refused, reset or closed)
            if attempt == 2:
                raise WorkerFailed(f"client {client_id(context)}'s worker exited twice while it handled a "
                                   f"{msg.metadata.message_type} message; see {log_path(context)}") from None
            _wait_gone(peer)  # a killed worker's socket accepts connections until the kernel has torn it down
    if not reply.get("ok"):
        raise WorkerFailed(reply.get("error", "the worker failed"))
    proto = RecordDictProto()
    proto.ParseFromString(body)
    return recorddict_from_proto(proto), {k: float(v) for k, v in reply["timing"].items()}


def connect(context: Context) -> socket.socket:
    """A connection to the client's worker; starts one (once, under a lock) if none answers."""
    path = address(context)
    conn = _try(path)
    if conn is not None:
        return conn
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _try(path)  # another message's process may have started it meanwhile
        if conn is not None:
            return conn
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        log = log_path(context)
        log.parent.mkdir(parents=True, exist_ok=True)
        idle = float(context.node_config.get("worker-idle-s", IDLE_S))
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "fellrec.runtime.flower.worker", str(path), str(idle)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        end = time.monotonic() + START_TIMEOUT_S
        while (conn := _try(path)) is None:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-1500:]
                raise WorkerFailed(f"client {client_id(context)}'s worker exited with code {proc.returncode} "
                                   f"before it served; its log {log} ends:\n{tail}")
            if time.monotonic() > end:
                proc.kill()
                raise WorkerFailed(f"client {client_id(context)}'s worker did not listen within "
                                   f"{START_TIMEOUT_S:.0f} s; see {log}")
            time.sleep(0.05)
        return conn


def _peer(conn: socket.socket) -> int:
    """The process id at the other end of a Unix socket (Linux's SO_PEERCRED), or 0 where unknown."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]
    except (AttributeError, OSError):
        return 0


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait at most ``timeout`` s until process ``pid`` has exited and closed its files: gone, or a zombie
    nobody reaped yet whose other threads are gone too (a killed process's first thread turns zombie while
    the others, torch's among them, still hold its sockets open for a few milliseconds)."""
    if not pid:
        time.sleep(0.5)
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            threads = len(os.listdir(f"/proc/{pid}/task"))
        except (OSError, IndexError):
            return
        if state in ("Z", "X") and threads <= 1:
            return
        time.sleep(0.01)


def _try(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    return conn


def send(conn: socket.socket, header: dict, body: bytes = b"") -> None:
    head = json.dumps(header).encode()
    conn.sendall(_FRAME.pack(len(head), len(body)) + head)
    conn.sendall(body)


def receive(conn: socket.socket) -> tuple[dict, bytes]:
    head_n, body_n = _FRAME.unpack(_exactly(conn, _FRAME.size))
    return json.loads(_exactly(conn, head_n)), _exactly(conn, body_n)


def _exactly(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("the other end closed the connection")
        got += k
    return bytes(buf)


# ---- the worker ------------------------------------------------------------------------------------


def serve(path: Path, idle_s: float) -> None:
    """Answer messages on ``path``, one at a time, until idle for ``idle_s`` seconds."""
    import torch
    from flwr.common.serde import message_from_proto, recorddict_to_proto
    from flwr.proto.message_pb2 import Message as MessageProto

    from fellrec.runtime.flower.client import handle  # the heavy imports, once

    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} worker {os.getpid()} listening on {path}; torch threads "
          f"{torch.get_num_threads()}, CPUs {sorted(os.sched_getaffinity(0))}, nice {os.nice(0)}", flush=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    mine = path.stat().st_ino
    server.listen(8)
    server.settimeout(idle_s)
    try:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                return
            with conn:
                conn.settimeout(None)
                header, body = receive(conn)
                proto = MessageProto()
                proto.ParseFromString(body)
                msg = message_from_proto(proto)
                context = Context(run_id=msg.metadata.run_id, node_id=msg.metadata.dst_node_id,
                                  node_config=header["node_config"], state=RecordDict(),
                                  run_config=header["run_config"])
                try:
                    content, timing = handle(msg, context)
                except Exception as err:  # the ClientApp raises it, as if it had done the work itself
                    import traceback

                    traceback.print_exc()
                    send(conn, {"ok": False, "error": f"{type(err).__name__}: {err}"})
                    continue
                send(conn, {"ok": True, "timing": {**timing, "worker": os.getpid()}},
                     recorddict_to_proto(content).SerializeToString())
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_ino == mine:  # not a newer worker's socket
                path.unlink()
                path.with_suffix(".lock").unlink()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), float(sys.argv[2]))
