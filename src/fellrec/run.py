"""``fellrec run``: one experiment, top to bottom, into ``runs/<name>/``.

data -> clients' samples -> backbone (one base model + LoRA) -> strategy + client trainers ->
embedded runtime (rounds, per-client validation, checkpoints) -> test of each client with its
selected adapter -> files:

- ``config.yaml``: the full resolved config;
- ``metrics.jsonl``: one JSON line per round (losses, validation metrics per client, bytes);
- ``results.json``: ``overall``, ``clients``, ``imbalance`` (see ``fellrec.metrics.summarize``),
  ``communication``, ``time_s`` (the whole run: data, rounds, test) and ``train_time_s`` (the rounds,
  with validation), the per-client selected rounds and the sample counts;
- ``adapters/``: each client's selected adapter, and the global one where the algorithm has one;
- ``report.md`` and ``plots/*.png`` (see ``fellrec.report``).

A finished run (its ``results.json`` exists) is never overwritten. A run that was cut short keeps
its ``checkpoint.safetensors``; ``run(..., resume=True)`` continues it.

Most-popular and SASRec are centralized reference points without adapters; they take the short
path at the end of this file.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fellrec.build import (
    build_backbone,
    catalogue,
    client_counts,
    client_samples,
    concat,
    pick_test,
    private_names,
    protocol_warnings,
    selection_metric,
    strategy_options,
    trainer_options,
    warm_tables,
    warn,
)
from fellrec.config import Config, dump, load_config, to_dict
from fellrec.errors import ConfigError
from fellrec.evaluate import evaluate, test_summary
from fellrec.files import plain, save_tensors, write_text
from fellrec.holdout import Samples
from fellrec.pipeline import Prepared, prepare
from fellrec.results import record, rounds
from fellrec.rundir import begun, complete, finish, is_finished, is_resumable
from fellrec.runtime.embedded import embedded
from fellrec.strategies import POOLED, make_strategy
from fellrec.trainer import AdapterTrainer, is_split, read_full


def run_all(cfg: Config, runs_dir: str | Path = "runs", progress: bool = True, resume: bool = False) -> list[Path]:
    """``run`` once, or once per entry of ``algorithms`` (into ``runs/<name>-<algorithm>/``)."""
    return [run(one, runs_dir, progress, resume) for one in per_algorithm(cfg)]


def per_algorithm(cfg: Config) -> list[Config]:
    """``cfg`` alone, or one config per entry of ``algorithms``, named ``<name>-<algorithm>``."""
    if not cfg.algorithms:
        return [cfg]
    out = []
    for a in cfg.algorithms:
        one = dataclasses.replace(cfg, name=f"{cfg.name}-{a}", algorithms=[])
        one.train = dataclasses.replace(cfg.train, algorithm=a)
        out.append(one)
    return out


def run(cfg: Config, runs_dir: str | Path = "runs", progress: bool = True, resume: bool = False) -> Path:
    out = Path(runs_dir) / cfg.name
    if is_finished(out):
        if resume:
            return complete(out)
        raise ConfigError(f"name: {out} already holds a finished run; see it with `fellrec report {out}`, or "
                          "choose another name (--set name=...)")
    if is_resumable(out):
        if not resume:
            raise ConfigError(f"name: {out} holds an unfinished run; continue it with `fellrec run --resume {out}`, "
                              "or choose another name (--set name=...)")
        check_same_config(out / "config.yaml", cfg)
    with begun(out, dump(cfg)):
        started = time.time()
        torch.manual_seed(cfg.seed)
        if cfg.model.backbone == "ctr":  # FedPA: its own data path (per-user split, one client per user)
            return finish(out, started, ctr_run(cfg, out, progress))
        p = prepare(cfg, progress=progress)
        test = pick_test(p)
        warnings = protocol_warnings(list(p.partition.names), client_counts(p, p.samples.valid),
                                     client_counts(p, test), cfg.split.method)
        if cfg.model.backbone in ("most-popular", "sasrec"):
            warn(warnings)
            per_user, parts = reference_run(cfg, p, test, out, progress)
        else:  # warns once the backbone is built, so that a start that fails says only why
            per_user, parts, earlier = federated_run(cfg, p, test, out, progress, warnings)
            started -= earlier  # a resumed run counts the rounds of the processes before
        client_of = p.client_of(test.user)
        results = record(cfg, dataset=p.dataset.name, summary=test_summary(per_user, client_of),
                         client_names=dict(enumerate(p.partition.names)), warnings=warnings, **parts)
        return finish(out, started, results, (per_user, client_of, test.user))


def ctr_run(cfg: Config, out: Path, progress: bool) -> dict:
    """FedPA's two phases: Open_Train on the public users, then Fed_Train (one client per private user)
    in the embedded runtime, pooled validation per round, the test at the best round."""
    from fellrec.fedpa.build import fed_rounds, federation_options, fedpa_results, foundation
    from fellrec.fedpa.trainer import build_federation
    from fellrec.pipeline import prepare_ctr

    c = prepare_ctr(cfg)
    ds, feats, public, split = c.dataset, c.features, c.public, c.split
    base, pre = foundation(cfg, ds, feats, split, out)
    fed = build_federation(ds, feats, split, base, **federation_options(cfg))
    runtime = embedded(fed.strategy, fed.trainers, fed.trainers, rounds=fed_rounds(cfg),
                       client_fraction=cfg.train.client_fraction, eval_every=max(1, cfg.eval.every),
                       seed=cfg.seed, run_dir=out, progress=progress)
    runtime.run()
    return fedpa_results(cfg, ds, public, split, pre, runtime, fed.strategy, list(fed.trainers.values()))


def check_same_config(path: Path, cfg: Config) -> None:
    """A resumed run must go on with the config it started with."""
    saved = to_dict(load_config(path))
    now = to_dict(cfg)

    def first_difference(a, b, prefix=""):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a:
                d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
                if d:
                    return d
            return None
        return prefix.rstrip(".") if a != b else None

    key = first_difference(saved, now)
    if key:
        raise ConfigError(f"{path}: {key}: the run was started with {key} = {_lookup(saved, key)!r}, not "
                          f"{_lookup(now, key)!r}; resume it with its own config (`fellrec run --resume "
                          f"{path.parent}`)")


def _lookup(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


# ---- data per client ------------------------------------------------------------------------


# ---- LLM backbones, federated ---------------------------------------------------------------


def federated_run(cfg: Config, p: Prepared, test: Samples, out: Path, progress: bool, warnings=()):
    """Train with the configured algorithm in the embedded runtime; test each client's selected adapter."""
    training, evaluation = cfg.train, cfg.eval
    select_by = selection_metric(cfg)
    data = client_samples(p)
    backbone = build_backbone(cfg, *catalogue(p))
    warn(warnings)
    warm_tables(backbone)
    initial = read_full(backbone.model)
    kept = private_names(cfg, backbone) if training.algorithm != "centralized" else set()
    common = trainer_options(cfg, initial, kept)
    clients = {c: AdapterTrainer(c, backbone, train, valid, **common) for c, (train, valid) in data.items()}
    if training.algorithm == "centralized":
        pooled = concat([train for train, _ in data.values()])
        per_round = max(1, int(np.ceil(training.client_fraction * len(clients))))
        steps = (int(np.ceil(training.local_epochs * len(pooled) / training.batch_size)) if training.local_epochs > 0
                 else training.local_steps * per_round)
        trainers = {POOLED: AdapterTrainer(POOLED, backbone, pooled, pooled.take([]), steps_per_round=steps,
                                           **common)}
    else:
        trainers = clients
    shared = {k: v for k, v in initial.items() if k not in kept}
    strategy = make_strategy(training.algorithm, shared, list(trainers), **strategy_options(cfg))
    runtime = embedded(strategy, trainers, clients, rounds=training.rounds,
                              client_fraction=1.0 if training.algorithm == "centralized" else training.client_fraction,
                              eval_every=evaluation.every, seed=cfg.seed, run_dir=out, progress=progress,
                              kept_on_server=set(backbone.model.trunk_names()) if is_split(backbone.model) else set())
    runtime.run()

    per_user = {}
    test_client = p.client_of(test.user)
    bar = tqdm(total=len(test), desc="test", unit="user", disable=not progress, leave=False)
    for cid, trainer in clients.items():
        mine = np.flatnonzero(test_client == int(cid))
        if len(mine) == 0:
            continue
        scores = trainer.test(test.take(mine))
        for k, v in scores.items():
            per_user.setdefault(k, np.full(len(test), np.nan))[mine] = v
        bar.update(len(mine))
        save_tensors(out / "adapters" / f"client-{cid}.safetensors", trainer.best)
    bar.close()
    if hasattr(backbone, "save_cache"):
        backbone.save_cache()
    if strategy.global_tensors() is not None:
        save_tensors(out / "adapters" / "global.safetensors", strategy.global_tensors())
    parts = rounds(runtime, cfg, select_by=select_by,
                   steps_per_round={c: tr.steps_per_round for c, tr in trainers.items()},
                   best_round={c: tr.best_round for c, tr in clients.items()},
                   samples={"train": sum(len(tr.train) for tr in trainers.values()),
                            "valid": sum(len(v) for _, v in data.values()), "test": len(test)})
    return per_user, parts, runtime.restored_elapsed


