"""Experiment configuration: dataclasses with a default and a one-line doc for every key.

A YAML file gives any subset of the keys; ``--set a.b=c`` overrides one key from the command line
(the value is read as YAML, so ``--set partition.num_clients=8`` is an int and
``--set data.min_rating=null`` is None). Everything is checked before any work starts and all
problems are reported at once, each naming the key, its value, and where it was given: the file and
line, or the ``--set`` that overrode it.

The key reference (``fellrec config keys``) is generated from the ``doc`` of each field below, so a
key is documented once, where it is declared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fellrec.errors import ConfigError


def opt(default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field: its default, its one-line doc and, for a string, its allowed values."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value)
    return type(value)(value)


@dataclass
class DomainConfig:
    name: str = opt("", "the domain's name; it names its client under partition.method=domain")
    format: str = opt("ml-100k-recbole", "loader of this domain's files (see data.format)")
    path: str | None = opt(None, "file or directory of this domain's data (see data.path)")
    meta: str | None = opt(None, "item-metadata file, where it cannot be found beside path")


@dataclass
class DataConfig:
    format: str = opt("ml-100k-recbole", "dataset loader: ml-100k-recbole (packaged, offline), ml-100k, "
                      "ml-1m, ml-csv, amazon2018, amazon2023, goodreads, microlens, kuairand")
    path: str | None = opt(None, "file or directory of the downloaded data (not needed for ml-100k-recbole)")
    meta: str | None = opt(None, "item-metadata file, where it cannot be found beside path")
    domains: list[DomainConfig] = opt([], "several datasets loaded together, one domain each "
                                      "(cross-domain federation); replaces format/path/meta")
    domain_by: str | None = opt(None, "cut the dataset into domains by this item attribute (e.g. genres): each "
                                "item in the domain of its first value, each user's interactions split by "
                                "domain (a user in two domains is two users); with partition.method=domain, "
                                "one client per domain")
    domain_values: list[str] = opt([], "the domains data.domain_by keeps (e.g. [Action, Comedy, Drama]); "
                                   "empty keeps all")
    min_rating: float | None = opt(None, "keep only interactions rated at least this (e.g. 4 for "
                                   "positive feedback, 1 for KuaiRand clicks); null keeps all")
    kcore: int = opt(5, "iterative k-core: drop users and items with fewer than k interactions until "
                     "none is left; 0 turns it off")
    skip_bad_lines: bool = opt(False, "skip malformed input lines and report how many, instead of "
                               "stopping at the first")


@dataclass
class SplitConfig:
    method: str = opt("temporal", "temporal: one global cut by time (FELLRec); per-user: each user's "
                      "own chronological cut (FedPA); leave-one-out: last item test, second last valid",
                      choices=("temporal", "per-user", "leave-one-out"))
    ratios: list[float] = opt([0.8, 0.1, 0.1], "train/valid/test shares for temporal and per-user splits")
    history_len: int = opt(10, "items of history in a sample: the last N before the target")
    train_stride: int = opt(1, "a training sample every this many positions of a user's training sequence, "
                            "counted back from the last (1: every position, as FELLRec). With a backbone that "
                            "learns from every position of a sample (item-tokens, loss_positions=all), "
                            "history_len sees each transition once per epoch")


@dataclass
class PartitionConfig:
    method: str = opt("kmeans", "kmeans: k-means on BPR-MF user embeddings (FELLRec); attribute: one "
                      "client per value of a user attribute; user: one user per client; dirichlet: "
                      "label skew over item categories; domain: one client per dataset",
                      choices=("kmeans", "attribute", "user", "dirichlet", "domain"))
    num_clients: int = opt(5, "number of clients M (kmeans, dirichlet)")
    attribute: str | None = opt(None, "user attribute for method=attribute (e.g. occupation, gender, age)")
    bins: list[float] | None = opt(None, "edges that band a numeric attribute (e.g. [18, 25, 35, 45, 56] "
                                   "for age); null uses its raw values")
    alpha: float = opt(0.5, "Dirichlet concentration for method=dirichlet: small = more skew")
    category: str | None = opt(None, "item attribute whose first value is an item's category for "
                               "method=dirichlet; null picks genres or categories")
    min_users: int = opt(1, "dirichlet: every client gets at least this many users")
    mf_dim: int = opt(64, "BPR-MF embedding size (kmeans)")
    mf_epochs: int = opt(25, "BPR-MF training epochs (kmeans)")
    mf_lr: float = opt(0.01, "BPR-MF Adam learning rate (kmeans)")
    mf_reg: float = opt(0.01, "BPR-MF L2 regularisation (kmeans)")
    mf_batch_size: int = opt(2048, "BPR-MF mini-batch size (kmeans)")
    seed: int | None = opt(None, "seed of the partition alone (k-means, Dirichlet); null uses the run's "
                           "seed. Set it to keep the same clients across a sweep of run seeds")


@dataclass
class LoraConfig:
    r: int = opt(8, "LoRA rank")
    alpha: float = opt(16.0, "LoRA scaling α (the update is scaled by α/r)")
    dropout: float = opt(0.05, "dropout on the LoRA branch's input")
    targets: list[str] = opt(["q_proj", "v_proj"], "names of the linear layers that get an adapter")
    last_blocks: int | None = opt(None, "adapt only the last N blocks (null: every block). With the "
                                  "item-token backbone the frozen blocks below them run once per sample and "
                                  "are kept in memory, so later epochs pay only for the adapted ones")


@dataclass
class ModelConfig:
    backbone: str = opt("ranker", "item-tokens: one LM input vector per history item, scores over the "
                        "catalogue from the last state (the fast LLM backbone); ranker: text-encoder ranker; "
                        "bigrec: generate a title, ground it by L2; sasrec: ID-based SASRec; most-popular: "
                        "popularity; ctr: FedPA's attribute-based CTR foundation model (set fedpa.*)",
                        choices=("item-tokens", "ranker", "bigrec", "sasrec", "most-popular", "ctr"))
    name_or_path: str = opt("smollm2-135m-instruct", "base LM: smollm2-135m-instruct (packaged), tiny-random "
                            "(tests), or a local Hugging Face checkpoint directory")
    device: str = opt("auto", "where the LLM runs: auto (cuda when torch sees a GPU, else cpu), cpu, cuda, "
                      "cuda:N")
    lora: LoraConfig = opt(LoraConfig(), "the adapter the LLM backbones train")
    blocks: int | None = opt(None, "use only the first N blocks of the LM (null: all); fewer blocks, less work")
    max_len: int = opt(512, "token cut-off of a prompt (the oldest history is cut first)")
    prompt_item: str | None = opt(None, "prompt word for one item (null: from the dataset, e.g. movie)")
    prompt_items: str | None = opt(None, "prompt word for items (null: from the dataset, e.g. movies)")
    prompt_verb: str | None = opt(None, "prompt verb (null: from the dataset, e.g. watched)")
    train_on_inputs: bool = opt(False, "bigrec: loss on the whole prompt, not only the response (the "
                                "released FELLRec script does this)")
    num_beams: int = opt(4, "bigrec: beams in the title generation")
    max_new_tokens: int = opt(32, "bigrec: longest generated title, in tokens")
    pooling: str = opt("last", "ranker: text vector = last token's state or mean over tokens",
                       choices=("last", "mean"))
    item_side: str = opt("frozen", "ranker: items encoded by the frozen base LM once (frozen) or by the "
                         "adapted LM, re-encoded after training (adapted)", choices=("frozen", "adapted"))
    negatives: int = opt(0, "ranker: 0 = softmax over the whole catalogue; N = in-batch targets plus N "
                         "sampled items")
    temperature: float = opt(0.05, "ranker: softmax temperature τ of the cosine scores")
    item_dim: int = opt(64, "item-tokens: size of the trainable per-item vectors, in and out (0: none, the "
                        "items are their titles alone)")
    item_vectors: str = opt("shared", "item-tokens: the per-item vectors and biases travel and are aggregated "
                            "(shared), or stay on each client (private): their updates tell the server which "
                            "items a client trained on", choices=("shared", "private"))
    item_lr: float | None = opt(None, "item-tokens: learning rate of the item part (null: train.lr)")
    loss_positions: str = opt("all", "item-tokens: softmax loss at every item position (each predicts the "
                              "next item) or at the last only", choices=("all", "last"))
    cache_mb: float = opt(1024.0, "item-tokens: memory for the frozen lower blocks' states, per process")
    sasrec_dim: int = opt(64, "sasrec: embedding size")
    sasrec_blocks: int = opt(2, "sasrec: self-attention blocks")
    sasrec_dropout: float = opt(0.2, "sasrec: dropout")
    sasrec_epochs: int = opt(30, "sasrec: training epochs (best validation epoch kept)")


ALGORITHMS = ("centralized", "local", "fedavg", "fedprox", "fellrec", "ffa-lora", "fedsa-lora", "flora",
              "fedex-lora")
RESIDUAL_ALGORITHMS = ("flora", "fedex-lora")  # they fold a residual into the frozen weights
FEDPA_ALGORITHMS = ("fedpa", "fedavg-adapter", "fedavg-full", "local", "local-fedpa", "frozen")
CTR_SELECT_BY = ("auc", "gauc", "logloss")
# FedPA (model.backbone: ctr) trains a small CTR model: where a run of it does not set these keys,
# they default to the released Fed_Train's settings instead of the LLM backbones' defaults
CTR_DEFAULTS = {"train.algorithm": "fedpa", "train.lr": 0.1, "train.local_epochs": 1.0, "train.batch_size": 1024,
                "train.schedule": "constant", "train.grad_clip": 0.0, "eval.select_by": "auc"}
# keys that moved: a config that still has one is told where it went
MOVED = {"fedpa.algorithm": "train.algorithm", "fedpa.lr": "train.lr", "fedpa.local_epochs": "train.local_epochs",
         "fedpa.batch_size": "train.batch_size", "fedpa.select_by": "eval.select_by"}


@dataclass
class TrainConfig:
    algorithm: str = opt("fedavg", "centralized: one adapter on the union of all clients' samples (the "
                         "upper bound); local: each client alone; fedavg: sample-weighted mean of the "
                         "clients' adapters; fedprox: fedavg plus a proximal term; fellrec: FELLRec's "
                         "dynamic balance (a personal adapter per client); ffa-lora: LoRA's A frozen at "
                         "its shared initialisation, the rest averaged (FFA-LoRA); fedsa-lora: A averaged, B "
                         "kept by each client (FedSA-LoRA); flora: fresh LoRA each round, the clients' "
                         "products stacked and folded into the frozen weights (FLoRA); fedex-lora: A and B "
                         "averaged, the averaging error folded into the frozen weights (FedEx-LoRA). "
                         "model.backbone=ctr (default "
                         "fedpa): fedpa: user + group adapters mixed by a gate; fedavg-adapter: one shared "
                         "adapter; fedavg-full: FedAvg of the whole model; local: whole model per user; "
                         "local-fedpa: FedPA's model without a server; frozen: the foundation model as is",
                         choices=tuple(dict.fromkeys([*ALGORITHMS, *FEDPA_ALGORITHMS])))
    rounds: int = opt(4, "communication rounds (0 evaluates the untrained adapter)")
    local_steps: int = opt(25, "optimizer steps of each client per round (centralized: this times the "
                           "clients per round, the same budget)")
    local_epochs: float = opt(0.0, "passes over the client's training samples per round; > 0 replaces "
                              "local_steps (FELLRec: 5)")
    client_fraction: float = opt(1.0, "share of the clients drawn (seeded) to train in each round")
    prox_mu: float = opt(0.01, "fedprox: weight μ of the proximal term (μ/2)·||w − w_global||²")
    batch_size: int = opt(8, "samples per step")
    optimizer: str = opt("adamw", "local optimizer, new in every round (as FELLRec's code): AdamW, or SGD "
                         "with momentum 0.9", choices=("adamw", "sgd"))
    lr: float = opt(5e-4, "learning rate")
    weight_decay: float = opt(0.0, "weight decay (decoupled for AdamW)")
    warmup_steps: int = opt(0, "linear warm-up steps, in the first round only (as FELLRec)")
    schedule: str = opt("linear", "learning rate after warm-up within a round: linear decay to 0 (restarted "
                        "every round, as FELLRec), or constant", choices=("linear", "constant"))
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0 = off)")
    max_train_samples: int | None = opt(None, "train each client on a seeded random subset of this many of "
                                        "its samples (BIGRec in FELLRec: 1024); null uses all")


@dataclass
class FellrecConfig:
    alpha: float = opt(0.7, "heating scale α in w_i = tanh(α / p_i^(t + 1/β))")
    beta: float = opt(5.0, "heating rate β: the exponent t + 1/β grows with the round t (0-based)")
    tau: float = opt(0.05, "temperature τ of p = softmax(loss / τ) over the clients' mean training losses")
    heating: bool = opt(True, "curriculum heating on; off sets every w_i = 1 (the released BIGRec script, "
                        "whose β = 1 skips it)")
    similarity: str = opt("cosine", "weights between clients: (cos(θ_i, θ_j) + 1) / 2, or uniform (all 1)",
                          choices=("cosine", "uniform"))
    order: str = opt("snapshot", "aggregate every client from the same snapshot, or sequentially in place "
                     "as the released code (client i sees 0..i-1 already aggregated)",
                     choices=("snapshot", "sequential"))
    similarity_of: str = opt("adapter", "what the cosine compares: the whole adapter (the paper), what each client "
                             "learned this round (update: its adapter minus the one it was sent) or the LoRA B "
                             "matrices alone (lora_b)", choices=("adapter", "update", "lora_b"))
    losses: str = opt("raw", "what the heating's softmax takes: the mean training losses (the paper) or relative "
                      "ones, loss / mean loss - 1, so that tau weighs relative differences",
                      choices=("raw", "relative"))


@dataclass
class StorageConfig:
    k: int | None = opt(None, "flexible storage: the client keeps the embeddings and blocks [0, k) and the "
                        "last `tail` blocks, the server runs the rest, per client; null runs the whole model "
                        "on the client")
    tail: int = opt(1, "blocks at the end kept on the client (FELLRec: 1), with the final norm and LM head")


@dataclass
class FedpaConfig:
    public_attribute: str | None = opt(None, "pick the public (pre-training) users by this user attribute, as "
                                       "the released code; null picks a seeded random share")
    public_values: list[str] = opt([], "values of public_attribute whose users are mostly public")
    public_fraction: float = opt(0.2, "share of users that are public when public_attribute is null")
    public_fraction_in: float = opt(0.8, "share of the users with a public value that are public")
    public_fraction_out: float = opt(0.2, "share of the other users that are public")
    ratios: list[float] = opt([0.6, 0.2, 0.2], "each private user's chronological train/valid/test shares")
    min_interactions: int = opt(5, "private users with fewer interactions are left out (listed in results)")
    group_attributes: list[str] = opt(["gender", "age"], "user attributes with one group adapter per value")
    rank: int = opt(4, "rank of the user and group adapters")
    alpha: float = opt(1.0, "adapter scaling")
    zero_init: bool = opt(False, "A and B both start at zero, as the released code (they then never learn)")
    ldp_scale: float = opt(0.0, "local differential privacy: Laplace noise of this scale on every upload (0: off)")
    weighting: str = opt("samples", "averages weighted by the clients' samples, or uniform (released code)",
                         choices=("samples", "uniform"))
    dim: int = opt(8, "attribute embedding size of the foundation model")
    hidden: list[int] = opt([32, 8], "hidden layer sizes of the foundation model's MLP")
    pretrain_epochs: int = opt(20, "Open_Train epochs on the public users")
    pretrain_lr: float = opt(1e-3, "Open_Train Adam learning rate")
    pretrain_path: str | None = opt(None, "load this Open_Train checkpoint instead of pre-training")


@dataclass
class EvalConfig:
    batch_size: int = opt(16, "samples per ranking batch")
    every: int = opt(1, "validate every this many rounds and after the last; each client keeps its best "
                     "round's adapter for the test (0: validate only after the last round)")
    select_by: str = opt("auto", "validation criterion: loss, a metric such as recall@10, or auto (loss "
                         "for bigrec, as FELLRec; recall@10 otherwise); ctr (FedPA): the pooled validation "
                         "auc (default), gauc or logloss")
    max_valid_samples: int | None = opt(200, "validate each client on a seeded random subset of this many "
                                        "of its samples (null: all)")
    max_test_samples: int | None = opt(None, "test on a seeded random subset (null: every test user)")
    ks: list[int] = opt([5, 10, 20], "cut-offs K of the ranking metrics")


@dataclass
class Config:
    name: str = opt("default", "run name; outputs go to runs/<name>/")
    seed: int = opt(2024, "one seed for splitting, partitioning, initialisation and sampling")
    algorithms: list[str] = opt([], "run each of these algorithms in turn with everything else equal, into "
                                "runs/<name>-<algorithm>/, then compare them (empty: train.algorithm only)")
    data: DataConfig = opt(DataConfig(), "what data to load and how to filter it")
    split: SplitConfig = opt(SplitConfig(), "how interactions become train/valid/test samples")
    partition: PartitionConfig = opt(PartitionConfig(), "how users are grouped into clients")
    model: ModelConfig = opt(ModelConfig(), "the recommender: base LM, adapter and backbone")
    train: TrainConfig = opt(TrainConfig(), "how the recommender is trained")
    fellrec: FellrecConfig = opt(FellrecConfig(), "FELLRec's dynamic balance (train.algorithm=fellrec)")
    fedpa: FedpaConfig = opt(FedpaConfig(), "FedPA on the attribute CTR model (model.backbone=ctr)")
    storage: StorageConfig = opt(StorageConfig(), "FELLRec's flexible storage: the LLM split between client "
                                 "and server")
    eval: EvalConfig = opt(EvalConfig(), "validation and test")

    def validate(self) -> list[tuple[tuple[str, ...], str]]:
        """Checks across keys that types alone cannot express, as ``(keys, problem)`` pairs.

        ``problem`` names one key and the value it has; ``keys`` are the keys whose origin (the
        ``--set`` or the file line that gave them) locates it, the first that has one.
        """
        problems: list[tuple[tuple[str, ...], str]] = []

        def bad(key: str, problem: str, *at: str) -> None:
            problems.append((at or (key,), f"{key}: {problem}"))

        ratios = self.split.ratios
        if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
            bad("split.ratios", f"expected three non-negative shares, got {ratios}")
        if self.split.history_len < 1:
            bad("split.history_len", f"must be at least 1, got {self.split.history_len}")
        if self.split.train_stride < 1:
            bad("split.train_stride", f"must be at least 1, got {self.split.train_stride}")
        m = self.model
        if m.blocks is not None and m.blocks < 1:
            bad("model.blocks", f"must be at least 1 (or null for all), got {m.blocks}")
        if m.lora.last_blocks is not None and m.lora.last_blocks < 1:
            bad("model.lora.last_blocks", f"must be at least 1 (or null for every block), got {m.lora.last_blocks}")
        if m.item_dim < 0:
            bad("model.item_dim", f"must be 0 (no per-item vectors) or more, got {m.item_dim}")
        if m.item_lr is not None and m.item_lr <= 0:
            bad("model.item_lr", f"must be positive (or null for train.lr), got {m.item_lr}")
        if m.cache_mb < 0:
            bad("model.cache_mb", f"must not be negative, got {m.cache_mb}")
        if m.lora.r < 1:
            bad("model.lora.r", f"must be at least 1, got {m.lora.r}")
        if self.data.kcore < 0:
            bad("data.kcore", f"must be 0 (off) or more, got {self.data.kcore}")
        if self.partition.num_clients < 1:
            bad("partition.num_clients", f"must be at least 1, got {self.partition.num_clients}")
        if self.partition.alpha <= 0:
            bad("partition.alpha", f"must be positive, got {self.partition.alpha}")
        if self.partition.method == "attribute" and not self.partition.attribute:
            bad("partition.attribute", "method=attribute needs the name of a user attribute",
                "partition.attribute", "partition.method")
        if self.partition.method == "domain" and not self.data.domains and self.data.domain_by is None:
            bad("partition.method", "domain needs several datasets in data.domains, or data.domain_by")
        ctr = self.model.backbone == "ctr"
        known = FEDPA_ALGORITHMS if ctr else ALGORITHMS
        why = " (model.backbone=ctr runs FedPA and its baselines)" if ctr else " (FedPA's need model.backbone=ctr)"
        for i, a in enumerate(self.algorithms):
            if a not in known:
                bad(f"algorithms[{i}]", f"{a!r} is not one of {', '.join(known)}{why}")
        if self.train.algorithm not in known:
            bad("train.algorithm", f"{self.train.algorithm!r} is not one of {', '.join(known)}{why}",
                "train.algorithm", "model.backbone")
        if self.train.algorithm in ("ffa-lora", "fedsa-lora", *RESIDUAL_ALGORITHMS) and self.storage.k is not None:
            bad("train.algorithm", f"{self.train.algorithm} does not run in split mode (storage.k) yet: the server "
                "trains the trunk's A and B as one", "train.algorithm", "storage.k")
        if ctr and self.eval.select_by not in CTR_SELECT_BY:
            bad("eval.select_by", f"{self.eval.select_by!r}: FedPA selects its round by the pooled validation "
                f"{', '.join(CTR_SELECT_BY)}", "eval.select_by", "model.backbone")
        t = self.train
        for key in ("rounds", "local_steps", "local_epochs"):
            value = getattr(t, key)
            if value < 0:
                bad(f"train.{key}", f"must not be negative, got {value}")
        if not 0 < t.client_fraction <= 1:
            bad("train.client_fraction", f"must be in (0, 1], got {t.client_fraction}")
        if t.batch_size < 1:
            bad("train.batch_size", f"must be at least 1, got {t.batch_size}")
        for key in ("tau", "beta"):
            value = getattr(self.fellrec, key)
            if value <= 0:
                bad(f"fellrec.{key}", f"must be positive, got {value}")
        if self.eval.every < 0:
            bad("eval.every", f"must be 0 (only after the last round) or more, got {self.eval.every}")
        reference = self.model.backbone in ("sasrec", "most-popular")
        if reference:
            chosen = ([(f"algorithms[{i}]", a) for i, a in enumerate(self.algorithms)] if self.algorithms
                      else [("train.algorithm", t.algorithm)])
            for key, a in chosen:
                if a != "centralized":
                    bad(key, f"{a} needs an LLM backbone; {self.model.backbone} is a centralized reference "
                        "point (use train.algorithm=centralized)", key, "model.backbone")
        names = [d.name for d in self.data.domains]
        if any(not n for n in names) or len(set(names)) != len(names):
            bad("data.domains", f"every domain needs a distinct name, got {names}")
        return problems

    def check_flower(self) -> None:
        """Raise ``ConfigError`` where this config has no Flower form (checked before a run is submitted,
        and again by the ServerApp)."""
        if self.model.backbone not in ("item-tokens", "ranker", "bigrec", "ctr"):
            raise ConfigError(f"model.backbone: {self.model.backbone} does not run on Flower (item-tokens, ranker, "
                              "bigrec and ctr do)")
        if self.train.algorithm == "centralized" and self.model.backbone != "ctr":
            raise ConfigError("train.algorithm: centralized pools every client's data; it has no Flower form")


# ---- loading ----------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (None: all defaults), apply ``key=value`` overrides, validate everything."""
    if path is None:
        return config_from_text(None, "defaults", overrides)
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    return config_from_text(path.read_text(encoding="utf-8"), str(path), overrides)


