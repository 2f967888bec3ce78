"""A run folder's life, for every runtime: begun, resumable, finished, complete.

- begun: ``config.yaml`` and ``adapters/`` are written when a run starts. A start that fails before
  its first checkpoint (a bad data line, too many clients, an impossible cut) removes what it
  wrote, so a failed start leaves no run folder behind;
- resumable: ``checkpoint.safetensors`` exists; a failure from then on keeps everything;
- finished: ``results.json`` exists; ``report.md`` is written after it, last of all;
- complete: a finished run whose report, plots and clean-up are done. ``complete`` brings a run
  killed between ``results.json`` and the end of its report there.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fellrec.files import remove_temporaries, write_text
from fellrec.runtime.checkpoint import NAME as CHECKPOINT

RESULTS, REPORT, CONFIG, TEST_USERS = "results.json", "report.md", "config.yaml", "test_users.csv"


def is_finished(out: Path) -> bool:
    return (Path(out) / RESULTS).exists()


def is_resumable(out: Path) -> bool:
    return (Path(out) / CHECKPOINT).exists()


@contextmanager
def begun(out: Path, config_text: str) -> Iterator[Path]:
    """Write ``config.yaml`` and ``adapters/`` into ``out`` for the body of the ``with``; if the body
    fails before the run is resumable or finished, remove what this start created."""
    out = Path(out)
    created_folder = not out.exists()
    had = {name: (out / name).exists() for name in (CONFIG, "adapters", "metrics.jsonl")}
    if not created_folder:
        remove_temporaries(out)  # left by a process killed while writing
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    write_text(out / CONFIG, config_text)
    try:
        yield out
    except BaseException:
        if not (is_resumable(out) or is_finished(out)):
            _remove_start(out, created_folder, had)
        raise


def _remove_start(out: Path, created_folder: bool, had: dict[str, bool]) -> None:
    if created_folder:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name, existed in had.items():
        path = out / name
        if existed or not path.exists():
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


def complete(out: Path) -> Path:
    """Finish the files of a finished run whose process was killed before it was done: temporary
    files removed, the checkpoint deleted, the report and plots written."""
    from fellrec.report import write_report

    out = Path(out)
    remove_temporaries(out)
    if is_resumable(out):
        os.unlink(out / CHECKPOINT)  # everything it held is in the finished files
    if not (out / REPORT).exists():
        write_report(out)
    return out


def write_test_users(out: Path, per_user: dict, client_of, users) -> Path:
    """``test_users.csv``: one row per test user (``user``: the dataset's dense user id, ``client``,
    then every metric; empty where the user has no ground truth). Runs on the same data share these
    ids, so ``fellrec compare`` pairs their users."""
    import numpy as np

    names = list(per_user)
    lines = [",".join(["user", "client", *names])]
    values = [np.asarray(per_user[m], dtype=float) for m in names]
    for i, (u, c) in enumerate(zip(users, client_of, strict=True)):
        cells = ["" if np.isnan(v[i]) else repr(float(v[i])) for v in values]
        lines.append(",".join([str(int(u)), str(int(c)), *cells]))
    return write_text(Path(out) / TEST_USERS, "\n".join(lines) + "\n")


def read_test_users(out: Path) -> dict[str, dict[int, float]] | None:
    """metric -> {user: value} from a run's ``test_users.csv`` (None when the run has none)."""
    path = Path(out) / TEST_USERS
    if not path.exists():
        return None
    rows = path.read_text(encoding="utf-8").splitlines()
    names = rows[0].split(",")[2:]
    out_: dict[str, dict[int, float]] = {m: {} for m in names}
    for row in rows[1:]:
        cells = row.split(",")
        user = int(cells[0])
        for m, cell in zip(names, cells[2:], strict=True):
            if cell:
                out_[m][user] = float(cell)
    return out_
