"""Atomic output: every file fellrec writes goes to a temporary name beside it, then is renamed, so
a crash never leaves a half-written file in place of a good one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

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
