"""Item-token recommender: every history item enters the LM as ONE input vector (E4SRec, LLaRA and
Lite-LLM4Rec are of this family), so a sample is a few prompt tokens and N item positions instead
of the 120-230 tokens of a text prompt. The fast LLM backbone on a CPU.

With ``e_i`` the mean of the frozen input embeddings of item i's title tokens, a sample
(prompt p, history i_1..i_N) enters the LM as [emb(p), e_{i_1}, ..., e_{i_N}]. The blocks below the
first adapted block ``c`` are frozen, so their output is a function of the sample alone: it is
computed once per distinct history and kept in memory (``cache_mb``). At block c each item
position gets its trainable input part added,

    h_c[t] += W_in · e_{i_t} + U_in · x_{i_t}        (W_in, U_in start at 0: the base model's states)

with x_i ∈ R^d a per-item vector (``item_dim``; 0 turns them off). The blocks from c carry LoRA;
the last hidden state (after the final norm) at an item position is the user state u_t. Items are
scored against the whole catalogue by one matrix product,

    s(u, j) = u · v_j / √H + b_j,   v_j = W_out · e_j + U_out · y_j        (W_out starts at I)

trained with softmax cross-entropy over all items, at every item position (``loss_positions:
all``: position t predicts i_{t+1}, the last predicts the target; SASRec's objective) or at the
last only. ``rank`` scores from the last position.

The trainable item part (``ItemHead``: W_in, W_out, U_in, U_out, x, y, b) is attached to the model
as the module ``items``, so it is part of the adapter like LoRA's tensors (named ``items.*``): the
strategies aggregate it, FELLRec's similarity sees it, checkpoints keep it and its bytes are
counted. In split mode it lives in the client's part. The per-item tensors (x, y, b) tell the
server which items a client trained on; ``private_names`` lists them for a config that keeps them
on the client (``model.item_vectors: private``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fellrec.backbones import text
from fellrec.backbones.prompts import Prompt
from fellrec.holdout import Samples
from fellrec.storage.parts import positions, run_blocks
from fellrec.train import inference

PRIVATE = ("items.x", "items.y", "items.bias")  # the per-item tensors


class ItemHead(nn.Module):
    """The item part of the adapter: input and output maps of the title vectors, per-item vectors,
    per-item bias."""

    def __init__(self, num_items: int, hidden: int, dim: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_in = nn.Parameter(torch.zeros(hidden, hidden))
        self.w_out = nn.Parameter(torch.eye(hidden))
        self.bias = nn.Parameter(torch.zeros(num_items))
        self.dim = dim
        if dim > 0:  # like LoRA: one factor random, the other zero, so the start is the title part alone
            self.x = nn.Parameter(torch.randn(num_items, dim, generator=g) / math.sqrt(dim))
            self.y = nn.Parameter(torch.randn(num_items, dim, generator=g) / math.sqrt(dim))
            self.u_in = nn.Parameter(torch.zeros(hidden, dim))
            self.u_out = nn.Parameter(torch.zeros(hidden, dim))

    def inputs(self, e: Tensor, items: Tensor) -> Tensor:
        """What block c adds at item positions: W_in e + U_in x, for title vectors ``e`` of ``items``."""
        out = e @ self.w_in.T
        return out + self.x[items] @ self.u_in.T if self.dim > 0 else out

    def table(self, e: Tensor) -> Tensor:
        """Every item's output vector v_j = W_out e_j + U_out y_j."""
        out = e @ self.w_out.T
        return out + self.y @ self.u_out.T if self.dim > 0 else out


class _Stack:
    """The LM's decoder as this backbone runs it: token embeddings, blocks [0, c) without gradients,
    blocks [c, L) and the final norm; in split mode blocks [c, k) here, the trunk on the server, the
    tail here."""

    def __init__(self, model: nn.Module):
        self.split = getattr(model, "fellrec_split", False)
        if self.split:
            part = model.client
            self.embed, self.config, self.rotary = part.embed_tokens, part.config, part.rotary_emb
            self.blocks = dict(part.head.items())
            self.num_blocks, self.k = part.config.num_hidden_layers, model.k
            self.owner = part
        else:
            inner = (model.get_base_model() if hasattr(model, "get_base_model") else model).model
            self.embed, self.config, self.rotary, self.norm = inner.embed_tokens, inner.config, inner.rotary_emb, \
                inner.norm
            self.blocks = {str(i): b for i, b in enumerate(inner.layers)}
            self.num_blocks, self.k = len(inner.layers), None
            self.owner = model
        self.model = model

    def first_adapted(self) -> int:
        """c: the first block with a trainable tensor (the number of blocks when none has)."""
        if self.split:
            from fellrec.storage.parts import trainable

            names = [n for n in trainable(self.model.client) if not n.startswith("items.")]
            adapted = [int(n.split(".")[4]) for n in [*names, *self.model.trunk_names()]]
            return min(adapted, default=self.num_blocks)
        for i in range(self.num_blocks):
            if any(p.requires_grad for p in self.blocks[str(i)].parameters()):
                return i
        return self.num_blocks

    def lower(self, hidden: Tensor, mask: Tensor, pos: Tensor, c: int) -> Tensor:
        return run_blocks(nn.ModuleDict({str(i): self.blocks[str(i)] for i in range(c)}), self.config, self.rotary,
                          hidden, mask, pos)

    def upper(self, hidden: Tensor, mask: Tensor, pos: Tensor, c: int) -> Tensor:
        if self.split:
            return self.model.decoder.forward_from(hidden, mask, c).last_hidden_state
        blocks = nn.ModuleDict({str(i): self.blocks[str(i)] for i in range(c, self.num_blocks)})
        return self.norm(run_blocks(blocks, self.config, self.rotary, hidden, mask, pos))


