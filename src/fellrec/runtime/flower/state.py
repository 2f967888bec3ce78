"""What a SuperNode keeps for its client: who it is, its private state on disk, and the process cache.

A SuperNode starts a fresh ClientApp process for every message, so a client's state lives on its
disk, under ``<state-dir>/<run name>-<config hash>/client-<id>/`` (``state-dir`` from the
SuperNode's ``--node-config``): the trainer's state after each phase of a round (see docs/FLOWER.md).
A message reads the newest state saved before its own phase, never its own, so a message delivered
again after a crash gives the same reply.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context

CONFIG_KEY = "fellrec-config"


def client_id(context: Context) -> str:
    """fellrec's client id: ``client-id`` of the node config; Flower's simulation only has ``partition-id``."""
    nc = context.node_config
    value = nc.get("client-id", nc.get("partition-id"))
    if value is None:
        raise ValueError("node config has no client-id: start the SuperNode with --node-config 'client-id=N'")
    return str(value)


def state_root(context: Context) -> Path:
    value = context.node_config.get("state-dir")
    if value:
        return Path(str(value)).expanduser()
    base = os.environ.get("FELLREC_CACHE", str(Path.home() / ".cache" / "fellrec"))
    return Path(base) / "flower-state"


def run_key(config_text: str, name: str) -> str:
    return f"{name}-{hashlib.sha256(config_text.encode()).hexdigest()[:10]}"


class ClientState:
    """One client's trainer state on disk, one ``state-<round>-<phase>.safetensors`` file per phase of a
    round it worked in (0 training, 1 validation); the four newest are kept."""

    KEEP = 4

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def saved(self) -> list[tuple[int, int]]:
        """(round, phase) of every state file, oldest first."""
        pattern = re.compile(r"state-(\d+)-(\d+)\.safetensors")
        return sorted((int(m.group(1)), int(m.group(2))) for p in self.folder.iterdir()
                      if (m := pattern.fullmatch(p.name)))

    def before(self, rnd: int, phase: int) -> tuple[dict, dict[str, Any]] | None:
        """(tensors, meta) of the newest state saved before phase ``phase`` of round ``rnd``, or None."""
        from safetensors import safe_open

        found = [key for key in self.saved() if key < (rnd, phase)]
        if not found:
            return None
        with safe_open(str(self._path(*found[-1])), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fellrec", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        return tensors, meta

    def save_phase(self, rnd: int, phase: int, tensors: dict, meta: dict[str, Any] | None = None) -> None:
        from fellrec.files import save_tensors  # torch: not for the light modules that import this one

        save_tensors(self._path(rnd, phase), tensors, {"fellrec": json.dumps(meta or {})})
        for old in self.saved()[:-self.KEEP]:
            self._path(*old).unlink(missing_ok=True)

    def _path(self, rnd: int, phase: int) -> Path:
        return self.folder / f"state-{rnd}-{phase}.safetensors"


class ProcessCache:
    """What one ClientApp process keeps across the messages it serves: Flower's simulation serves many
    clients and messages from one process, which then share one base model as in the embedded runtime
    (each client loads its own adapter into it before it works). A deployment's process starts empty.

    One value per kind (``node-<client>``, ``backbone``, ...): asking for another key replaces it.
    """

    def __init__(self) -> None:
        self._kept: dict[str, tuple[Any, Any]] = {}
        self.seconds: dict[str, float] = {}  # kind -> seconds spent building its values, in all

    def get(self, kind: str, key: Any, build: Callable[[], Any]) -> Any:
        found = self._kept.get(kind)
        if found is None or found[0] != key:
            self._kept.pop(kind, None)  # let the old value go before the new one is built
            started = time.perf_counter()
            self._kept[kind] = (key, build())
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - started
        return self._kept[kind][1]
