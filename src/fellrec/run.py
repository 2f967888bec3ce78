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
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fellrec.adapters import add_lora
from fellrec.backbones.bigrec import BIGRec
from fellrec.backbones.item_tokens import ItemTokenRec
from fellrec.backbones.prompts import Prompt
from fellrec.backbones.ranker import TextRanker
from fellrec.client import AdapterTrainer, derive_seed, is_split, read_full
from fellrec.config import Config, dump, load_config, to_dict
from fellrec.errors import ConfigError
from fellrec.evaluate import evaluate, test_summary
from fellrec.files import save_tensors, write_text
from fellrec.llm import load_base, model_id
from fellrec.metrics import metric_keys
from fellrec.pipeline import Prepared, prepare
from fellrec.rundir import begun, complete, is_finished, is_resumable, write_test_users
from fellrec.runtime.embedded import EmbeddedRuntime, plain
from fellrec.split import Samples
from fellrec.strategies import POOLED, make_strategy


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
        if cfg.model.backbone == "ctr":
            one.fedpa = dataclasses.replace(cfg.fedpa, algorithm=a)
        else:
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
            return finish(cfg, out, started, ctr_run(cfg, out, progress))
        p = prepare(cfg, progress=progress)
        test = pick_test(p)
        warnings = protocol_warnings(list(p.partition.names), client_counts(p, p.samples.valid),
                                     client_counts(p, test), cfg.split.method)
        if cfg.model.backbone in ("most-popular", "sasrec"):
            warn(warnings)
            per_user, extra = reference_run(cfg, p, test, out, progress)
        else:  # warns once the backbone is built, so that a start that fails says only why
            per_user, extra = federated_run(cfg, p, test, out, progress, warnings)
            started -= extra.pop("earlier_s")  # a resumed run counts the rounds of the processes before
        results = {
            "name": cfg.name,
            "algorithm": cfg.train.algorithm,
            "backbone": cfg.model.backbone,
            "dataset": p.dataset.name,
            **test_summary(per_user, p.client_of(test.user)),
            "client_names": {str(c): n for c, n in enumerate(p.partition.names)},
            "warnings": warnings,
            **extra,
        }
        write_test_users(out, per_user, p.client_of(test.user), test.user)
        return finish(cfg, out, started, results)


def ctr_run(cfg: Config, out: Path, progress: bool) -> dict:
    from fellrec.fedpa.run import fedpa_run
    from fellrec.pipeline import load_data
    from fellrec.split import kcore

    ds = kcore(load_data(cfg.data), cfg.data.kcore)
    return {"name": cfg.name, "backbone": "ctr", "dataset": ds.name, **fedpa_run(cfg, ds, out, progress)}


def finish(cfg: Config, out: Path, started: float, results: dict) -> Path:
    """results.json (with the run's whole time), then the checkpoint removed and the report written
    (``fellrec.rundir.complete``, which a resumed run calls again if this process dies before the end)."""
    results["time_s"] = round(time.time() - started, 1)
    write_text(out / "results.json", json.dumps(plain(results), indent=2))
    return complete(out)


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


def client_samples(p: Prepared) -> dict[str, tuple[Samples, Samples]]:
    """Each client's (train, valid) samples, capped per client by a seeded draw as configured."""
    cfg, s = p.config, p.samples
    out = {}
    train_client, valid_client = p.client_of(s.train.user), p.client_of(s.valid.user)
    for c in range(p.num_clients):
        cid = str(c)
        train = s.train.select(train_client == c).subsample(cfg.train.max_train_samples,
                                                            derive_seed(cfg.seed, 0, f"train/{cid}"))
        valid = s.valid.select(valid_client == c).subsample(cfg.eval.max_valid_samples,
                                                            derive_seed(cfg.seed, 0, f"valid/{cid}"))
        out[cid] = (train, valid)
    if sum(len(t) for t, _ in out.values()) == 0:
        raise ConfigError("data: no training samples left after filtering and splitting")
    return out


def warn(warnings) -> None:
    """Print each warning on stderr, one line each."""
    for w in warnings:
        print(f"fellrec: warning: {w}", file=sys.stderr, flush=True)


