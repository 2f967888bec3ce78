"""The ServerApp: opens the run, picks the mode (plain, split or FedPA) and serves it."""

import time

from flwr.serverapp import ServerApp

from fellrec.config import dump
from fellrec.rundir import begun
from fellrec.runtime.flower import fedpa, plain, split
from fellrec.runtime.flower.runtime import open_run

app = ServerApp()


def serve(grid, context) -> None:
    """One fellrec run over the SuperNodes, into the run config's ``run-dir``."""
    started = time.time()
    cfg, out, nodes = open_run(grid, context.run_config)
    mode = fedpa if cfg.model.backbone == "ctr" else split if cfg.storage.k is not None else plain
    with begun(out, dump(cfg)):
        mode.serve(cfg, context.run_config, out, nodes, started)


app.main()(serve)
