"""What the server could learn in flexible storage: two inversion attacks on the hidden states it sees.

For every prompt a client runs in split mode, the server receives the hidden states at the cut
(the input of block k: the embeddings after the client's blocks [0, k)), and computes the trunk's
output (the input of block L - tail, which goes back to the client's tail). Each is a [T, H]
matrix, one row per prompt token; ``server_view`` gives both, computed as the client and the
server compute them, with the client's adapter as it is (``block_inputs`` on the client's model
gives the same for every cut in one pass). The prompt lists the user's history
titles (``fellrec.backbones.prompts``); the attacks try to read them back. A "layer" below is the
index of the block whose input is observed: 0 is right after the embeddings, L - tail the trunk's
output.

- White-box (``whitebox``): the attacker holds the public frozen base model, not the client's
  LoRA adapter, and knows the prompt template. It recovers the tokens left to right: with the
  tokens recovered so far run once through blocks [0, layer) and their keys and values cached
  (a transformers ``DynamicCache``), it runs every candidate token at the next position through
  the same blocks in one batch (``candidate_states``) and keeps the candidate whose state is
  nearest to the observed one. Nearest is in L2 by default: with the client's adapter equal to
  the base (a fresh LoRA, B = 0) the right candidate is at distance 0 up to rounding, and L2,
  unlike the cosine, is not blunted by the few very large coordinates that every token of a
  Llama's residual stream shares (they cancel in a difference but dominate a cosine). The
  cosine is an option. Candidates are scanned in chunks, in the order given (the benchmark puts
  the catalogue's most frequent tokens first); the scan stops at a chunk holding a candidate
  whose state matches the observed one to a relative L2 distance below ``tol``, since no other
  candidate can then be told apart from it. With an unknown adapter nothing matches that well
  and every candidate is scanned. Several layers are attacked in one pass while their recovered
  prefixes agree (one cache, one candidate pass read at each layer); the answer is the same as
  attacking each alone.
- Learned (``Decoder``, ``train_decoder``): one small network per layer, from a position's state to
  the token at that position, trained on prompts that the attacker builds from titles it owns
  (``owned_items``: catalogue items outside every victim's history) and runs through the base
  model; then applied to the victims' states position by position. Its scores are dot products
  with the base model's (public, frozen) embeddings of the candidate tokens, so it can score a
  token it never saw in training (whether it ranks it first is what the benchmark measures).

Candidates (``catalogue_candidates``): by default the tokens of the public item catalogue's titles
and of the prompt template, as they tokenise inside a prompt; the whole vocabulary is
``torch.arange(len(tok))``. The template's fixed opening (``known_prefix``) is the same for every
user and is not attacked; only positions from there to the last history token are.

``recovery`` scores a recovered token sequence: the share of the history-title tokens recovered
exactly (a token counts as a title's when it overlaps the title's characters; template tokens do
not count) and the share of titles with every token right; ``identify`` maps recovered text back
to catalogue titles.
"""

from __future__ import annotations

import copy
import difflib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from fellrec.backbones.prompts import Prompt
from fellrec.backbones.text import pad
from fellrec.storage.parts import cut, positions, run_blocks

# ---- the prompt, its tokens and which title each belongs to ----------------------------------------


@dataclass
class Victim:
    """One user's prompt: its token ids, and per token the index (in ``items``) of the history title it
    overlaps, or -1 for a template token."""

    ids: list[int]
    owner: list[int]
    items: list[int]
    text: str

    def end(self, titles: int | None = None) -> int:
        """One past the last token of the first ``titles`` history titles (all by default): where an
        attack on them can stop, since a position's state depends only on the tokens up to it."""
        last = len(self.items) if titles is None else min(titles, len(self.items))
        return max(i for i, o in enumerate(self.owner) if 0 <= o < last) + 1