def protocol_warnings(names: list[str], valid: list[int], tested: list[int], split: str) -> list[str]:
    """What makes a protocol's numbers weak, from each client's numbers of validation samples and test
    users: clients without either, and fewer than 100 test users in all (one hit then moves recall@K
    by 1/n)."""
    out = []
    no_valid = [n for n, v in zip(names, valid, strict=True) if v == 0]
    if no_valid:
        out.append(f"{len(no_valid)} of {len(names)} clients have no validation samples ({', '.join(no_valid)}): "
                   "they cannot select a round and keep their last validated one")
    no_test = [n for n, t in zip(names, tested, strict=True) if t == 0]
    if no_test:
        out.append(f"{len(no_test)} of {len(names)} clients have no test users ({', '.join(no_test)}): they are "
                   "missing from the per-client results and the spread across clients")
    if sum(tested) < 100:
        fix = ("eval.max_test_samples=null tests every user" if split == "leave-one-out"
               else "split.method=leave-one-out tests every user")
        out.append(f"only {sum(tested)} test users ({split} split): one hit moves recall@K by about "
                   f"{1 / max(1, sum(tested)):.3f}, too little to tell algorithms apart; {fix}")
    return out


def client_counts(p: Prepared, samples: Samples) -> list[int]:
    """How many of ``samples`` belong to each client."""
    c = p.client_of(samples.user)
    return np.bincount(c[c >= 0], minlength=p.num_clients).tolist()


def pick_test(p: Prepared) -> Samples:
    s = p.samples.test
    return s.select(p.client_of(s.user) >= 0).subsample(p.config.eval.max_test_samples, p.config.seed + 2)


def concat(parts: list[Samples]) -> Samples:
    return Samples(np.concatenate([x.user for x in parts]), [h for x in parts for h in x.history],
                   [t for x in parts for t in x.targets],
                   None if any(x.exclude is None for x in parts) else [e for x in parts for e in x.exclude])


# ---- LLM backbones, federated ---------------------------------------------------------------


def catalogue(p: Prepared) -> tuple[list[str], str]:
    """(item titles, dataset name): all of the data the backbone is built from."""
    return p.dataset.items["title"].astype(str).tolist(), p.dataset.name


def build_backbone(cfg: Config, titles: list[str], dataset: str) -> BIGRec | TextRanker | ItemTokenRec:
    """Base LM + fresh LoRA adapter + the configured backbone around them, for the catalogue ``titles``
    of ``dataset`` (its name picks the prompt's wording)."""
    m = cfg.model
    prompt = Prompt.for_dataset(dataset, m.prompt_item, m.prompt_items, m.prompt_verb)
    tok, base = load_base(m.name_or_path, texts=[*titles, prompt.instruction(titles[:10])], seed=cfg.seed)
    if m.blocks is not None:
        truncate(base, m.blocks)
    model = add_lora(base, m.lora, seed=cfg.seed).to(pick_device(m.device))
    if cfg.storage.k is not None:
        from fellrec.storage.model import SplitLM

        try:
            model = SplitLM(model, cfg.storage.k, cfg.storage.tail)
        except ValueError as err:
            raise ConfigError(f"storage.k: {err}") from None
        model.server.grad_clip = cfg.train.grad_clip
    key = model_id(m.name_or_path, cfg.seed)
    if m.backbone == "item-tokens":
        try:
            return ItemTokenRec(model, tok, titles, prompt, item_dim=m.item_dim, loss_positions=m.loss_positions,
                                cache_mb=m.cache_mb, seed=cfg.seed, cache_key=key)
        except ValueError as err:
            raise ConfigError(f"storage.k: {err}") from None
    if m.backbone == "bigrec":
        return BIGRec(model, tok, titles, prompt, max_len=m.max_len, train_on_inputs=m.train_on_inputs,
                      num_beams=m.num_beams, max_new_tokens=m.max_new_tokens, cache_key=key)
    return TextRanker(model, tok, titles, prompt, max_len=m.max_len, pooling=m.pooling, item_side=m.item_side,
                      negatives=m.negatives, temperature=m.temperature, seed=cfg.seed, cache_key=key)


def truncate(model, blocks: int) -> None:
    """Keep only the first ``blocks`` blocks of a causal LM (``model.blocks``)."""
    n = model.config.num_hidden_layers
    if blocks > n:
        raise ConfigError(f"model.blocks: {blocks} asked for, the model has {n} blocks")
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:blocks]


def private_names(cfg: Config, backbone) -> set[str]:
    """The adapter tensors that stay on each client and are never sent (``model.item_vectors: private``)."""
    if cfg.model.backbone == "item-tokens" and cfg.model.item_vectors == "private":
        return {n for n in read_full(backbone.model) if n.startswith(backbone.private_names())}
    return set()


