"""The ``fellrec`` command: one table of subcommands, each a plain function.

A user's mistake (bad config, bad data file, missing package) is printed on one line and exits
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from fellrec import __version__
from fellrec.errors import ConfigError, FellrecError


def _config(args):
    from fellrec.config import load_config

    return load_config(args.config, args.set or [])


def cmd_data_stats(args) -> None:
    """Load, filter, split and partition the data of CONFIG and print its summary and client table."""
    from fellrec.pipeline import client_table, prepare, summary

    cfg = _config(args)
    prepared = prepare(cfg, progress=not args.quiet, echo=False)  # the notes are in the summary
    info = summary(prepared)
    table = client_table(prepared)
    if args.json:
        print(json.dumps({"summary": info, "clients": table.to_dict(orient="records")}, indent=2))
        return
    print(format_summary(info))
    print()
    print(format_table(table))


def format_summary(s: dict) -> str:
    def day(t):
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d") if t is not None else "-"

    repeats = s.get("repeated_pairs", 0)
    density = f"density {s['density']:.4%}"
    if repeats:  # the density counts each (user, item) pair once
        density = (f"{s['pairs']:,} distinct user-item pairs, {density}; {repeats:,} "
                   f"{'interactions repeat' if repeats != 1 else 'interaction repeats'} an earlier pair")
    lines = [
        f"dataset        {s['dataset']}",
        f"users          {s['users']:,}",
        f"items          {s['items']:,}",
        f"interactions   {s['interactions']:,}  ({density})",
        f"per user       min {s['per_user_min']}, median {s['per_user_median']:g}, max {s['per_user_max']}",
        f"time span      {day(s['time_first'])} .. {day(s['time_last'])}",
        f"same-time      {s['same_timestamp_share']:.1%} of interactions share their timestamp with another "
        "of the same user (kept in file order)",
        f"split          {s['split']}: train {s['interactions_train']:,} / valid {s['interactions_valid']:,}"
        f" / test {s['interactions_test']:,} interactions",
    ]
    if s["split_cuts"]:
        valid_from, test_from = (day(t) for t in s["split_cuts"])
        lines.append(f"cut times      valid from {valid_from}, test from {test_from}")
    lines += [
        f"samples        train {s['samples_train']:,} / valid {s['samples_valid']:,} / test "
        f"{s['samples_test']:,} (history of up to {s['history_len']} items; one test sample per user)",
        f"clients        {s['clients']} by {s['partition']}, covering {s['users_in_clients']:,} users with "
        "train data",
    ]
    lines += [f"note           {n}" for n in s["notes"]]
    return "\n".join(lines)


def format_table(table) -> str:
    cols = list(table.columns)
    cells = [[str(c) for c in cols]] + [[f"{v:,}" if isinstance(v, int) else str(v) for v in row]
                                         for row in table.itertuples(index=False)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    numeric = [table[c].dtype.kind in "iuf" for c in cols]

    def fmt(row):
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(row, widths, numeric, strict=True))

    out = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    out += [fmt(r) for r in cells[1:]]
    total = {c: int(table[c].sum()) for c in ("users", "train", "valid", "test")}
    out.append("  ".join("-" * w for w in widths))
    out.append(f"total: {total['users']:,} users, {total['train']:,} train / {total['valid']:,} valid / "
               f"{total['test']:,} test samples")
    return "\n".join(out)


def cmd_run(args) -> None:
    """Run the experiment of CONFIG into runs/<name>/ (config, metrics per round, results, adapters,
    report); --resume continues a run that was cut short."""
    from fellrec.report import format_compare
    from fellrec.run import run_all, run_from_dir

    if isinstance(args.resume, str):  # --resume RUN_DIR
        if args.config or args.set:
            raise ConfigError("--resume RUN_DIR continues with the run's own config.yaml; give no CONFIG or --set")
        outs = [run_from_dir(args.resume, progress=not args.quiet)]
    else:
        outs = run_all(_config(args), runs_dir=args.runs_dir, progress=not args.quiet, resume=bool(args.resume))
    for out in outs:
        print(f"\n{out}/")
        print(format_results(json.loads((out / "results.json").read_text())))
    if len(outs) > 1:
        print()
        print(format_compare(outs))


def cmd_report(args) -> None:
    """Rebuild report.md and plots/*.png of a finished run."""
    from fellrec.report import write_report

    path = write_report(args.run_dir)
    print(f"wrote {path} and {path.parent / 'plots'}/")


def cmd_compare(args) -> None:
    """Put several finished runs side by side: one table, per-client recall, one plot (--out DIR)."""
    from fellrec.report import compare, format_compare

    print(format_compare(args.run_dirs, metric=args.metric))
    if args.out:
        _, png = compare(args.run_dirs, out_dir=args.out, metric=args.metric)
        print(f"\nwrote {args.out}/compare.md and {png}")


def cmd_flower_up(args) -> None:
    """Start a local Flower deployment on 127.0.0.1: one SuperLink and one SuperNode per client
    (client-id 0..N-1), or with --simulation a SuperLink whose runs Flower's simulation engine (Ray)
    runs with N virtual SuperNodes; until Ctrl-C. Then run experiments on it with `fellrec flower run`."""
    import signal
    import time

    from fellrec.runtime.flower.deploy import CONNECTION, LocalDeployment, SimulationDeployment

    if args.clients < 1:
        raise ConfigError(f"--clients: need at least 1, got {args.clients}")
    _check_simulation_options(args)
    if args.auth and not args.tls:
        raise ConfigError("--auth: SuperNode authentication needs --tls (Flower refuses it without TLS)")
    if args.simulation and (args.threads is not None or args.no_worker):
        raise ConfigError("--threads, --no-worker: for a deployment with SuperNode processes; in a "
                          "simulation Ray's actors keep the clients, and --client-cpus sets their CPUs")
    if args.tls and args.simulation:
        raise ConfigError("--tls: for a deployment with SuperNode processes; a simulation has none to connect")
    if args.simulation:
        dep = SimulationDeployment(args.home, args.clients, port=args.port, client_cpus=args.client_cpus,
                                   client_gpus=args.client_gpus)
    else:
        if args.threads is not None and args.threads < 1:
            raise ConfigError(f"--threads: need at least 1, got {args.threads}")
        dep = LocalDeployment(args.home, args.clients, port=args.port, tls=args.tls, auth=args.auth,
                              worker=not args.no_worker, threads=args.threads)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        dep.start()
        if args.simulation:
            print(f"simulation SuperLink on {dep.address}: each run gets {args.clients} virtual SuperNodes "
                  f"(client-id 0..{args.clients - 1}) in Ray; logs in {dep.home}/, client state in "
                  "$FELLREC_CACHE/flower-state/")
        else:
            print(f"SuperLink on {dep.address}; {args.clients} SuperNodes (client-id 0..{args.clients - 1}); logs "
                  f"and client state in {dep.home}/")
            if args.tls:
                print(f"TLS: the SuperLink's certificate is signed by {dep.certificates.ca}, which the SuperNodes "
                      "and the flwr connection trust" + (f"; SuperNode authentication: only the {args.clients} "
                      f"registered SuperNodes may connect (keys in {dep.security}/)" if args.auth else ""))
        print(f"flwr connection '{CONNECTION}' written to {dep.cli_home}/config.toml")
        print("In another terminal:  fellrec flower run configs/flower-demo.yaml")
        print("Ctrl-C stops the deployment.", flush=True)
        while True:
            for name, proc in [("superlink", dep.link), *((f"node-{i}", p) for i, p in dep.nodes.items())]:
                if proc.poll() is not None:
                    raise FellrecError(f"{name} exited with code {proc.returncode}; see {dep.log_path(name)}")
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("stopping the deployment", file=sys.stderr)
    finally:
        dep.stop()


def _check_simulation_options(args) -> None:
    """--client-cpus and --client-gpus: only with --simulation; at least 1 CPU, no negative GPU share."""
    for option in ("client_cpus", "client_gpus"):
        if getattr(args, option) is not None and not args.simulation:
            raise ConfigError(f"--{option.replace('_', '-')}: only with --simulation (Ray's resources per client)")
    if args.client_cpus is not None and args.client_cpus < 1:
        raise ConfigError(f"--client-cpus: need at least 1, got {args.client_cpus}")
    if args.client_gpus is not None and args.client_gpus < 0:
        raise ConfigError(f"--client-gpus: need 0 or more, got {args.client_gpus}")


def cmd_flower_run(args) -> None:
    """Run the experiment of CONFIG on a Flower federation (default: the one `fellrec flower up` started;
    with --simulation: Flower's simulation engine, started for this command) into runs/<name>/, and
    judge it by the status the SuperLink recorded."""
    from pathlib import Path

    from fellrec.run import per_algorithm
    from fellrec.runtime.flower import deploy

    configs = per_algorithm(_config(args))
    for cfg in configs:
        cfg.check_flower()
    _check_simulation_options(args)
    if args.simulation:
        import signal

        from fellrec.pipeline import prepare

        if args.flwr_home or args.connection:
            raise ConfigError("--simulation starts a SuperLink of its own; leave out --flwr-home and --connection")
        deploy.require_ray()
        _check_finished(args, configs)
        if all(_finished(args, cfg) for cfg in configs):  # nothing to run (--resume): show the results
            _flower_runs(args, configs, None, deploy.CONNECTION)
            return
        if configs[0].model.backbone == "ctr":  # FedPA: one client per private user
            from fellrec.pipeline import prepare_ctr

            clients = prepare_ctr(configs[0]).num_clients
        else:
            clients = prepare(configs[0]).num_clients  # the algorithms of CONFIG share its clients
        dep = deploy.SimulationDeployment(Path(args.home) / "simulation", clients, client_cpus=args.client_cpus,
                                          client_gpus=args.client_gpus)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        with dep:
            print(f"simulation SuperLink on {dep.address} with {clients} virtual SuperNodes (Ray); logs in "
                  f"{dep.home}/", flush=True)
            _flower_runs(args, configs, dep.cli_home, deploy.CONNECTION)
        return
    cli_home = Path(args.flwr_home) if args.flwr_home else Path(args.home) / "cli"
    if not (cli_home / "config.toml").exists():
        raise ConfigError(f"{cli_home}/config.toml: no Flower connection there; start a local deployment with "
                          "`fellrec flower up --clients N`, or give --flwr-home and --connection")
    _flower_runs(args, configs, cli_home, args.connection or deploy.CONNECTION)


def _finished(args, cfg) -> bool:
    from pathlib import Path

    return (Path(args.runs_dir).resolve() / cfg.name / "results.json").exists()


def _check_finished(args, configs) -> None:
    from pathlib import Path

    for cfg in configs:
        if _finished(args, cfg) and not args.resume:
            raise ConfigError(f"name: {Path(args.runs_dir).resolve() / cfg.name} already holds a finished run; "
                              "choose another name (--set name=...)")


def _flower_runs(args, configs, cli_home, connection: str) -> None:
    """Submit each config's run to the SuperLink of ``connection``, one after the other, and wait for it
    (a finished run is shown, with --resume)."""
    import time
    from pathlib import Path

    from fellrec.config import dump
    from fellrec.runtime.flower import deploy

    _check_finished(args, configs)
    for cfg in configs:
        out = Path(args.runs_dir).resolve() / cfg.name
        if not _finished(args, cfg):
            run_config = {"fellrec-config": dump(cfg), "run-dir": str(out), "resume": bool(args.resume),
                          "round-timeout": float(args.round_timeout)}
            run_id = deploy.submit(cli_home, connection, run_config, Path(args.runs_dir).resolve() /
                                   f".{cfg.name}.flower-run-config.toml", args.federation_config)
            algorithm = f"fedpa:{cfg.train.algorithm}" if cfg.model.backbone == "ctr" else cfg.train.algorithm
            print(f"run {run_id} submitted to '{connection}': {cfg.name} ({algorithm}, {cfg.train.rounds} rounds)",
                  flush=True)
            seen = [0]

            def progress(_record, out=out, seen=seen) -> None:
                log = out / "metrics.jsonl"  # on this machine when the SuperLink runs here
                if args.quiet or not log.exists():
                    return
                rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
                for row in rows[seen[0]:]:
                    losses = [v.get("loss") for v in row.get("train", {}).values() if v.get("loss") is not None]
                    loss = f", mean train loss {sum(losses) / len(losses):.4f}" if losses else ""
                    print(f"  round {row['round']} done at {row['time_s']:.0f} s{loss}", flush=True)
                seen[0] = len(rows)

            started = time.time()
            deploy.wait_run(cli_home, connection, run_id, timeout_s=args.timeout, on_poll=progress)
            print(f"run {run_id} finished:completed in {time.time() - started:.0f} s")
        print(f"\n{out}/")
        print(format_results(json.loads((out / "results.json").read_text())))


def format_results(r: dict, metrics: tuple[str, ...] = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")) -> str:
    """Per-client and overall test metrics as a table, then the imbalance across clients and the costs."""
    from fellrec.report import human_bytes
    from fellrec.results import task_of

    if task_of(r) == "ctr":
        return format_ctr_results(r)
    names, best = r.get("client_names", {}), r.get("best_round", {})

    def num(v):
        return "-" if v is None else f"{v:.4f}"

    header = ["client", "name", "n", *metrics, "best round"]
    rows = [[str(c), names.get(str(c), ""), str(v["n"]), *(num(v[m]) for m in metrics), str(best.get(str(c), "-"))]
            for c, v in r["clients"].items()]
    rows.append(["overall", "", str(sum(v["n"] for v in r["clients"].values())),
                 *(num(r["overall"][m]) for m in metrics), ""])
    ci = (r.get("intervals") or {}).get("overall") or {}
    if ci:
        from fellrec.report import fmt_interval

        rows.append(["95% CI", "", "", *(fmt_interval(ci.get(m)) for m in metrics), ""])
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in rows]
    for m in metrics[:1]:
        imb = r["imbalance"].get(m, {})
        if imb:
            ratio = imb["max_min_ratio"]
            lines.append(f"{m} across clients: std {imb['std']:.4f}, min {imb['min']:.4f}, max/min "
                         f"{'-' if ratio is None else f'{ratio:.2f}'}, gini {imb['gini'] or 0:.3f}")
    comm = r.get("communication", {})
    sent = (f", {human_bytes(comm['bytes_up'])} up / {human_bytes(comm['bytes_down'])} down"
            if comm.get("bytes_up") or comm.get("bytes_down") else "")
    rounds = f", {r['rounds']} rounds" if "rounds" in r else ""
    lines.append(f"{r['backbone']} / {r['algorithm']} on {r['dataset']}: {r['samples']['train']:,} train "
                 f"samples, {r['samples']['test']:,} test users{rounds}{sent}, {r['time_s']:.0f} s")
    lines += [f"warning: {w}" for w in r.get("warnings") or []]
    return "\n".join(lines)


def format_ctr_results(r: dict) -> str:
    """FedPA-style results: pooled CTR metrics at the selected round."""
    from fellrec.report import human_bytes

    metrics = [m for m in ("auc", "gauc", "logloss", "precision", "recall", "f1") if m in r["overall"]]
    header = ["pooled", *metrics]
    rows = [["test", *(f"{r['overall'][m]:.4f}" for m in metrics)],
            ["valid", *(f"{r['valid'][m]:.4f}" for m in metrics)]]
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    comm = r["communication"]
    lines.append(f"{r['algorithm']} on {r['dataset']}: {r['users']['private']} private users as clients "
                 f"({r['users']['public']} public for pre-training), best round {r['best_round']} of {r['rounds']}, "
                 f"{human_bytes(comm['bytes_up'])} up / {human_bytes(comm['bytes_down'])} down, {r['time_s']:.0f} s")
    return "\n".join(lines)


def cmd_data_formats(args) -> None:
    """List the dataset formats and what data.path must point to for each."""
    from fellrec.data.registry import FORMATS

    for name, (_, expects) in FORMATS.items():
        print(f"{name:16} {expects}")


def cmd_config_show(args) -> None:
    """Print the full resolved config (defaults, file, then --set overrides)."""
    from fellrec.config import dump

    print(dump(_config(args)), end="")


def cmd_config_keys(args) -> None:
    """Print every config key with its default and what it does."""
    from fellrec.config import describe

    for key, default, doc in describe():
        print(f"{key} = {json.dumps(default)}\n    {doc}")


COMMANDS = {
    ("run", None): cmd_run,
    ("report", None): cmd_report,
    ("compare", None): cmd_compare,
    ("data", "stats"): cmd_data_stats,
    ("data", "formats"): cmd_data_formats,
    ("config", "show"): cmd_config_show,
    ("config", "keys"): cmd_config_keys,
    ("flower", "up"): cmd_flower_up,
    ("flower", "run"): cmd_flower_run,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fellrec", description="Federated fine-tuning of LLM-based "
                                     "recommenders: FELLRec, FedPA and the baselines.")
    parser.add_argument("--version", action="version", version=f"fellrec {__version__}")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    subs = {}
    for (group, name), func in COMMANDS.items():
        doc = func.__doc__.splitlines()[0]
        if name is None:
            p = groups.add_parser(group, help=doc, description=func.__doc__)
        else:
            if group not in subs:
                subs[group] = groups.add_parser(group, help=f"{group} commands").add_subparsers(
                    dest="command", required=True, metavar="SUBCOMMAND")
            p = subs[group].add_parser(name, help=doc, description=func.__doc__)
        p.set_defaults(func=func)
        if func is cmd_run:
            p.add_argument("--runs-dir", default="runs", help="where runs/<name>/ goes (default: runs)")
            p.add_argument("--quiet", action="store_true", help="no progress bars")
            p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                           help="continue RUN_DIR (with its own config) after a crash; with CONFIG instead: "
                           "continue or finish its runs, starting those that have not begun")
        if func is cmd_report:
            p.add_argument("run_dir", help="a finished run's directory, e.g. runs/demo-fedavg")
        if func is cmd_compare:
            p.add_argument("run_dirs", nargs="+", help="finished runs' directories")
            p.add_argument("--metric", default="recall@10", help="the per-client metric compared (default recall@10)")
            p.add_argument("--out", help="also write compare.md and compare.png into this directory")
        if func in (cmd_flower_up, cmd_flower_run):
            p.add_argument("--home", default=".flower", help="the local deployment's folder: logs, client state, "
                           "and cli/config.toml with the flwr connection (default: .flower)")
        if func is cmd_flower_up:
            p.add_argument("--clients", type=int, required=True, help="SuperNodes to start, one per client (with "
                           "--simulation: virtual SuperNodes per run)")
            p.add_argument("--port", type=int, help="the SuperLink's port (default: a free one)")
            p.add_argument("--tls", action="store_true", help="TLS between the SuperLink and the SuperNodes and CLI, "
                           "with a certificate authority made for this deployment (files in HOME/security)")
            p.add_argument("--auth", action="store_true", help="with --tls: SuperNode authentication, each "
                           "SuperNode's public key registered with the SuperLink; unregistered ones are refused")
            p.add_argument("--threads", type=int, help="CPU threads per SuperNode's client (default: the cores "
                           "divided among the clients, at least 1)")
            p.add_argument("--no-worker", action="store_true", help="build each client anew in every ClientApp "
                           "process instead of keeping it in a worker process between messages (slower; see "
                           "docs/FLOWER.md)")
        if func in (cmd_flower_up, cmd_flower_run):
            p.add_argument("--simulation", action="store_true", help="Flower's simulation engine: virtual SuperNodes "
                           "in Ray, no SuperNode processes (needs pip install -e '.[simulation]')")
            p.add_argument("--client-cpus", type=int, help="with --simulation: Ray's CPUs per client; clients "
                           "train in parallel as the CPUs allow (default: Flower's, 2)")
            p.add_argument("--client-gpus", type=float, help="with --simulation: the share of a GPU per client "
                           "(default: none)")
        if func is cmd_flower_run:
            p.add_argument("--runs-dir", default="runs", help="where runs/<name>/ goes, on the SuperLink's machine "
                           "(default: runs)")
            p.add_argument("--flwr-home", help="a folder whose config.toml names the SuperLink (default: HOME/cli)")
            p.add_argument("--connection", help="the connection in that config.toml (default: fellrec-local)")
            p.add_argument("--resume", action="store_true", help="continue an unfinished run, skip finished ones")
            p.add_argument("--round-timeout", type=float, default=3600.0,
                           help="seconds the server waits for the clients' answers to one message")
            p.add_argument("--timeout", type=float, default=7 * 24 * 3600.0, help="seconds to wait for the run")
            p.add_argument("--federation-config", help="passed on to flwr run, e.g. 'num-supernodes=5' for a "
                           "simulation SuperLink of your own")
            p.add_argument("--quiet", action="store_true", help="no progress lines")
        if func in (cmd_data_stats, cmd_config_show, cmd_run, cmd_flower_run):
            p.add_argument("config", nargs="?", help="YAML config (default: all defaults)")
            p.add_argument("--set", action="append", metavar="KEY=VALUE",
                           help="override one key, e.g. --set partition.num_clients=8 (repeatable)")
        if func is cmd_data_stats:
            p.add_argument("--json", action="store_true", help="print JSON instead of tables")
            p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FellrecError as err:
        print(f"fellrec: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fellrec: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