# ---- reference points without adapters (centralized only) --------------------------------------


def reference_run(cfg: Config, p: Prepared, test: Samples, out: Path, progress: bool):
    """Most-popular and SASRec, trained centrally on all clients' training samples."""
    data = client_samples(p)
    train, valid = concat([d[0] for d in data.values()]), concat([d[1] for d in data.values()])
    if cfg.model.backbone == "most-popular":
        from fellrec.baselines.popular import MostPopular

        rank, summary = MostPopular(p.dataset.num_items).fit(p.split.train).rank, {}
        (out / "metrics.jsonl").write_text("", encoding="utf-8")
    else:
        rank, summary = train_sasrec(cfg, p, train, valid, out, progress)
    bar = tqdm(total=len(test), desc="test", unit="user", disable=not progress, leave=False)
    per_user = evaluate(rank, test, batch_size=cfg.eval.batch_size, ks=cfg.eval.ks, progress=bar)
    bar.close()
    return per_user, {"train": summary, "samples": {"train": len(train), "valid": len(valid), "test": len(test)},
                      "communication": {"bytes_up": 0, "bytes_down": 0, "per_client": {}}}


def train_sasrec(cfg: Config, p: Prepared, train: Samples, valid: Samples, out: Path, progress: bool):
    from fellrec.baselines.sasrec import SASRecConfig, fit_sasrec

    model_cfg = cfg.model
    scfg = SASRecConfig(dim=model_cfg.sasrec_dim, blocks=model_cfg.sasrec_blocks, dropout=model_cfg.sasrec_dropout,
                        max_len=cfg.split.history_len, epochs=model_cfg.sasrec_epochs, seed=cfg.seed)
    model, history = fit_sasrec(p.dataset.num_items, train, valid, scfg, progress=progress)
    lines = [json.dumps(plain({"epoch": i, "loss": loss, scfg.metric: value}))
             for i, (loss, value) in enumerate(zip(history.losses, history.valid, strict=False), start=1)]
    write_text(out / "metrics.jsonl", "".join(line + "\n" for line in lines))
    return model.rank, {"epochs": len(history.losses), "best_epoch": history.best_epoch,
                        "select_by": scfg.metric, "valid": history.valid}


# ---- files -------------------------------------------------------------------------------------


def run_from_dir(run_dir: str | Path, progress: bool = True) -> Path:
    """Continue the run in ``run_dir`` with the config it was started with."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    return run(load_config(run_dir / "config.yaml"), runs_dir=run_dir.parent, progress=progress, resume=True)
