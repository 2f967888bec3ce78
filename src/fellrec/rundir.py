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

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fellrec.files import plain, remove_temporaries, write_text
from fellrec.results import write_test_users
from fellrec.runtime.checkpoint import NAME as CHECKPOINT

RESULTS, REPORT, CONFIG = "results.json", "report.md", "config.yaml"


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
    had = {name: (out / name).exists() for name in (CONFIG, "adapters", "metrics.jsonl", "messages.jsonl")}
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


def finish(out: Path, started: float, results: dict, test_users: tuple | None = None) -> Path:
    """The end of every run: ``test_users.csv`` (``test_users``: per-user metrics, each user's client,
    the users), ``results.json`` with the run's whole time, then ``complete``."""
    out = Path(out)
    if test_users is not None:
        write_test_users(out, *test_users)
    results["time_s"] = round(time.time() - started, 1)
    write_text(out / RESULTS, json.dumps(plain(results), indent=2))
    return complete(out)


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


