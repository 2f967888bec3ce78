"""``fellrec run``: one experiment, top to bottom, into ``runs/<name>/``.

data -> recommender -> training -> validation (best adapter kept) -> test per client -> files:

- ``config.yaml``: the full resolved config;
- ``metrics.jsonl``: one JSON line per logged event (training losses, validation results);
- ``results.json``: ``overall``, ``clients``, ``imbalance`` (see ``fellrec.metrics.summarize``),
  plus ``time_s``, sizes and the training summary;
- ``adapters/global.safetensors``: the trained adapter (LLM backbones), named tensors only.

``algorithm: centralized`` trains one model on the union of every client's training samples: the
upper bound the federated algorithms are compared with. A finished run (its ``results.json``
exists) is never overwritten.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fellrec.adapters import add_lora, get_adapter, set_adapter
from fellrec.backbones.bigrec import BIGRec
from fellrec.backbones.prompts import Prompt
from fellrec.backbones.ranker import TextRanker
from fellrec.config import Config, dump
from fellrec.errors import ConfigError
from fellrec.evaluate import evaluate
from fellrec.llm import load_base, model_id
from fellrec.metrics import summarize
from fellrec.pipeline import Prepared, prepare
from fellrec.split import Samples
from fellrec.train import BatchSampler, make_optimizer, mean_loss, train_steps


def run(cfg: Config, runs_dir: str | Path = "runs", progress: bool = True) -> Path:
    out = Path(runs_dir) / cfg.name
    if (out / "results.json").exists():
        raise ConfigError(f"name: {out} already holds a finished run; choose another name (--set name=...)")
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", dump(cfg))
    log = open(out / "metrics.jsonl", "w", encoding="utf-8")  # noqa: SIM115 (closed below)
    started = time.time()
    torch.manual_seed(cfg.seed)  # LoRA dropout and anything else drawn from torch's global generator
    try:
        p = prepare(cfg, progress=progress)
        train, valid, test = pick_samples(p)
        if cfg.model.backbone == "most-popular":
            from fellrec.baselines.popular import MostPopular

            rank, summary = MostPopular(p.dataset.num_items).fit(p.split.train).rank, {"steps": 0}
        elif cfg.model.backbone == "sasrec":
            rank, summary = train_sasrec(cfg, p, train, valid, log, progress)
        else:
            backbone, summary = train_llm(cfg, p, train, valid, log, progress)
            save_tensors(out / "adapters" / "global.safetensors", get_adapter(backbone.model))
            rank = backbone.rank
        bar = tqdm(total=len(test), desc="test", unit="user", disable=not progress, leave=False)
        per_user = evaluate(rank, test, batch_size=cfg.eval.batch_size, ks=cfg.eval.ks, progress=bar)
        bar.close()
    finally:
        log.close()
    results = {
        "name": cfg.name,
        "algorithm": cfg.train.algorithm,
        "backbone": cfg.model.backbone,
        "dataset": p.dataset.name,
        **summarize(per_user, p.client_of(test.user)),
        "time_s": round(time.time() - started, 1),
        "samples": {"train": len(train), "valid": len(valid), "test": len(test)},
        "train": summary,
    }
    write_text(out / "results.json", json.dumps(results, indent=2, default=_plain))
    return out


def pick_samples(p: Prepared) -> tuple[Samples, Samples, Samples]:
    """The clients' samples (users outside every client take no part), capped as configured."""
    cfg = p.config
    s = p.samples
    train = s.train.select(p.client_of(s.train.user) >= 0).subsample(cfg.train.max_train_samples, cfg.seed)
    valid = s.valid.select(p.client_of(s.valid.user) >= 0).subsample(cfg.eval.max_valid_samples, cfg.seed + 1)
    test = s.test.select(p.client_of(s.test.user) >= 0).subsample(cfg.eval.max_test_samples, cfg.seed + 2)
    if len(train) == 0:
        raise ConfigError("data: no training samples left after filtering and splitting")
    return train, valid, test


