"""Issue 16 §3: FedAvg, FELLRec and Local over how non-IID the clients are. Reads finished runs and
prints one markdown table (per partition and algorithm: recall@10 and NDCG@10, mean over the seeds
run, with the bootstrap interval of a single seed's run or the seeds' std, and the spread across
clients), and draws one plot.

    python experiments/noniid.py runs/claims-dir*-s*-* runs/claims-loo-s*-fedavg runs/claims-loo-s*-fellrec \
        runs/claims-loo-s*-local --plot docs/plots/noniid.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

ORDER = ["dirichlet α=0.1", "dirichlet α=1", "dirichlet α=10", "k-means"]


def partition_of(config: dict) -> str:
    part = config.get("partition") or {}
    if part.get("method") == "dirichlet":
        return f"dirichlet α={float(part.get('alpha')):g}"
    return "k-means" if part.get("method") == "kmeans" else str(part.get("method"))


def load(paths: list[str]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in map(Path, paths):
        if not (p / "results.json").is_file():
            continue
        res = json.loads((p / "results.json").read_text())
        config = yaml.safe_load((p / "config.yaml").read_text())
        groups.setdefault((partition_of(config), res["algorithm"]), []).append(res)
    return groups


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    groups = load(args.runs)
    if not groups:
        print("no finished run among the paths given", file=sys.stderr)
        return 2
    parts = [p for p in ORDER if any(k[0] == p for k in groups)] + sorted({k[0] for k in groups} - set(ORDER))
    algorithms = sorted({k[1] for k in groups})
    print("| clients | algorithm | seeds | R@10 | 95% CI (one seed) or std (seeds) | N@10 | std R@10 across clients "
          "| min R@10 | Gini R@10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for part in parts:
        for alg in algorithms:
            runs = groups.get((part, alg))
            if not runs:
                continue
            r10 = np.array([r["overall"]["recall@10"] for r in runs])
            n10 = np.array([r["overall"]["ndcg@10"] for r in runs])
            imb = [r["imbalance"]["recall@10"] for r in runs]
            spread = (f"[{runs[0]['intervals']['overall']['recall@10'][0]:.4f}, "
                      f"{runs[0]['intervals']['overall']['recall@10'][1]:.4f}]" if len(runs) == 1
                      else f"± {r10.std(ddof=1):.4f}")
            print(f"| {part} | {alg} | {len(runs)} | {r10.mean():.4f} | {spread} | {n10.mean():.4f} | "
                  f"{np.mean([i['std'] for i in imb]):.4f} | {np.mean([i['min'] for i in imb]):.4f} | "
                  f"{np.mean([i['gini'] for i in imb]):.3f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(algorithms)
        for j, alg in enumerate(algorithms):
            xs, ys, lo, hi = [], [], [], []
            for i, part in enumerate(parts):
                runs = groups.get((part, alg))
                if not runs:
                    continue
                r10 = np.array([r["overall"]["recall@10"] for r in runs])
                low, high = (runs[0]["intervals"]["overall"]["recall@10"] if len(runs) == 1
                             else (r10.mean() - r10.std(ddof=1), r10.mean() + r10.std(ddof=1)))
                xs.append(i + (j - (len(algorithms) - 1) / 2) * width)
                ys.append(r10.mean())
                lo.append(r10.mean() - low)
                hi.append(high - r10.mean())
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=alg)
        ax.set_xticks(range(len(parts)), parts)
        ax.set_ylabel("recall@10 (test, all users)")
        ax.set_title("FedAvg, FELLRec and Local as the clients grow less alike (left)")
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"\n![non-IID]({args.plot})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
