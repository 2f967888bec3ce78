"""Time FedPA rounds with every private user taking part, on ML-100K and on a synthetic dataset.

    OMP_NUM_THREADS=1 python benchmarks/bench_fedpa.py [--rounds 2] [--synthetic-users 10000]

For each dataset (run in a child process of its own, so that peak memory is per scenario):

- ``fellrec``: FedPA over one shared FedPAModel (per-client state = small tensors), driven by
  ``fellrec.runtime.embedded`` (local training, aggregation, validation of every client, a checkpoint each
  round); per-round seconds from its ``metrics.jsonl``, plus the training part alone (fit of every
  client + aggregation) timed separately;
- ``deepcopy``: the released code's approach for the training part: each client, each round,
  deep-copies a complete model module (all user-attribute tables, frozen layers, gate, user
  adapter and every group adapter), loads its private and shared tensors into it, trains it with a
  fresh Adam and reads the tensors back. Attribute lookups are tensor indexing here (the released
  code uses ``DataFrame.loc`` inside ``forward``, which is slower still), so this is a lower bound.

Peak memory is the process's peak resident set size (``resource.getrusage``), measured after
loading the data, and the peak during the rounds; torch's CPU allocations are not visible to
tracemalloc.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from fellrec.data.tables import Dataset
from fellrec.fedpa import build_features, build_federation, select_public, split_users
from fellrec.fedpa.model import CTRModel
from fellrec.runtime.embedded import embedded

GROUPS = ("gender", "age")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synthetic(n_users: int, n_items: int = 1682, per_user: int = 30, seed: int = 0) -> Dataset:
    """MovieLens-like users/items with a label that depends on (age, genre) and a user bias."""
    rng = np.random.default_rng(seed)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Western"]
    item_g = rng.integers(0, len(genres), (n_items, 2))
    items = pd.DataFrame({"item_id": np.arange(1, n_items + 1), "title": "",
                          "year": pd.array(rng.integers(1930, 1999, n_items), dtype="Int64"),
                          "genres": [tuple(sorted({genres[a], genres[b]})) for a, b in item_g]})
    age = rng.integers(10, 70, n_users)
    users = pd.DataFrame({"user_id": np.arange(1, n_users + 1), "age": age,
                          "gender": rng.choice(["M", "F"], n_users),
                          "occupation": rng.choice(["student", "writer", "engineer", "artist", "other"], n_users),
                          "zip_code": [f"{z:05d}" for z in rng.integers(0, 99999, n_users)]})
    n = rng.poisson(per_user, n_users).clip(5)
    u = np.repeat(np.arange(n_users), n)
    it = rng.integers(0, n_items, len(u))
    taste = np.sin(age[u] / 9.0 + item_g[it, 0]) + rng.normal(0, 0.3, n_users)[u]
    rating = np.where(taste + rng.normal(0, 1, len(u)) > 0, 5.0, 2.0)
    inter = pd.DataFrame({"user_id": u + 1, "item_id": it + 1, "timestamp": np.arange(len(u), dtype=float),
                          "rating": rating})
    return Dataset.from_raw("ml-synthetic", inter, items, users)


class ReleasedStyleModel(nn.Module):
    """Everything one client touches as one module, deep-copied per client as the released code does."""

    def __init__(self, base: CTRModel, item_codes: torch.Tensor, group_cards: dict[str, int], rank: int = 4,
                 gate_hidden=(8, 4)):
        super().__init__()
        self.base = copy.deepcopy(base)
        self.register_buffer("item_codes", item_codes)
        k = 2 + len(group_cards)
        sizes = self.base.sizes
        self.gates = nn.ModuleList(nn.Sequential(nn.Linear(a, g), nn.ReLU(), nn.Linear(g, k))
                                   for a, g in zip(sizes[:-1], gate_hidden, strict=True))
        self.loras = nn.ParameterDict()
        for layer, (a, b) in enumerate(pairwise(sizes)):
            self.loras[f"user_{layer}_A"] = nn.Parameter(torch.randn(a, rank) * 0.01)
            self.loras[f"user_{layer}_B"] = nn.Parameter(torch.zeros(rank, b))
            for attr, card in group_cards.items():
                for v in range(card):
                    self.loras[f"{attr}_{layer}_{v}_A"] = nn.Parameter(torch.randn(a, rank) * 0.01)
                    self.loras[f"{attr}_{layer}_{v}_B"] = nn.Parameter(torch.zeros(rank, b))
        self.groups = list(group_cards)
        for p in [*self.base.layers.parameters(), *self.base.item_emb.parameters()]:
            p.requires_grad_(False)

    def forward(self, user_codes, items, values):
        n = len(items)
        x = torch.cat([self.base.user_vectors(user_codes.view(1, -1).expand(n, -1)),
                       self.base.item_vectors(self.item_codes[items])], dim=1)
        for layer, lin in enumerate(self.base.layers):
            g = self.gates[layer](x).softmax(-1)
            h = g[:, :1] * F.relu(lin(x)) + g[:, 1:2] * 0.25 * (x @ self.loras[f"user_{layer}_A"]
                                                                  @ self.loras[f"user_{layer}_B"])
            for k, attr in enumerate(self.groups):
                v = values[attr]
                h = h + g[:, k + 2:k + 3] * 0.25 * (x @ self.loras[f"{attr}_{layer}_{v}_A"]
                                                     @ self.loras[f"{attr}_{layer}_{v}_B"])
            x = h
        return self.base.out(x).squeeze(-1)


def deepcopy_round(template: ReleasedStyleModel, fed, private: dict, server: dict, lr: float = 0.1) -> None:
    """One training round the released way: a deep copy of the template per client."""
    uploads = []
    for c, t in fed.trainers.items():
        model = copy.deepcopy(template)
        state = {**private.get(c, {}), **server}
        model.load_state_dict(state, strict=False)
        values = {a: int(v) for a, v in fed.strategy.client_groups[c].items()}
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        d = t.data
        loss = F.binary_cross_entropy_with_logits(model(t.user_codes, d.train_items, values), d.train_labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sd = model.state_dict()
        private[c] = {k: v.clone() for k, v in sd.items() if k.startswith("base.user_emb") or "user_" in k}
        uploads.append({k: v.clone() for k, v in sd.items() if k.startswith("gates") or k.startswith("base.out")})
    for k in uploads[0]:
        server[k] = torch.stack([u[k] for u in uploads]).mean(0)


def scenario(name: str, rounds: int, synthetic_users: int) -> dict:
    torch.set_num_threads(1)
    if name == "ml-100k":
        from fellrec.data.registry import load_dataset

        ds = load_dataset("ml-100k-recbole", None)
    else:
        ds = synthetic(synthetic_users)
    feats = build_features(ds)
    sp = split_users(ds, select_public(ds, feats, fraction=0.2, seed=0))
    torch.manual_seed(0)
    base = CTRModel(feats.user_cards, feats.item_cards, feats.item_widths)  # timing needs no pre-training
    loaded = rss_mb()
    out = {"dataset": name, "clients": len(sp.private_users), "interactions": len(ds.interactions),
           "train_rows": len(sp.train_rows), "rss_after_load_mb": round(loaded, 1)}

    fed = build_federation(ds, feats, sp, base, algorithm="fedpa", group_attributes=GROUPS, lr=0.1)
    with tempfile.TemporaryDirectory() as tmp:
        embedded(fed.strategy, fed.trainers, fed.trainers, rounds=rounds, client_fraction=1.0,
                        eval_every=1, seed=0, run_dir=Path(tmp), progress=False).run()
        times = [json.loads(line)["time_s"] for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        ckpt_mb = (Path(tmp) / "checkpoint.safetensors").stat().st_size / 2**20
    out["fellrec_round_s"] = [round(b - a, 2) for a, b in zip([0.0, *times[:-1]], times, strict=True)]
    out["checkpoint_mb"] = round(ckpt_mb, 1)
    fit_times = []
    for rnd in range(rounds + 1, 2 * rounds + 1):
        t0 = time.perf_counter()
        updates = [tr.fit(fed.strategy.configure_fit(rnd, c), rnd) for c, tr in fed.trainers.items()]
        fed.strategy.aggregate(rnd, updates)
        fit_times.append(round(time.perf_counter() - t0, 2))
    out["fellrec_train_only_s"] = fit_times
    out["fellrec_peak_rss_mb"] = round(rss_mb(), 1)

    template = ReleasedStyleModel(base, torch.from_numpy(feats.item_codes), fed.model.group_cards)
    private, server = {}, {}
    dc_times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        deepcopy_round(template, fed, private, server)
        dc_times.append(round(time.perf_counter() - t0, 2))
    out["deepcopy_train_only_s"] = dc_times
    out["deepcopy_template_params"] = sum(p.numel() for p in template.parameters())
    out["peak_rss_after_deepcopy_mb"] = round(rss_mb(), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--synthetic-users", type=int, default=10_000)
    ap.add_argument("--only", choices=["ml-100k", "synthetic"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(scenario(args.only, args.rounds, args.synthetic_users)))
        return
    print(f"python {platform.python_version()}, torch {torch.__version__}, {platform.processor() or platform.machine()}"
          f", torch threads 1, rounds {args.rounds}")
    for name in ("ml-100k", "synthetic"):
        proc = subprocess.run([sys.executable, __file__, "--only", name, "--rounds", str(args.rounds),
                               "--synthetic-users", str(args.synthetic_users)], capture_output=True, text=True,
                              check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"\n{r['dataset']}: {r['clients']} clients (all take part), {r['interactions']} interactions, "
              f"{r['train_rows']} train rows")
        print(f"  fellrec  round (runtime: train+validate+checkpoint) s: {r['fellrec_round_s']}; "
              f"train only s: {r['fellrec_train_only_s']}; checkpoint {r['checkpoint_mb']} MB")
        print(f"  deepcopy round (train only) s: {r['deepcopy_train_only_s']} "
              f"(template {r['deepcopy_template_params']} parameters)")
        print(f"  peak RSS MB: after loading {r['rss_after_load_mb']}, after fellrec rounds "
              f"{r['fellrec_peak_rss_mb']}, after deepcopy rounds {r['peak_rss_after_deepcopy_mb']}")


if __name__ == "__main__":
    main()