def victim(tok, prompt: Prompt, titles: Sequence[str], history: Iterable[int]) -> Victim:
    """The instruction prompt of a user with ``history`` (item indices into ``titles``), tokenised."""
    items = [int(i) for i in history]
    names = [titles[i] for i in items]
    text = prompt.instruction(names)
    spans, at = [], text.index(prompt.history(names))
    for name in names:
        start = text.index(f'"{name}"', at) + 1
        spans.append((start, start + len(name)))
        at = start + len(name)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    owner = []
    for a, b in enc["offset_mapping"]:
        hit = [j for j, (s, e) in enumerate(spans) if a < e and s < b]
        owner.append(hit[0] if hit else -1)
    return Victim(list(enc["input_ids"]), owner, items, text)


def known_prefix(tok, prompt: Prompt) -> list[int]:
    """The template's opening tokens, the same whatever the history (the longest common prefix of
    prompts whose histories start with very different characters)."""
    probes = [tok(prompt.instruction([t]), add_special_tokens=False)["input_ids"]
              for t in ("A", "z", "0", "'", " x", "(", "É")]
    n = 0
    while all(n < len(p) and p[n] == probes[0][n] for p in probes):
        n += 1
    return probes[0][:n]


def catalogue_candidates(tok, prompt: Prompt, titles: Sequence[str]) -> Tensor:
    """The distinct token ids of every title and of the template, as they tokenise inside a prompt
    (a title in the middle of the list and at its end), the most frequent in the catalogue first."""
    counts: Counter[int] = Counter(tok(prompt.instruction(list(titles)), add_special_tokens=False)["input_ids"])
    for t in titles:
        counts.update(set(tok(prompt.instruction([t]), add_special_tokens=False)["input_ids"]) - set(counts))
    return torch.tensor(sorted(counts, key=lambda i: (-counts[i], i)), dtype=torch.long)


# ---- what the server sees ----------------------------------------------------------------------------


def check_layer(layer: int, num_blocks: int) -> None:
    if not 0 <= layer < num_blocks:
        raise ValueError(f"layer: {layer} is not the input of a block of this {num_blocks}-block model "
                         f"(expected 0 <= layer <= {num_blocks - 1})")


@torch.no_grad()
def server_view(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, k: int,
                tail: int = 1) -> tuple[Tensor, Tensor]:
    """What the server gets for a right-padded batch when the model is cut at ``k``: the states at the
    cut (input of block k) and the trunk's output (input of block L - tail), each [B, T, H], run as
    the client and the server run them, with the client's adapter as it is."""
    client, trunk = cut(model, k, tail)
    pos = positions(attention_mask)
    at_cut = client.run_head(input_ids, attention_mask, pos)
    return at_cut, trunk(at_cut, attention_mask, pos)


def _llama(model: nn.Module) -> nn.Module:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model


@torch.no_grad()
def block_inputs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                 layers: Iterable[int]) -> dict[int, Tensor]:
    """The input of each block in ``layers`` [B, T, H] for a right-padded batch, in one pass through the
    model as it is (with its adapter, if it has one). For a model with the client's adapter this is
    what ``server_view`` gives at every cut at once."""
    inner = _llama(model)
    wanted = sorted(set(layers))
    for layer in wanted:
        check_layer(layer, len(inner.layers))
    pos = positions(attention_mask)
    out, hidden, done = {}, inner.embed_tokens(input_ids), 0
    for layer in wanted:
        blocks = nn.ModuleDict({str(i): inner.layers[i] for i in range(done, layer)})
        hidden = run_blocks(blocks, model.config, inner.rotary_emb, hidden, attention_mask, pos)
        out[layer], done = hidden, layer
    return out


# ---- white-box -----------------------------------------------------------------------------------------


