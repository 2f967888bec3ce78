"""The ServerApp: opens the run, picks what it serves (an LLM run or FedPA's; plain or split) and
serves it."""

import time

from flwr.serverapp import ServerApp

from fellrec.build import RankingServer
from fellrec.config import dump
from fellrec.fedpa.build import FedPAServer
from fellrec.rundir import begun
from fellrec.runtime.flower import plain, split
from fellrec.runtime.flower.runtime import open_run

app = ServerApp()


def serve(grid, context) -> None:
    """One fellrec run over the SuperNodes, into the run config's ``run-dir``."""
    started = time.time()
    run_config = context.run_config
    cfg, out, nodes = open_run(grid, run_config)
    mode = split if cfg.storage.k is not None else plain
    with begun(out, dump(cfg)):
        nodes.log_to = out / "messages.jsonl"  # each message's times and bytes (Nodes._logged)
        task = (FedPAServer(cfg, out) if cfg.model.backbone == "ctr"
                else RankingServer(cfg, out, bool(run_config.get("collect-adapters", True))))
        mode.serve(cfg, run_config, out, nodes, started, task)


app.main()(serve)