def warm_tables(backbone) -> None:
    """Compute the base model's tables (the ranker's frozen item side) before the rounds, so that no
    client's first local training pays for them, or counts their trunk traffic in split mode."""
    if isinstance(backbone, TextRanker) and backbone.item_side == "frozen":
        backbone.item_table()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {name} asked for, but this torch sees no GPU (torch {torch.__version__}); "
                          "use model.device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None


def selection_metric(cfg: Config) -> str:
    e = cfg.eval
    select_by = e.select_by if e.select_by != "auto" else ("loss" if cfg.model.backbone == "bigrec" else "recall@10")
    known = ["loss", *metric_keys(e.ks)]
    if select_by not in known:
        raise ConfigError(f"eval.select_by: {select_by!r} is not one of auto, {', '.join(known)}")
    return select_by


def trainer_options(cfg: Config, initial, kept: set[str] = frozenset()) -> dict:
    """The keyword arguments every client's AdapterTrainer gets (besides its id, backbone and data)."""
    e, m = cfg.eval, cfg.model
    groups = {"items.": m.item_lr} if m.backbone == "item-tokens" and m.item_lr is not None else {}
    return {"settings": cfg.train, "initial": initial, "seed": cfg.seed, "select_by": selection_metric(cfg),
            "ks": tuple(e.ks), "eval_batch_size": e.batch_size, "kept": kept, "group_lrs": groups}


def client_test(p: Prepared, test: Samples, client: str) -> Samples:
    """The test samples of ``client``'s users."""
    return test.take(np.flatnonzero(p.client_of(test.user) == int(client)))


def federated_run(cfg: Config, p: Prepared, test: Samples, out: Path, progress: bool, warnings=()):
    """Train with the configured algorithm in the embedded runtime; test each client's selected adapter."""
    t, e = cfg.train, cfg.eval
    select_by = selection_metric(cfg)
    data = client_samples(p)
    backbone = build_backbone(cfg, *catalogue(p))
    warn(warnings)
    warm_tables(backbone)
    initial = read_full(backbone.model)
    kept = private_names(cfg, backbone) if t.algorithm != "centralized" else set()
    common = trainer_options(cfg, initial, kept)
    clients = {c: AdapterTrainer(c, backbone, train, valid, **common) for c, (train, valid) in data.items()}
    if t.algorithm == "centralized":
        pooled = concat([train for train, _ in data.values()])
        per_round = max(1, int(np.ceil(t.client_fraction * len(clients))))
        steps = (int(np.ceil(t.local_epochs * len(pooled) / t.batch_size)) if t.local_epochs > 0
                 else t.local_steps * per_round)
        trainers = {POOLED: AdapterTrainer(POOLED, backbone, pooled, pooled.take([]), steps_per_round=steps,
                                           **common)}
    else:
        trainers = clients
    shared = {k: v for k, v in initial.items() if k not in kept}
    strategy = make_strategy(t.algorithm, shared, list(trainers), prox_mu=t.prox_mu, **to_dict(cfg)["fellrec"])
    runtime = EmbeddedRuntime(strategy, trainers, clients, rounds=t.rounds,
                              client_fraction=1.0 if t.algorithm == "centralized" else t.client_fraction,
                              eval_every=e.every, seed=cfg.seed, run_dir=out, progress=progress,
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
    extra = {
        "communication": {
            "bytes_up": int(sum(runtime.bytes_up.values())),
            "bytes_down": int(sum(runtime.bytes_down.values())),
            "per_client": {c: {"bytes_up": runtime.bytes_up[c], "bytes_down": runtime.bytes_down[c]}
                           for c in trainers},
        },
        "train_time_s": round(runtime.elapsed, 1),
        "earlier_s": runtime.restored_elapsed,
        "rounds": t.rounds,
        "steps_per_round": {c: tr.steps_per_round for c, tr in trainers.items()},
        "select_by": select_by,
        "best_round": {c: tr.best_round for c, tr in clients.items()},
        "samples": {"train": sum(len(tr.train) for tr in trainers.values()),
                    "valid": sum(len(v) for _, v in data.values()), "test": len(test)},
    }
    return per_user, extra


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

    m = cfg.model
    scfg = SASRecConfig(dim=m.sasrec_dim, blocks=m.sasrec_blocks, dropout=m.sasrec_dropout,
                        max_len=cfg.split.history_len, epochs=m.sasrec_epochs, seed=cfg.seed)
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
