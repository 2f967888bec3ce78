"""One file holds everything a run needs to continue: ``checkpoint.safetensors``.

Tensors are stored under prefixed names (``strategy/...``, ``client/<id>/...``); everything else
(round, bookkeeping, per-client selection state) is JSON in the file's metadata. The file is
written under a temporary name and renamed, so a crash while saving leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from fellrec.files import save_tensors

NAME = "checkpoint.safetensors"


def save_checkpoint(run_dir: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    return save_tensors(Path(run_dir) / NAME, tensors, metadata={"fellrec": json.dumps(meta)})


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """(tensors, meta) of the run's last checkpoint, or None when it has none."""
    path = Path(run_dir) / NAME
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["fellrec"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return tensors, meta


def section(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under ``prefix/``, with the prefix taken off."""
    prefix = prefix.rstrip("/") + "/"
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
