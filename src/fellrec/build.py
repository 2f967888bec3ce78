"""The parts of a run, built from its config: each client's samples, the test users, the backbone
(base LM + LoRA + recommender), the trainers' options and the warnings a protocol deserves.

``fellrec.run`` (the recipe) and the Flower runtime both build their runs from here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from fellrec.adapters import add_lora, add_residuals
from fellrec.backbones.bigrec import BIGRec
from fellrec.backbones.item_tokens import ItemTokenRec
from fellrec.backbones.prompts import Prompt
from fellrec.backbones.ranker import TextRanker
from fellrec.config import RESIDUAL_ALGORITHMS, Config, dump, to_dict
from fellrec.errors import ConfigError
from fellrec.evaluate import test_summary
from fellrec.files import save_tensors
from fellrec.holdout import Samples
from fellrec.llm import load_base, model_id
from fellrec.metrics import metric_keys
from fellrec.pipeline import Prepared, prepare
from fellrec.results import record, rounds
from fellrec.strategies import make_strategy
from fellrec.trainer import AdapterTrainer, ClientParts, derive_seed, read_full


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
    of ``dataset`` (its name picks the prompt's wording); with residuals on the LoRA layers for the
    algorithms that fold one into the frozen weights (FLoRA, FedEx-LoRA)."""
    backbone = _backbone(cfg, titles, dataset)
    if cfg.train.algorithm in RESIDUAL_ALGORITHMS:
        add_residuals(backbone.model)
    return backbone


def strategy_options(cfg: Config) -> dict:
    """What ``make_strategy`` takes from the config (each strategy picks its own)."""
    lora = cfg.model.lora
    return {"prox_mu": cfg.train.prox_mu, "lora_scale": lora.alpha / lora.r, "seed": cfg.seed,
            **to_dict(cfg)["fellrec"]}


def _backbone(cfg: Config, titles: list[str], dataset: str) -> BIGRec | TextRanker | ItemTokenRec:
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


# ---- one client, as a runtime outside this process builds it ------------------------------------


def client_data(cfg: Config, client: str) -> dict:
    """What client ``client`` keeps of the data (its train, validation and test samples, the catalogue,
    its name): taken from the dataset once, so that later messages skip reading and partitioning it."""
    p = prepare(cfg, progress=False)
    samples = client_samples(p)
    if client not in samples:
        raise ValueError(f"node config client-id={client}: this run has clients 0..{len(samples) - 1}")
    test = pick_test(p)
    titles, dataset = catalogue(p)
    return {"train": samples[client][0], "valid": samples[client][1],
            "test": test.take(np.flatnonzero(p.client_of(test.user) == int(client))),
            "titles": titles, "dataset": dataset, "name": str(p.partition.names[int(client)]),
            "num_clients": int(p.num_clients)}


def client_parts(cfg: Config, client: str, data: dict, setup: tuple, cache) -> ClientParts:
    """Client ``client`` of an LLM run: its ``AdapterTrainer`` over the run's backbone, which the clients
    of one process share (``cache.get(kind, key, build)`` keeps it); ``setup`` (what the server sent at
    setup) is empty for these backbones."""
    backbone, initial = cache.get("backbone", dump(cfg), lambda: client_backbone(cfg, data))
    trainer = AdapterTrainer(client, backbone, data["train"], data["valid"],
                             **trainer_options(cfg, initial, private_names(cfg, backbone)))
    info = {"name": data["name"], "num-clients": data["num_clients"], "dataset": data["dataset"]}
    if cfg.storage.k is not None:  # the server builds the base model too: the tiny test model's tokenizer needs them
        info["titles"] = list(data["titles"])
    counts = {"train": len(trainer.train), "valid": len(trainer.valid), "test": len(data["test"]),
              "steps-per-round": int(trainer.steps_per_round)}
    shared = {k: v for k, v in initial.items() if k not in trainer.kept}  # as the server starts
    return ClientParts(trainer, shared, info, counts, data["test"], backbone)


def client_backbone(cfg: Config, data: dict) -> tuple:
    """The run's backbone and its initial adapter, for a client; in split mode only the client's part
    of the model (the trunk is the server's)."""
    backbone = build_backbone(cfg, data["titles"], data["dataset"])
    if cfg.storage.k is not None:
        keep_client_half(backbone)
    return backbone, read_full(backbone.model)


def keep_client_half(backbone) -> None:
    """Replace the backbone's whole split model by the client's half (talking to the trunk through
    message replays, ``fellrec.storage.replay``), so that no trunk weight is left in this process."""
    import gc

    from fellrec.storage.replay import ReplayTransport

    backbone.model = backbone.model.client_half(ReplayTransport())
    gc.collect()


# ---- the server's part of an LLM run outside this process ------------------------------------------


class RankingServer:
    """What the server of an LLM run does besides the rounds: the strategy over the clients, and the
    results from each client's test (every test user's metrics) and selected adapter."""

    setup_needed = False

    def __init__(self, cfg: Config, out, send_adapters: bool = True):
        self.cfg, self.out, self.send_adapters = cfg, out, send_adapters

    def setup(self) -> tuple[dict, dict]:
        return {}, {}  # the clients build everything from the config

    def names(self, info: dict[str, dict]) -> dict[str, str]:
        """fellrec client name -> client-id of its node (the same here), in the clients' order."""
        return {c: c for c in sorted(info, key=int)}

    def strategy(self, initial, info: dict[str, dict]):
        """The strategy over the clients of ``info`` (keyed by client name, in order)."""
        return make_strategy(self.cfg.train.algorithm, initial, list(info), **strategy_options(self.cfg))

    def rounds(self) -> int:
        return self.cfg.train.rounds

    def eval_every(self) -> int:
        return self.cfg.eval.every

    def results(self, tested: dict[str, dict], rounds_, strategy, info: dict[str, dict], **parts):
        """(results, test_users): the test of every client's users, its selected adapter kept in
        ``adapters/``."""
        cfg, clients = self.cfg, list(info)
        per_user: dict[str, list[np.ndarray]] = {}
        client_of, users, best_round = [], [], {}
        for c in clients:
            scores = dict(tested[c]["scores"])
            mine = np.asarray(scores.pop("user", np.zeros(0)), dtype=np.int64)
            for k, v in scores.items():
                per_user.setdefault(k, []).append(np.asarray(v, dtype=np.float64))
            client_of.append(np.full(len(mine), int(c)))
            users.append(mine)
            best_round[c] = int(tested[c]["best_round"])
            if tested[c].get("adapter"):
                save_tensors(Path(self.out) / "adapters" / f"client-{c}.safetensors", tested[c]["adapter"])
        if strategy.global_tensors() is not None:
            save_tensors(Path(self.out) / "adapters" / "global.safetensors", strategy.global_tensors())
        per_user_ = {k: np.concatenate(v) for k, v in per_user.items()}
        client_of_, users_ = np.concatenate(client_of), np.concatenate(users)
        results = record(
            cfg, dataset=info[clients[0]]["dataset"], summary=test_summary(per_user_, client_of_),
            client_names={c: info[c]["name"] for c in clients},
            warnings=protocol_warnings([info[c]["name"] for c in clients], [info[c]["valid"] for c in clients],
                                       [info[c]["test"] for c in clients], cfg.split.method),
            **rounds(rounds_, cfg, select_by=selection_metric(cfg),
                     steps_per_round={c: info[c]["steps-per-round"] for c in clients}, best_round=best_round,
                     samples={k: sum(info[c][k] for c in clients) for k in ("train", "valid", "test")}),
            **parts)
        return results, (per_user_, client_of_, users_)