def _candidate_block(block: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, past_k: Tensor, past_v: Tensor) -> Tensor:
    """A Llama decoder block on C one-token continuations [C, 1, H] of one shared prefix whose keys and
    values (rotated, [1, kv_heads, P, d]) are cached: each candidate attends to the prefix and itself."""
    c, attn = x.shape[0], block.self_attn
    d = attn.head_dim
    h = block.input_layernorm(x)
    q = attn.q_proj(h).view(c, -1, 1, d)
    k = attn.k_proj(h).view(c, -1, 1, d)
    v = attn.v_proj(h).view(c, -1, d)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    kv_heads = k.shape[1]
    q = q.view(c, kv_heads, -1, d)  # query heads grouped by the key/value head they share
    k = k.view(c, kv_heads, d)
    to_prefix = torch.einsum("ckgd,kpd->ckgp", q, past_k[0]) * attn.scaling
    to_self = torch.einsum("ckgd,ckd->ckg", q, k).unsqueeze(-1) * attn.scaling
    w = torch.cat([to_prefix, to_self], dim=-1).softmax(dim=-1)
    out = torch.einsum("ckgp,kpd->ckgd", w[..., :-1], past_v[0]) + w[..., -1:] * v.unsqueeze(2)
    x = x + attn.o_proj(out.reshape(c, 1, -1))
    return x + block.mlp(block.post_attention_layernorm(x))


@torch.no_grad()
def candidate_states(base: nn.Module, cache: DynamicCache | None, position: int, candidates: Tensor,
                     layers: Iterable[int]) -> dict[int, Tensor]:
    """The input of each block in ``layers`` [C, H] for every candidate token at ``position``, after the
    prefix whose keys and values (through at least blocks [0, max(layers))) ``cache`` holds; the cache
    is read, never written, and may be None when ``position`` is 0."""
    inner = _llama(base)
    wanted = set(layers)
    x = inner.embed_tokens(candidates).unsqueeze(1)
    out = {0: x[:, 0]} if 0 in wanted else {}
    cos, sin = inner.rotary_emb(x, position_ids=torch.tensor([[position]], device=x.device))
    for i in range(max(wanted)):
        attn = inner.layers[i].self_attn
        if position == 0:
            past_k = past_v = x.new_zeros((1, base.config.num_key_value_heads, 0, attn.head_dim))
        else:
            past_k, past_v = cache.layers[i].keys, cache.layers[i].values
        x = _candidate_block(inner.layers[i], x, cos, sin, past_k, past_v)
        if i + 1 in wanted:
            out[i + 1] = x[:, 0]
    return out


def _feed(base: nn.Module, cache: DynamicCache, depth: int, ids: list[int], start: int) -> None:
    """Append ``ids`` (at positions start, start+1, ...) to the cache of blocks [0, depth)."""
    if depth == 0 or not ids:
        return
    inner = _llama(base)
    blocks = nn.ModuleDict({str(i): inner.layers[i] for i in range(depth)})
    x = inner.embed_tokens(torch.tensor([ids]))
    mask = torch.ones((1, start + len(ids)), dtype=torch.long)
    run_blocks(blocks, base.config, inner.rotary_emb, x, mask, torch.arange(start, start + len(ids))[None], cache)


