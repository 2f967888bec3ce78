"""Atomic output: every file fellrec writes goes to a temporary name beside it, then is renamed, so
a crash never leaves a half-written file in place of a good one."""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor


def atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    return atomic(path, write)


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file of ``tensors`` (contiguous copies, so tensors that share memory are fine)."""
    from safetensors.torch import save_file

    data = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return atomic(path, lambda tmp: save_file(data, tmp, metadata=metadata))


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>\.[^.]*)?$")


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that ``atomic`` left in ``folder`` and below when its process was
    killed before renaming them; the paths deleted."""
    gone = []
    for path in sorted(Path(folder).rglob(".*")):
        m = _TEMPORARY.match(path.name)
        if path.is_file() and m and m["name"].endswith(m["suffix"] or ""):
            path.unlink()
            gone.append(path)
    return gone


def plain(value: Any) -> Any:
    """JSON-ready: NaN becomes None (JSON has no NaN), numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
