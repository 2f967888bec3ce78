"""What a finished run says, in one schema for every runtime and algorithm: ``results.json`` (built by
``record``) and ``test_users.csv`` (every test user's metrics, so that runs on the same users can be
paired). Written by ``fellrec.rundir.finish``; read by the report and ``fellrec compare``.

``task`` says what the metrics measure: ``ranking`` (the LLM backbones and the reference points:
recall, NDCG, ... over the catalogue, means over the test users) or ``ctr`` (FedPA: AUC, GAUC,
logloss, ... of the pooled predictions).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fellrec.files import write_text

TEST_USERS = "test_users.csv"


def record(cfg, *, dataset: str, summary: dict[str, Any], client_names: Mapping[Any, str] | None = None,
           warnings: Iterable[str] = (), task: str = "ranking", **parts: Any) -> dict[str, Any]:
    """results.json's content: the run's identity and ``task``, the test ``summary`` (``overall``,
    ``clients``, ``imbalance``, ``intervals``: ``fellrec.evaluate.test_summary`` for a ranking run), the clients'
    names, the protocol's warnings, then ``parts`` (what the kind of run adds)."""
    algorithm = f"fedpa:{cfg.train.algorithm}" if task == "ctr" else cfg.train.algorithm
    return {"name": cfg.name, "task": task, "algorithm": algorithm, "backbone": cfg.model.backbone,
            "dataset": dataset, **summary, "client_names": {str(c): n for c, n in (client_names or {}).items()},
            "warnings": list(warnings), **parts}


def task_of(results: dict[str, Any]) -> str:
    """``ranking`` or ``ctr`` (results written before ``task`` existed: told by their metrics)."""
    return results.get("task") or ("ctr" if "auc" in (results.get("overall") or {}) else "ranking")


def rounds(runtime, cfg, *, select_by: str, steps_per_round: dict[str, int], best_round: dict[str, int],
           samples: dict[str, int]) -> dict[str, Any]:
    """The parts of a federated run: bytes each way, the rounds' time, the selected rounds, the sample counts."""
    return {
        "communication": {
            "bytes_up": int(sum(runtime.bytes_up.values())), "bytes_down": int(sum(runtime.bytes_down.values())),
            "per_client": {c: {"bytes_up": runtime.bytes_up[c], "bytes_down": runtime.bytes_down[c]}
                           for c in runtime.bytes_up}},
        "train_time_s": round(runtime.elapsed, 1),
        "rounds": cfg.train.rounds,
        "steps_per_round": steps_per_round,
        "select_by": select_by,
        "best_round": best_round,
        "samples": samples,
    }


def write_test_users(out: Path, per_user: dict, client_of, users) -> Path:
    """``test_users.csv``: one row per test user (``user``: the dataset's dense user id, ``client``,
    then every metric; empty where the user has no ground truth). Runs on the same data share these
    ids, so ``fellrec compare`` pairs their users."""
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
