"""The parts of a run, built from its config: each client's samples, the test users, the backbone
(base LM + LoRA + recommender), the trainers' options and the warnings a protocol deserves.

``fellrec.run`` (the recipe) and the Flower runtime both build their runs from here.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from fellrec.adapters import add_lora
from fellrec.backbones.bigrec import BIGRec
from fellrec.backbones.item_tokens import ItemTokenRec
from fellrec.backbones.prompts import Prompt
from fellrec.backbones.ranker import TextRanker
from fellrec.config import Config
from fellrec.errors import ConfigError
from fellrec.holdout import Samples
from fellrec.llm import load_base, model_id
from fellrec.metrics import metric_keys
from fellrec.pipeline import Prepared
from fellrec.trainer import derive_seed, read_full


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


def catalogue(p: Prepared) -> tuple[list[str], str]:
    """(item titles, dataset name): all of the data the backbone is built from."""
    return p.dataset.items["title"].astype(str).tolist(), p.dataset.name


def build_backbone(cfg: Config, titles: list[str], dataset: str) -> BIGRec | TextRanker | ItemTokenRec:
    """Base LM + fresh LoRA adapter + the configured backbone around them, for the catalogue ``titles``
    of ``dataset`` (its name picks the prompt's wording)."""
    model_cfg = cfg.model
    prompt = Prompt.for_dataset(dataset, model_cfg.prompt_item, model_cfg.prompt_items, model_cfg.prompt_verb)
    tok, base = load_base(model_cfg.name_or_path, texts=[*titles, prompt.instruction(titles[:10])], seed=cfg.seed)
    if model_cfg.blocks is not None:
        truncate(base, model_cfg.blocks)
    model = add_lora(base, model_cfg.lora, seed=cfg.seed).to(pick_device(model_cfg.device))
    if cfg.storage.k is not None:
        from fellrec.storage.model import SplitLM

        try:
            model = SplitLM(model, cfg.storage.k, cfg.storage.tail)
        except ValueError as err:
            raise ConfigError(f"storage.k: {err}") from None
        model.server.grad_clip = cfg.train.grad_clip
    key = model_id(model_cfg.name_or_path, cfg.seed)
    if model_cfg.backbone == "item-tokens":
        try:
            return ItemTokenRec(model, tok, titles, prompt, item_dim=model_cfg.item_dim,
                                loss_positions=model_cfg.loss_positions, cache_mb=model_cfg.cache_mb, seed=cfg.seed,
                                cache_key=key)
        except ValueError as err:
            raise ConfigError(f"storage.k: {err}") from None
    if model_cfg.backbone == "bigrec":
        return BIGRec(model, tok, titles, prompt, max_len=model_cfg.max_len, train_on_inputs=model_cfg.train_on_inputs,
                      num_beams=model_cfg.num_beams, max_new_tokens=model_cfg.max_new_tokens, cache_key=key)
    return TextRanker(model, tok, titles, prompt, max_len=model_cfg.max_len, pooling=model_cfg.pooling,
                      item_side=model_cfg.item_side, negatives=model_cfg.negatives, temperature=model_cfg.temperature,
                      seed=cfg.seed, cache_key=key)


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
    evaluation = cfg.eval
    select_by = evaluation.select_by
    if select_by == "auto":
        select_by = "loss" if cfg.model.backbone == "bigrec" else "recall@10"
    known = ["loss", *metric_keys(evaluation.ks)]
    if select_by not in known:
        raise ConfigError(f"eval.select_by: {select_by!r} is not one of auto, {', '.join(known)}")
    return select_by


def trainer_options(cfg: Config, initial, kept: set[str] = frozenset()) -> dict:
    """The keyword arguments every client's AdapterTrainer gets (besides its id, backbone and data)."""
    evaluation, model_cfg = cfg.eval, cfg.model
    own_lr = model_cfg.backbone == "item-tokens" and model_cfg.item_lr is not None
    groups = {"items.": model_cfg.item_lr} if own_lr else {}
    return {"settings": cfg.train, "initial": initial, "seed": cfg.seed, "select_by": selection_metric(cfg),
            "ks": tuple(evaluation.ks), "eval_batch_size": evaluation.batch_size, "kept": kept, "group_lrs": groups}
