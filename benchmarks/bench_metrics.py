"""Time fellrec.metrics.rank_metrics on random full-ranking data.

    python benchmarks/bench_metrics.py --users 10000 --items 10000

Builds random float32 scores, 1..gt-max ground-truth items and ``--exclude`` excluded items per
user, runs ``rank_metrics`` once to warm up, then ``--reps`` times, and prints min and median
seconds and users/s. A plain ``torch.topk`` over the same scores is timed too, as a floor.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from fellrec.metrics import rank_metrics


def _lists(rng: np.random.Generator, n_users: int, n_items: int, lengths: np.ndarray) -> list[np.ndarray]:
    flat = rng.integers(0, n_items, size=int(lengths.sum()), dtype=np.int64)
    return np.split(flat, np.cumsum(lengths)[:-1])


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--gt-max", type=int, default=20, help="ground truth per user: 1..gt-max items")
    ap.add_argument("--exclude", type=int, default=100, help="excluded (history) items per user")
    ap.add_argument("--batch", type=int, default=1024, help="rank_metrics batch_size")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    scores = torch.rand(args.users, args.items, dtype=torch.float32)
    targets = _lists(rng, args.users, args.items, rng.integers(1, args.gt_max + 1, size=args.users))
    exclude = _lists(rng, args.users, args.items, np.full(args.users, args.exclude))
    ks = (5, 10, 20)

    cpu = platform.processor() or platform.machine()
    py = platform.python_version()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {cpu}, python {py}")
    print(
        f"users {args.users:,} x items {args.items:,} (float32, {scores.numel() * 4 / 2**20:.0f} MiB), "
        f"GT 1..{args.gt_max}, excluded {args.exclude}/user, batch {args.batch}, ks {ks}, reps {args.reps}"
    )

    def run():
        return rank_metrics(scores, targets, exclude, ks=ks, batch_size=args.batch)

    out = run()  # warm-up
    times = _time(run, args.reps)
    floor = _time(lambda: torch.topk(scores, max(ks), dim=1), args.reps)

    t_min, t_med = min(times), statistics.median(times)
    print(f"rank_metrics: min {t_min:.3f} s, median {t_med:.3f} s, {args.users / t_min:,.0f} users/s (best)")
    print(f"torch.topk alone: min {min(floor):.3f} s, median {statistics.median(floor):.3f} s")
    recall, ndcg = np.nanmean(out["recall@20"]), np.nanmean(out["ndcg@20"])
    print(f"sanity (random scores): mean recall@20 {recall:.5f}, ndcg@20 {ndcg:.5f}")


if __name__ == "__main__":
    main()