def config_from_text(text: str | None, source: str, overrides: list[str] = ()) -> Config:
    """``load_config`` on YAML text that came from ``source`` (named in the errors); None: defaults."""
    data: dict = {}
    lines: dict[str, int] = {}
    if text is not None:
        try:
            data = yaml.safe_load(text) or {}
            lines = _key_lines(yaml.compose(text))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    origins = {}
    for item in overrides:
        key, value = _parse_override(item)
        _set_path(data, key, value)
        origins[key] = f"--set {key}"
    for old, new in MOVED.items():
        if _has_path(data, old):
            raise ConfigError(f"{_where(source, lines, origins, old)}: {old}: moved to {new} (one key for every "
                              "backbone)")
    model = data.get("model")
    if isinstance(model, dict) and model.get("backbone") == "ctr":
        for key, value in CTR_DEFAULTS.items():
            if not _has_path(data, key):
                _set_path(data, key, value)
    errors: list[str] = []
    cfg = _build(Config, data, "", errors, lambda key: _where(source, lines, origins, key))
    if not errors:
        errors = [f"{_where(source, lines, origins, *keys)}: {problem}" for keys, problem in cfg.validate()]
    if errors:
        raise ConfigError("; ".join(errors))
    return cfg


def _where(source: str, lines: dict[str, int], origins: dict[str, str], *keys: str) -> str:
    """Where the value of a key came from: ``--set <key>`` (or of a section above it) when an override
    gave it, else the file line of the key, else of the nearest section above it that the file has,
    else the file. With several keys, the first that was given explicitly (by --set or on its own
    line) wins; if none was, the first key's section line or the file."""
    for key in keys:
        k = key
        while k:
            if k in origins:
                return origins[k]
            k = _parent(k)
        if key in lines:
            return f"{source}:{lines[key]}"
    key = keys[0]
    while key and key not in lines:
        key = _parent(key)
    return f"{source}:{lines[key]}" if key in lines else source