class StateCache:
    """The frozen blocks' states of each history: in memory up to a budget, and kept in a file under
    the cache directory (like the title embeddings of ``fellrec.backbones.text``) so that later runs
    of the same model, cut and catalogue start with them. A history's states depend on nothing that
    trains, so a cached row is exact."""

    def __init__(self, key: str | None, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.rows: dict[str, Tensor] = {}
        self.new = 0
        self.path = None
        self._file, self._stored = None, set()
        if key is not None and budget_bytes > 0:
            from fellrec.llm import cache_dir

            self.path = cache_dir() / "states" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
            if self.path.is_file():
                from safetensors import safe_open

                self._file = safe_open(str(self.path), framework="pt")
                self._stored = set(self._file.keys())

    def __len__(self) -> int:
        return len(self.rows)

    @staticmethod
    def name(history: np.ndarray) -> str:
        return hashlib.sha1(np.asarray(history, dtype=np.int64).tobytes()).hexdigest()

    def get(self, name: str) -> Tensor | None:
        row = self.rows.get(name)
        if row is None and name in self._stored:
            row = self._file.get_tensor(name)
            self._keep(name, row)
        return row

    def put(self, name: str, row: Tensor) -> None:
        if self._keep(name, row.detach().cpu().clone()) and name not in self._stored:
            self.new += 1

    def _keep(self, name: str, row: Tensor) -> bool:
        size = row.numel() * row.element_size()
        if self.used + size > self.budget:
            return False
        self.rows[name] = row
        self.used += size
        return True

    def save(self) -> None:
        """Write the rows this process added into the file (with those it had), if there are any."""
        if self.path is None or self.new == 0:
            return
        from fellrec.files import save_tensors

        rows = {n: self._file.get_tensor(n) for n in self._stored if n not in self.rows} if self._file else {}
        rows.update(self.rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors(self.path, rows)
        self.new = 0


class ItemTokenRec:
    def __init__(self, model: nn.Module, tok, titles: Sequence[str], prompt: Prompt, *, item_dim: int = 64,
                 loss_positions: str = "all", cache_mb: float = 1024.0, seed: int = 0, cache_key: str | None = None):
        if loss_positions not in ("all", "last"):
            raise ValueError(f"loss_positions must be 'all' or 'last', got {loss_positions!r}")
        self.model = model  # sets self.stack
        self.tok = tok
        self.titles = list(titles)
        self.loss_positions = loss_positions
        self.cut = self.stack.first_adapted()
        if self.stack.split and self.cut > self.stack.k:
            raise ValueError(f"the first adapted block is {self.cut}, above the cut k={self.stack.k}: the items "
                             "enter at the first adapted block, which must be on the client (adapt blocks below k, "
                             "or raise storage.k)")
        dev = text.device_of(model)
        with torch.no_grad():
            ids = tok(self.titles, add_special_tokens=False)["input_ids"]
            weight = self.stack.embed.weight
            rows = [weight[torch.as_tensor(t or [tok.eos_token_id], device=weight.device)].mean(0) for t in ids]
            self.e = torch.stack(rows).detach()  # [I, H], frozen
            self.e_out = F.normalize(self.e, dim=-1)
            self.prefix_ids = tok(prompt.sequence_prefix(), add_special_tokens=False)["input_ids"]
            self.prefix = self.stack.embed(torch.as_tensor(self.prefix_ids, device=dev)).detach()
        hidden = self.e.shape[1]
        self.head = ItemHead(len(self.titles), hidden, item_dim, seed=seed).to(dev)
        self.stack.owner.add_module("items", self.head)  # part of the adapter (fellrec.adapters)
        self.scale = 1.0 / math.sqrt(hidden)
        key = None
        if cache_key is not None and self.cut > 0:  # what the frozen blocks' states depend on
            titles = hashlib.sha256("\n".join(self.titles).encode()).hexdigest()
            key = "\n".join([cache_key, f"cut={self.cut}", f"prefix={self.prefix_ids}", f"titles={titles}",
                             f"device={dev.type}"])
        self.cache = StateCache(key, int(cache_mb * 2**20) if self.cut > 0 else 0)

    @property
    def model(self) -> nn.Module:
        return self._model

    @model.setter
    def model(self, model: nn.Module) -> None:
        """The LM (a split model's client half may replace the whole split model, as over Flower)."""
        self._model = model
        self.stack = _Stack(model)

    @staticmethod
    def private_names() -> tuple[str, ...]:
        return PRIVATE

    # ---- the forward pass --------------------------------------------------------------------

    def _lower(self, batch: Samples) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded states at block c [B, T, H], the mask [B, T], and item ids [B, T] (-1 off items)."""
        dev = self.e.device
        P = len(self.prefix_ids)
        lengths = [P + len(h) for h in batch.history]
        T, B, H = max(lengths), len(batch), self.e.shape[1]
        items = torch.full((B, T), -1, dtype=torch.long, device=dev)
        for b, h in enumerate(batch.history):
            items[b, P:P + len(h)] = torch.as_tensor(np.asarray(h, dtype=np.int64), device=dev)
        mask = (torch.arange(T, device=dev).unsqueeze(0) < torch.as_tensor(lengths, device=dev).unsqueeze(1)).long()
        names = [StateCache.name(h) for h in batch.history]
        found = [self.cache.get(n) for n in names]
        missing = [b for b, row in enumerate(found) if row is None]
        states = torch.zeros(B, T, H, device=dev)
        if missing:
            x = self.prefix.unsqueeze(0).repeat(len(missing), 1, 1)
            x = torch.cat([x, torch.zeros(len(missing), T - P, H, device=dev)], dim=1)
            sub = items[missing]
            x[:, P:] = torch.where((sub[:, P:] >= 0).unsqueeze(-1), self.e[sub[:, P:].clamp(min=0)], 0.0)
            sub_mask = mask[missing]
            with torch.no_grad():
                low = self.stack.lower(x, sub_mask, positions(sub_mask), self.cut)
            for j, b in enumerate(missing):
                states[b, :lengths[b]] = low[j, :lengths[b]]
                self.cache.put(names[b], low[j, :lengths[b]])
        for b, row in enumerate(found):
            if row is not None:
                states[b, :lengths[b]] = row.to(dev)
        return states, mask, items

    def save_cache(self) -> None:
        """Keep the frozen blocks' states computed in this process for later runs."""
        self.cache.save()

    def states(self, batch: Samples) -> tuple[Tensor, Tensor, Tensor]:
        """The user states [B, T, H] at every position, the mask, the item ids (-1 off items)."""
        h, mask, items = self._lower(batch)
        on = items >= 0
        add = self.head.inputs(self.e[items.clamp(min=0)], items.clamp(min=0))
        h = h + add * on.unsqueeze(-1)
        return self.stack.upper(h, mask, positions(mask), self.cut), mask, items

    def item_table(self) -> Tensor:
        return self.head.table(self.e_out)

    def scores(self, u: Tensor) -> Tensor:
        return u @ self.item_table().T * self.scale + self.head.bias

    # ---- the backbone's two calls ---------------------------------------------------------------

    def loss(self, batch: Samples) -> Tensor:
        u, _, items = self.states(batch)
        dev = u.device
        last = (items >= 0).sum(1) + len(self.prefix_ids) - 1  # each row's last item position
        rows = torch.arange(len(batch), device=dev)
        target = torch.as_tensor(np.array([int(t[0]) for t in batch.targets]), dtype=torch.long, device=dev)
        if self.loss_positions == "last":
            return F.cross_entropy(self.scores(u[rows, last]), target)
        nxt = torch.full_like(items, -100)
        nxt[:, :-1] = items[:, 1:]  # an item position predicts the next item ...
        nxt[(nxt < 0) | (items < 0)] = -100  # ... (the prompt's positions predict nothing)
        nxt[rows, last] = target  # ... and the last one the sample's target
        keep = nxt != -100
        return F.cross_entropy(self.scores(u[keep]), nxt[keep])

    def rank(self, batch: Samples) -> Tensor:
        with inference(self.model):
            u, _, items = self.states(batch)
            last = (items >= 0).sum(1) + len(self.prefix_ids) - 1
            return self.scores(u[torch.arange(len(batch), device=u.device), last])
