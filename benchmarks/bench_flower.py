"""One round on a local Flower deployment against the same round in the embedded runtime, and
where the difference goes.

    .venv/bin/python benchmarks/bench_flower.py                      # tiny-random model, 3 clients, 2 rounds
    .venv/bin/python benchmarks/bench_flower.py --model smollm2      # SmolLM2-135M ranker, same clients

The same config runs twice: in one process (``fellrec.run.run``) and on a local deployment of one
SuperLink and one SuperNode per client on 127.0.0.1 (``fellrec.runtime.flower.deploy``). Round times
come from each run's metrics.jsonl (``time_s`` after each round, validation included). Then, in
fresh processes, the parts of one Flower message that the embedded runtime does not pay: starting a
Python process that imports the ClientApp, and building the client (config, cached data, base model,
LoRA, trainer) — against the work itself (one client's local training). The rest is Flower's
latency: a SuperNode polls the SuperLink every 3 s when idle, and the ServerApp polls for replies.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fellrec.config import dump, load_config
from fellrec.run import run
from fellrec.runtime.flower import deploy

CLIENTS = ["partition.method=attribute", "partition.attribute=age", "partition.bins=[0,25,40,100]"]
MODELS = {
    "tiny": ["model.name_or_path=tiny-random", "train.batch_size=4", "train.max_train_samples=48",
             "eval.max_valid_samples=8", "eval.max_test_samples=24"],
    "smollm2": ["model.name_or_path=smollm2-135m-instruct", "model.backbone=ranker", "train.batch_size=8",
                "eval.max_valid_samples=16", "eval.max_test_samples=24", "train.lr=3e-3"],
}

PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import fellrec_flower.client_app  # what a ClientApp process imports
t1 = time.perf_counter()
from pathlib import Path
from fellrec import build
from fellrec.runtime.flower.plain import ClientNode
from fellrec.runtime.flower.state import ProcessCache
from fellrec.strategies import Payload
text = Path(sys.argv[2]).read_text()
node = ClientNode(text, "0", Path(sys.argv[3]), ProcessCache(), build)
t2 = time.perf_counter()
node.trainer.fit(Payload(dict(node.parts.initial), {}), 1)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "build_s": t2 - t1, "fit_s": t3 - t2}))
"""


def round_times(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [r["time_s"] for r in rows]
    return [b - a for a, b in zip([0.0, *ends], ends, strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="local steps per client per round")
    args = ap.parse_args()
    cfg = load_config(None, [*CLIENTS, *MODELS[args.model], f"train.rounds={args.rounds}",
                             f"train.local_steps={args.steps}", "train.algorithm=fedavg", "name=bench"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    started = time.perf_counter()
    embedded = round_times(run(cfg, tmp / "embedded", progress=False))
    embedded_total = time.perf_counter() - started

    started = time.perf_counter()
    with deploy.LocalDeployment(tmp / "deployment", 3) as dep:
        up_s = time.perf_counter() - started
        started = time.perf_counter()
        run_id = deploy.submit(dep.cli_home, deploy.CONNECTION, {"fellrec-config": dump(cfg),
                               "run-dir": str(tmp / "flower" / "bench")}, tmp / "run-config.toml")
        record = deploy.wait_run(dep.cli_home, deploy.CONNECTION, run_id, timeout_s=7200, poll_s=2.0)
        flower_total = time.perf_counter() - started
    flower = round_times(tmp / "flower" / "bench")

    text = tmp / "config.yaml"
    text.write_text(dump(cfg))
    probes = []
    for label in ("first message (reads and partitions the dataset)", "later messages (cached client data)"):
        out = subprocess.run([sys.executable, "-c", PROBE, str(deploy.APP_DIR), str(text), str(tmp / "probe")],
                             capture_output=True, text=True, check=True)
        probes.append((label, json.loads(out.stdout.strip().splitlines()[-1])))

    print(f"model {args.model}, 3 clients, {args.rounds} rounds of {args.steps} steps (FedAvg); "
          f"flower run {record['status']}")
    print(f"{'round':>6} {'embedded s':>11} {'flower s':>9} {'ratio':>6}")
    for i, (e, f) in enumerate(zip(embedded, flower, strict=True), start=1):
        print(f"{i:>6} {e:>11.1f} {f:>9.1f} {f / e:>6.1f}")
    print(f"whole run (setup, rounds, test): embedded {embedded_total:.1f} s, flower {flower_total:.1f} s "
          f"(+ {up_s:.1f} s to start the deployment)")
    print("one ClientApp message, in a fresh process:")
    for label, p in probes:
        print(f"  {label}: import {p['import_s']:.1f} s, build client {p['build_s']:.1f} s, "
              f"local training (the work) {p['fit_s']:.1f} s")


if __name__ == "__main__":
    main()
