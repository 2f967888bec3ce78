"""What Flower costs on top of the work: the default experiment's recommender and clients (configs/demo.yaml:
SmolLM2-135M-Instruct's item-token backbone, 5 k-means clients, FedAvg) for a few rounds, in the embedded
runtime, on a local deployment (one SuperLink, one SuperNode per client on 127.0.0.1) and on Flower's
simulation engine; one run each.

    .venv/bin/python benchmarks/bench_flower.py                         # 2 rounds of the demo's 25 steps
    .venv/bin/python benchmarks/bench_flower.py --rounds 3              # what the runs of BENCHMARKS.md used
    .venv/bin/python benchmarks/bench_flower.py --rounds 1 --steps 5    # quicker
    .venv/bin/python benchmarks/bench_flower.py --no-worker --threads 2 --skip simulation
                                                                        # the deployment as it was before
                                                                        # issue 17: a client per message

Round times come from each run's metrics.jsonl (``time_s`` after each round: the embedded runtime's include
the round's validation; over Flower a round's validation goes with the next round's training messages, so
there round r's time holds round r - 1's validation; compare the rounds in all, the last row). The
per-message figures come from the Flower runs' messages.jsonl (``fellrec.runtime.flower.nodes``): for each
message the ServerApp's push and pull times and the ClientApp's ``timing`` record, split into

    queue  pushed -> the ClientApp's process created (Flower: SuperLink, SuperNode polling, process start)
    start  process created -> handler called (interpreter, imports, Flower's own setup of the message)
    build  building the client (config, its data), without the base model
    model  building the base model and its adapters
    work   training, validating or testing
    reply  the rest of the handler (handing the message to the worker and back, saving caches)
    back   handler returned -> the ServerApp has the reply (Flower: SuperNode, SuperLink, polling)

"non-work" is everything but ``work``. Bytes: the serialized contents
of the messages each way against the bytes fellrec counts (results.json ``communication``). Run it on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from fellrec.config import dump, load_config
from fellrec.run import run
from fellrec.runtime.flower import deploy

PARTS = ("queue", "start", "build", "model", "work", "reply", "back")


def round_times(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [r["time_s"] for r in rows]
    return [b - a for a, b in zip([0.0, *ends], ends, strict=False)]


def parts(row: dict) -> dict[str, float]:
    handler = row["returned"] - row["called"]
    if row["created"] < row["pushed"]:  # a process that was there before the message (simulation: Ray's actor)
        queue, start = row["called"] - row["pushed"], 0.0
    else:
        queue, start = row["created"] - row["pushed"], row["called"] - row["created"]
    return {"queue": queue, "start": start,
            "build": row["build"], "model": row["model"], "work": row["work"],
            "reply": handler - row["build"] - row["model"] - row["work"],
            "back": row["pulled"] - row["returned"]}


def cpu_use(dep) -> dict[str, float]:
    """CPU seconds used so far by the deployment's processes, by kind: the clients' workers; each
    SuperExec with the processes it started and reaped (the ClientApps; on the SuperLink's side the
    ServerApp); the SuperNodes; the SuperLink."""
    import collections

    import psutil

    groups = {os.getpgid(p.pid) for p in [dep.link, *dep.nodes.values()]} | deploy._groups_below(dep.link.pid)
    use: collections.Counter = collections.Counter()
    for q in psutil.process_iter():
        try:
            if os.getpgid(q.pid) not in groups:
                continue
            t, cmd = q.cpu_times(), q.cmdline()
        except (psutil.Error, OSError):
            continue
        program = Path(cmd[1] if len(cmd) > 1 and Path(cmd[0]).name.startswith("python") else cmd[0]).name
        kind = "workers" if "fellrec.runtime.flower.worker" in cmd else next(
            (k for k in ("superlink", "supernode", "superexec", "serverapp", "clientapp") if k in program), program)
        use[kind] += t.user + t.system + t.children_user + t.children_system
    return dict(use)


def flower_run(dep, cfg, tmp: Path, name: str, federation_config: str | None = None) -> tuple[float, Path]:
    out = tmp / name / "run"
    started = time.perf_counter()
    run_id = deploy.submit(dep.cli_home, deploy.CONNECTION, {"fellrec-config": dump(cfg), "run-dir": str(out)},
                           tmp / name / "run-config.toml", federation_config)
    deploy.wait_run(dep.cli_home, deploy.CONNECTION, run_id, timeout_s=7200, poll_s=1.0)
    return time.perf_counter() - started, out


def report_messages(label: str, out: Path) -> None:
    rows = [json.loads(x) for x in (out / "messages.jsonl").read_text().splitlines()]
    seen: set[str] = set()
    first, later = [], []
    for r in sorted(rows, key=lambda r: r["pushed"]):
        (later if r["client"] in seen else first).append(parts(r))
        seen.add(r["client"])
    print(f"{label}: one message, median seconds over the clients' messages ({len(rows)} messages)")
    print(f"  {'':<24}" + "".join(f"{p:>7}" for p in PARTS) + f"{'non-work':>10}")
    for name, group in (("first of each client", first), ("later", later)):
        if not group:
            continue
        med = {p: statistics.median(g[p] for g in group) for p in PARTS}
        nonwork = statistics.median(sum(v for k, v in g.items() if k != "work") for g in group)
        print(f"  {name:<24}" + "".join(f"{med[p]:>7.2f}" for p in PARTS) + f"{nonwork:>10.2f}")
    nonwork_client = [sum(v for k, v in g.items() if k not in ("work", "queue", "back")) for g in later]
    if nonwork_client:
        print(f"  later messages, the client's own non-work (start+build+model+reply): median "
              f"{statistics.median(nonwork_client):.2f} s, max {max(nonwork_client):.2f} s")
    sent = sum(r["bytes_sent"] for r in rows)
    received = sum(r["bytes_received"] for r in rows)
    comm = json.loads((out / "results.json").read_text())["communication"]
    print(f"  bytes: Flower message contents {sent / 1e6:.1f} MB to the clients, {received / 1e6:.1f} MB back; "
          f"fellrec counts {comm['bytes_down'] / 1e6:.1f} MB down, {comm['bytes_up'] / 1e6:.1f} MB up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=25, help="local steps per client per round (the demo's: 25)")
    ap.add_argument("--no-worker", action="store_true", help="deployment: build the client in every message")
    ap.add_argument("--threads", type=int, help="deployment: CPU threads per client (default: cores / clients)")
    ap.add_argument("--client-cpus", type=int, default=1, help="simulation: Ray's CPUs per client (Flower's "
                    "default: 2)")
    ap.add_argument("--task-poll", type=float, default=deploy.TASK_POLL_S,
                    help="deployment: seconds between a SuperNode's looks for work (Flower's default: 1.0)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["deployment", "simulation"])
    args = ap.parse_args()
    cfg = load_config(args.config, [f"train.rounds={args.rounds}", f"train.local_steps={args.steps}",
                                    "algorithms=[]", "train.algorithm=fedavg", "name=bench"])
    clients = cfg.partition.num_clients
    tmp = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    print(f"{args.config}: {cfg.model.backbone} on {cfg.model.name_or_path}, {clients} clients, FedAvg, "
          f"{args.rounds} rounds of {args.steps} steps; files in {tmp}", flush=True)

    started = time.perf_counter()
    embedded = round_times(run(cfg, tmp / "embedded", progress=False))
    totals = {"embedded": time.perf_counter() - started}
    rounds = {"embedded": embedded}
    outs = {}
    if "deployment" not in args.skip:
        started = time.perf_counter()
        with deploy.LocalDeployment(tmp / "deployment", clients, worker=not args.no_worker, threads=args.threads,
                                    task_poll_s=args.task_poll) as dep:
            up = time.perf_counter() - started
            totals["deployment"], outs["deployment"] = flower_run(dep, cfg, tmp, "deployment")
            threads = dep.threads
            used, held = cpu_use(dep), time.perf_counter() - started
        rounds["deployment"] = round_times(outs["deployment"])
        print(f"deployment: started in {up:.1f} s; worker {'off' if args.no_worker else 'on'}, {threads} "
              f"thread(s) per client, SuperExec poll {args.task_poll} s", flush=True)
        print(f"deployment: CPU seconds while it was up ({held:.0f} s, {held * (os.cpu_count() or 1):.0f} CPU-s "
              "on this machine): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))
              + " (a SuperExec's figure includes the ClientApp or ServerApp processes it started)", flush=True)
    if "simulation" not in args.skip:
        deploy.require_ray()
        with deploy.SimulationDeployment(tmp / "simulation", clients, client_cpus=args.client_cpus) as dep:
            totals["simulation"], outs["simulation"] = flower_run(dep, cfg, tmp, "simulation")
        rounds["simulation"] = round_times(outs["simulation"])

    print(f"\n{'round':>6}" + "".join(f"{k + ' s':>14}" for k in rounds) +
          "".join(f"{k + ' / emb.':>18}" for k in rounds if k != "embedded"))
    for i in range(args.rounds):
        e = embedded[i]
        print(f"{i + 1:>6}" + "".join(f"{v[i]:>14.1f}" for v in rounds.values()) +
              "".join(f"{v[i] / e:>18.2f}" for k, v in rounds.items() if k != "embedded"))
    whole = {k: sum(v) for k, v in rounds.items()}
    print(f"{'all':>6}" + "".join(f"{v:>14.1f}" for v in whole.values()) +
          "".join(f"{v / whole['embedded']:>18.2f}" for k, v in whole.items() if k != "embedded"))
    print("whole run (setup, rounds, test): " + ", ".join(f"{k} {v:.1f} s" for k, v in totals.items()))
    for label, out in outs.items():
        print()
        report_messages(label, out)


if __name__ == "__main__":
    main()