@torch.no_grad()
def whitebox(base: nn.Module, observed: dict[int, Tensor], *, known: Sequence[int], end: int, candidates: Tensor,
             metric: str = "l2", chunk: int = 128, tol: float = 1e-4) -> dict[int, list[int]]:
    """For each layer, the tokens at positions [len(known), end) recovered from ``observed[layer]``
    [T, H] (the states at the input of block ``layer``) by the white-box search of the module doc;
    ``base`` is the attacker's model (the plain base model: it does not know the client's adapter)
    and ``known`` the template's first tokens.

    The layers are attacked together while they agree: layers whose recovered prefixes are the same
    share one key/value cache and one pass of each candidate chunk through the blocks, read at every
    layer on the way; a group splits when its layers pick different tokens. The result is the one
    each layer's attack alone would give.
    """
    inner = _llama(base)
    for layer in observed:
        check_layer(layer, len(inner.layers))
    if metric not in ("l2", "cosine"):
        raise ValueError(f"metric: expected 'l2' or 'cosine', got {metric!r}")
    width = min(s.shape[0] for s in observed.values())
    if not len(known) <= end <= width:
        raise ValueError(f"end: {end} must lie between the known prefix's length {len(known)} and the "
                         f"{width} observed positions")
    got = {layer: list(known) for layer in observed}
    first = DynamicCache(config=base.config)
    _feed(base, first, max(observed), list(known), 0)
    groups = [(sorted(observed), first)]
    for pos in range(len(known), end):
        next_groups = []
        for layers, cache in groups:
            best = {layer: (-1, float("inf")) for layer in layers}
            matched: set[int] = set()
            for start in range(0, len(candidates), chunk):
                part = candidates[start:start + chunk]
                states = candidate_states(base, cache, pos, part, layers)
                for layer in layers:
                    target = observed[layer][pos]
                    rel = (states[layer] - target).norm(dim=-1) / target.norm().clamp_min(1e-12)
                    d = rel if metric == "l2" else 1 - F.cosine_similarity(states[layer], target[None], dim=-1)
                    j = int(d.argmin())
                    if float(d[j]) < best[layer][1]:
                        best[layer] = (int(part[j]), float(d[j]))
                    if float(rel.min()) < tol:
                        matched.add(layer)
                if len(matched) == len(layers):
                    break
            by_token: dict[int, list[int]] = {}
            for layer in layers:
                got[layer].append(best[layer][0])
                by_token.setdefault(best[layer][0], []).append(layer)
            caches = [cache] + [copy.deepcopy(cache) for _ in range(len(by_token) - 1)]
            for (token, same), c in zip(by_token.items(), caches, strict=True):
                _feed(base, c, max(same), [token], pos)
                next_groups.append((same, c))
        groups = next_groups
    return {layer: ids[len(known):] for layer, ids in got.items()}


# ---- learned -----------------------------------------------------------------------------------------


def owned_items(titles: Sequence[str], victims: Iterable[Iterable[int]]) -> list[int]:
    """The catalogue items the attacker may train on: every item not in any victim's history, nor
    sharing a title with one."""
    taken = {int(i) for h in victims for i in h}
    taken_titles = {titles[i] for i in taken}
    return [i for i, t in enumerate(titles) if i not in taken and t not in taken_titles]


def attacker_histories(items: Sequence[int], n: int, length: int = 10, seed: int = 0) -> list[list[int]]:
    """``n`` random histories of ``length`` distinct items drawn from ``items`` (seeded)."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(items)
    return [pool[rng.choice(len(pool), size=min(length, len(pool)), replace=False)].tolist() for _ in range(n)]


@torch.no_grad()
def training_pairs(base: nn.Module, tok, prompt: Prompt, titles: Sequence[str], histories: Sequence[Sequence[int]],
                   layers: Iterable[int], *, known: Sequence[int],
                   batch_size: int = 8) -> tuple[dict[int, Tensor], Tensor]:
    """The attacker's training data: its own prompts (one per history) run through ``base``; per layer
    the states [N, H] at every position after the known template opening, and the tokens there [N]."""
    layers = sorted(set(layers))
    states: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    tokens = []
    prompts = [victim(tok, prompt, titles, h) for h in histories]
    for start in range(0, len(prompts), batch_size):
        part = prompts[start:start + batch_size]
        batch = pad([v.ids for v in part], tok.pad_token_id)
        got = block_inputs(base, batch["input_ids"], batch["attention_mask"], layers)
        for j, v in enumerate(part):
            for layer in layers:
                states[layer].append(got[layer][j, len(known):len(v.ids)])
            tokens.append(torch.tensor(v.ids[len(known):]))
    return {layer: torch.cat(s) for layer, s in states.items()}, torch.cat(tokens)


class Decoder(nn.Module):
    """A state [.., H] to scores over the candidate tokens: the state standardised per coordinate (with
    the training states' mean and spread), mapped into the embedding space by a linear layer (or a
    two-layer MLP with ``hidden``), then dotted with the candidates' base embeddings, plus a bias."""

    def __init__(self, candidates: Tensor, embeddings: Tensor, mean: Tensor, std: Tensor, hidden: int = 0):
        super().__init__()
        dim = embeddings.shape[1]
        self.register_buffer("candidates", candidates.clone())
        self.register_buffer("embeddings", embeddings.detach().clone())
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.map = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) if hidden else \
            nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.zeros(len(candidates)))

    def forward(self, states: Tensor) -> Tensor:
        return self.map((states - self.mean) / self.std) @ self.embeddings.T + self.bias

    @torch.no_grad()
    def tokens(self, states: Tensor) -> list[int]:
        """The best candidate token for each state [N, H]."""
        return self.candidates[self(states).argmax(-1)].tolist()