def _parent(key: str) -> str:
    """``a.b[2]`` -> ``a.b``, ``a.b`` -> ``a``, ``a`` -> ``""``."""
    if key.endswith("]"):
        return key[:key.rindex("[")]
    return key.rpartition(".")[0]


def _key_lines(node, prefix: str = "") -> dict[str, int]:
    out = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = k.start_mark.line + 1
            out.update(_key_lines(v, key + "."))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            key = f"{prefix.rstrip('.')}[{i}]"
            out[key] = v.start_mark.line + 1
            out.update(_key_lines(v, key + "."))
    return out


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected key=value, e.g. --set partition.num_clients=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _has_path(data: dict, key: str) -> bool:
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _set_path(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _build(cls, data: Any, prefix: str, errors: list[str], where) -> Any:
    """Make a ``cls`` from a dict, recording every unknown key and wrong type in ``errors``."""
    if not isinstance(data, dict):
        errors.append(f"{where(prefix.rstrip('.'))}: {prefix.rstrip('.') or 'config'}: expected a mapping, "
                      f"got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            full = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid: {', '.join(fields)})"
            errors.append(f"{where(full)}: {full}: unknown key{hint}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _check(data[name], hints[name], f, f"{prefix}{name}", errors, where)
    return cls(**values)


def _check(value: Any, tp: Any, f: dataclasses.Field | None, key: str, errors: list[str], where) -> Any:
    """``value`` as type ``tp``, or the default after recording why it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _check(value, tp, f, key, errors, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", errors, where)
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{where(key)}: {key}: expected a list, got {value!r}")
            return f.default_factory() if f is not None else []
        return [_check(v, args[0], None, f"{key}[{i}]", errors, where) for i, v in enumerate(value)]
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
        with contextlib.suppress(ValueError):
            value = float(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        errors.append(f"{where(key)}: {key}: expected {tp.__name__}, got {value!r}")
        return None
    choices = f.metadata.get("choices") if f is not None else None
    if choices and value not in choices:
        errors.append(f"{where(key)}: {key}: {value!r} is not one of {', '.join(choices)}")
    return float(value) if tp is float else value


# ---- output -----------------------------------------------------------------------------------


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    """The full resolved config as YAML (what ``runs/<name>/config.yaml`` holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def describe(cls=Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every key as ``(dotted name, default, doc)``, in declaration order."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rows.extend(describe(type(default), f"{prefix}{f.name}."))
        else:
            doc = f.metadata.get("doc", "")
            choices = f.metadata.get("choices")
            if choices:
                doc += f" [{' | '.join(choices)}]"
            rows.append((f"{prefix}{f.name}", default, doc))
    return rows