def build_backbone(cfg: Config, p: Prepared) -> BIGRec | TextRanker:
    """Base LM + fresh LoRA adapter + the configured backbone around them."""
    m = cfg.model
    titles = p.dataset.items["title"].astype(str).tolist()
    prompt = Prompt.for_dataset(p.dataset.name, m.prompt_item, m.prompt_items, m.prompt_verb)
    tok, base = load_base(m.name_or_path, texts=[*titles, prompt.instruction(titles[:10])], seed=cfg.seed)
    model = add_lora(base, m.lora, seed=cfg.seed)
    key = model_id(m.name_or_path, cfg.seed)
    if m.backbone == "bigrec":
        return BIGRec(model, tok, titles, prompt, max_len=m.max_len, train_on_inputs=m.train_on_inputs,
                      num_beams=m.num_beams, max_new_tokens=m.max_new_tokens, cache_key=key)
    return TextRanker(model, tok, titles, prompt, max_len=m.max_len, pooling=m.pooling, item_side=m.item_side,
                      negatives=m.negatives, temperature=m.temperature, seed=cfg.seed, cache_key=key)


def train_llm(cfg: Config, p: Prepared, train: Samples, valid: Samples, log, progress: bool):
    """Train the adapter for ``train.steps`` steps, validating every ``eval.every`` steps."""
    backbone = build_backbone(cfg, p)
    model, t, e = backbone.model, cfg.train, cfg.eval
    select_by = e.select_by if e.select_by != "auto" else ("loss" if cfg.model.backbone == "bigrec" else "recall@10")
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer, scheduler = make_optimizer(params, t, t.steps)
    sampler = BatchSampler(len(train), t.batch_size, cfg.seed)
    chunk = e.every if e.every > 0 else max(1, t.steps)
    bar = tqdm(total=t.steps, desc="train", unit="step", disable=not progress, leave=False)
    done, best, best_step, best_state, history = 0, None, 0, None, []

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        log.write(json.dumps({"event": "train", "step": done + step + 1, "loss": loss}) + "\n")
        log.flush()

    while True:
        n = min(chunk, t.steps - done)
        if n > 0:
            train_steps(model, backbone.loss, train, steps=n, sampler=sampler, optimizer=optimizer,
                        scheduler=scheduler, grad_clip=t.grad_clip, on_step=on_step)
            done += n
        if hasattr(backbone, "refresh"):
            backbone.refresh()
        score = validate(backbone, valid, select_by, e)
        history.append({"step": done, select_by: score})
        log.write(json.dumps({"event": "valid", "step": done, select_by: score}) + "\n")
        log.flush()
        better = best is None or (score < best if select_by == "loss" else score > best)
        if better:
            best, best_step, best_state = score, done, get_adapter(model)
        if done >= t.steps:
            break
    bar.close()
    set_adapter(model, best_state)
    if hasattr(backbone, "refresh"):
        backbone.refresh()
    return backbone, {"steps": done, "select_by": select_by, "best_step": best_step, "best_valid": best,
                      "valid": history}


def validate(backbone, valid: Samples, select_by: str, e) -> float:
    if len(valid) == 0:
        return float("nan")
    if select_by == "loss":
        return mean_loss(backbone.model, backbone.loss, valid, e.batch_size)
    scores = evaluate(backbone.rank, valid, batch_size=e.batch_size, ks=e.ks)
    if select_by not in scores:
        raise ConfigError(f"eval.select_by: {select_by!r} is neither 'loss' nor one of {', '.join(scores)}")
    return float(np.nanmean(scores[select_by]))


def train_sasrec(cfg: Config, p: Prepared, train: Samples, valid: Samples, log, progress: bool):
    from fellrec.baselines.sasrec import SASRecConfig, fit_sasrec

    m = cfg.model
    scfg = SASRecConfig(dim=m.sasrec_dim, blocks=m.sasrec_blocks, dropout=m.sasrec_dropout,
                        max_len=cfg.split.history_len, epochs=m.sasrec_epochs, seed=cfg.seed)
    model, history = fit_sasrec(p.dataset.num_items, train, valid, scfg, progress=progress)
    for epoch, (loss, value) in enumerate(zip(history.losses, history.valid, strict=False), start=1):
        log.write(json.dumps({"event": "valid", "epoch": epoch, "loss": loss, scfg.metric: value}) + "\n")
    return model.rank, {"epochs": len(history.losses), "best_epoch": history.best_epoch,
                        "select_by": scfg.metric, "valid": history.valid}


def write_text(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so a half-written file never replaces a good one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors file written atomically (temporary name, then rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _plain(value):
    if isinstance(value, np.generic | torch.Tensor):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