def train_decoder(states: Tensor, tokens: Tensor, candidates: Tensor, embeddings: Tensor, *, hidden: int = 0,
                  epochs: int = 4, lr: float = 2e-3, batch_size: int = 256, seed: int = 0) -> Decoder:
    """A ``Decoder`` trained by cross-entropy on (state [N, H], token id [N]) pairs; ``embeddings`` are the
    base model's input embeddings of ``candidates``. Pairs whose token is not a candidate are dropped."""
    index = torch.full((int(max(candidates.max(), tokens.max())) + 1,), -1, dtype=torch.long)
    index[candidates] = torch.arange(len(candidates))
    labels = index[tokens]
    keep = labels >= 0
    states, labels = states[keep], labels[keep]
    if len(labels) == 0:
        raise ValueError("train_decoder: none of the training tokens is a candidate")
    std = states.std(0).clamp_min(1e-6) if len(states) > 1 else torch.ones(states.shape[1])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        dec = Decoder(candidates, embeddings, states.mean(0), std, hidden)
        opt = torch.optim.AdamW(dec.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(epochs):
            for idx in torch.randperm(len(labels)).split(batch_size):
                loss = F.cross_entropy(dec(states[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return dec.eval()


# ---- scoring -----------------------------------------------------------------------------------------


@dataclass
class Recovery:
    tokens_right: int = 0
    tokens: int = 0
    titles_right: int = 0
    titles: int = 0

    def __add__(self, other: Recovery) -> Recovery:
        return Recovery(self.tokens_right + other.tokens_right, self.tokens + other.tokens,
                        self.titles_right + other.titles_right, self.titles + other.titles)

    @property
    def token_share(self) -> float:
        return self.tokens_right / self.tokens if self.tokens else float("nan")

    @property
    def title_share(self) -> float:
        return self.titles_right / self.titles if self.titles else float("nan")


def recovery(true_ids: Sequence[int], guessed: Sequence[int], owner: Sequence[int]) -> Recovery:
    """How much of the history ``guessed`` gets right: only tokens with ``owner`` >= 0 (a title's) count;
    a title is right when every one of its tokens is. The three sequences are aligned position by
    position; a missing guess (``guessed`` shorter) is wrong."""
    if len(true_ids) != len(owner):
        raise ValueError(f"owner: {len(owner)} entries for {len(true_ids)} tokens")
    right: dict[int, bool] = {}
    out = Recovery()
    for i, (t, o) in enumerate(zip(true_ids, owner, strict=True)):
        if o < 0:
            continue
        ok = i < len(guessed) and guessed[i] == t
        out.tokens += 1
        out.tokens_right += ok
        right[o] = right.get(o, True) and ok
    out.titles, out.titles_right = len(right), sum(right.values())
    return out


def identify(text: str, titles: Sequence[str], cutoff: float = 0.8) -> list[int]:
    """The catalogue items named in recovered history text (``"t1", "t2", ...``): each quoted piece
    mapped to the closest title (``difflib``, similarity at least ``cutoff``); unmatched pieces dropped."""
    found, index = [], {t: i for i, t in reversed(list(enumerate(titles)))}
    for piece in text.split('", "'):
        piece = piece.strip(' ",\n')
        if piece in index:
            found.append(index[piece])
            continue
        match = difflib.get_close_matches(piece, list(index), n=1, cutoff=cutoff) if piece else []
        if match:
            found.append(index[match[0]])
    return found
