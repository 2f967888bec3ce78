"""A markdown table per client (a domain in a cross-domain run) of finished runs: each metric with its 95%
bootstrap interval over the client's test users, then the overall row. Issue 16 §5 reports H@5 (recall@5
with one test item per user) and N@10 per domain:

    python experiments/per_client.py runs/crossdomain-genres-s2025-* --metrics recall@5 ndcg@10

With --over-seeds, runs whose names differ only in their seed (``-s<digits>-``) are one column: the mean
± standard deviation over the seeds of each client's metric (issue 16 §1's per-client table):

    python experiments/per_client.py runs/claims-loo-s202?-{fedavg,fellrec} --metrics recall@10 --over-seeds
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np


def cell(value, ci) -> str:
    if value is None:
        return "-"
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{value:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--metrics", nargs="+", default=["recall@5", "ndcg@10"])
    ap.add_argument("--over-seeds", action="store_true", help="one row per group of seeds: mean ± std")
    args = ap.parse_args(argv)
    runs = [(Path(p).name, json.loads((Path(p) / "results.json").read_text())) for p in args.runs
            if (Path(p) / "results.json").is_file()]
    if not runs:
        print("no finished run among the paths given", file=sys.stderr)
        return 2
    names = runs[0][1].get("client_names") or {}
    clients = sorted({c for _, r in runs for c in r["clients"]}, key=lambda c: (len(c), c))
    if args.over_seeds:
        return over_seeds(runs, clients, names, args.metrics)
    print("| client | run | " + " | ".join(f"{m} [95% CI]" for m in args.metrics) + " | test users |")
    print("|---|---|" + "---|" * len(args.metrics) + "---|")
    for c in [*clients, "overall"]:
        for name, r in runs:
            values = r["overall"] if c == "overall" else r["clients"].get(c, {})
            cis = r["intervals"]["overall"] if c == "overall" else r["intervals"]["clients"].get(c, {})
            n = sum(v.get("n", 0) for v in r["clients"].values()) if c == "overall" else values.get("n", "-")
            label = names.get(c, c) if c != "overall" else "overall"
            print(f"| {label} | {name} | " + " | ".join(cell(values.get(m), cis.get(m)) for m in args.metrics)
                  + f" | {n} |")
    return 0


def over_seeds(runs, clients, names, metrics) -> int:
    groups: dict[str, list[dict]] = {}
    for name, r in runs:
        groups.setdefault(re.sub(r"-s\d+(?=-|$)", "-s*", name), []).append(r)
    heads = [f"{g} ({len(rs)} seed{'s' if len(rs) > 1 else ''})" for g, rs in groups.items()]
    print("| client | test users | metric | " + " | ".join(heads) + " |")
    print("|---|---|---|" + "---|" * len(groups))
    first = runs[0][1]
    for c in [*clients, "overall"]:
        n = sum(v.get("n", 0) for v in first["clients"].values()) if c == "overall" else \
            first["clients"].get(c, {}).get("n", "-")
        for m in metrics:
            cells = []
            for rs in groups.values():
                v = np.array([(r["overall"] if c == "overall" else r["clients"].get(c, {})).get(m, np.nan)
                              for r in rs], dtype=float)
                std = f" ± {np.nanstd(v, ddof=1):.4f}" if np.sum(~np.isnan(v)) > 1 else ""
                cells.append(f"{np.nanmean(v):.4f}{std}")
            label = names.get(c, c) if c != "overall" else "overall"
            print(f"| {label} | {n} | {m} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
