"""What the server could learn in flexible storage: the user's history read back from the hidden states it sees.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attack_split.py       # the defaults: 28 min (19 min CPU, one thread)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attack_split.py --learned-victims 8 --attacker-prompts 16 \\
        --whitebox-victims 1 --whitebox-titles 1 --random-victims 1 --random-titles 1    # a 4-minute smoke run

SmolLM2-135M-Instruct with a LoRA adapter (r 8, α 16, q_proj and v_proj), ML-100K with the default
config (temporal 8:1:1 split, 10-title histories, 69 test users), BIGRec's instruction prompt. Per
prompt token the server sees the input of block k (the cut; ``--layers`` 1, 2, 4, 8, 16) and the
trunk's output, the input of block 29 (the client's tail block). Two client adapters:

- fresh: B = 0, so what the server sees is exactly the base model's states;
- random: B ~ N(0, ``--b-std``²) on every adapted layer, unknown to the attacker (0.02 moves the
  states by about as much as the demo's trained client adapters do; the script prints by how much).

Attacks (``benchmarks/split_attacks.py``), victims drawn once with ``--seed`` from the test users:

- learned: per layer a linear decoder trained on ``--attacker-prompts`` prompts of random histories
  of attacker-owned titles (catalogue items in no test user's history), run through the base model;
  applied to ``--learned-victims`` users' whole histories (by default all 69);
- white-box: the search over the catalogue's tokens (``--candidates vocab``: all 49,152) with the
  base model; on ``--whitebox-victims`` users' first ``--whitebox-titles`` titles with the fresh
  adapter (the right token matches exactly, so the scan stops early: ~2 s a position for all six
  layers), and on ``--random-victims`` users' first ``--random-titles`` titles with the random one
  (nothing matches exactly: every candidate is scanned, ~13 s a position).

It prints per layer the share of history-title tokens recovered, of whole titles recovered and of
history items named (the recovered text mapped to the closest catalogue title), as a markdown table,
and plots the first two against the layer (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import split_attacks as A
import torch

from fellrec.adapters import add_lora, get_adapter, set_adapter
from fellrec.backbones.prompts import Prompt
from fellrec.backbones.text import pad
from fellrec.config import LoraConfig, load_config
from fellrec.files import atomic
from fellrec.llm import SMOLLM2, load_base
from fellrec.pipeline import prepare

ADAPTERS = ("fresh", "random")


def client_model(b_std: float, seed: int):
    """The client's model: its own copy of the base with a LoRA adapter, B drawn with ``b_std`` (0: fresh)."""
    _, base = load_base(SMOLLM2)
    model = add_lora(base, LoraConfig(), seed=seed)
    if b_std:
        g = torch.Generator().manual_seed(seed)
        set_adapter(model, {n: torch.randn(t.shape, generator=g) * b_std if "lora_B" in n else t
                            for n, t in get_adapter(model).items()})
    return model


def views(model, tok, victims, layers) -> list[dict[int, torch.Tensor]]:
    """Per victim, the states [T, H] the server sees at each layer (one pass through the model)."""
    out = []
    for start in range(0, len(victims), 8):
        part = victims[start:start + 8]
        batch = pad([v.ids for v in part], tok.pad_token_id)
        got = A.block_inputs(model, batch["input_ids"], batch["attention_mask"], layers)
        out += [{k: s[j, :len(v.ids)] for k, s in got.items()} for j, v in enumerate(part)]
    return out


def score(v, known, guess, titles_attacked, tok, catalogue) -> tuple[A.Recovery, int, int]:
    """Recovery of the first ``titles_attacked`` titles, and how many of those titles the text names
    (compared as titles: ML-100K lists a few films twice under two ids)."""
    end = v.end(titles_attacked)
    r = A.recovery(v.ids[:end], [*known, *guess], v.owner[:end])
    named = {catalogue[i] for i in A.identify(tok.decode(guess), catalogue)}
    items = v.items[:titles_attacked]
    return r, sum(catalogue[i] in named for i in items), len(items)


def table(results, layers, tail) -> str:
    head = ["layer (server sees)", *[f"{a} {w}: tokens / titles / named" for a in ("learned", "white-box")
                                     for w in ADAPTERS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in layers:
        where = f"{k} (trunk output, tail input)" if k == tail else f"{k} (cut k = {k})"
        cells = [where]
        for attack in ("learned", "whitebox"):
            for adapter in ADAPTERS:
                r = results.get((attack, adapter, k))
                cells.append("–" if r is None else
                             f"{r['tokens']:.1%} / {r['titles']:.1%} / {r['named']:.1%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, layers, tail, path: Path, caption: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    xs = range(len(layers))
    labels = [f"{k}\n(tail input)" if k == tail else str(k) for k in layers]
    series = [("learned", "fresh", "o-", "tab:blue"), ("learned", "random", "o--", "tab:cyan"),
              ("whitebox", "fresh", "s-", "tab:red"), ("whitebox", "random", "s--", "tab:orange")]
    for ax, what in zip(axes, ("tokens", "titles"), strict=True):
        for i, (attack, adapter, style, colour) in enumerate(series):
            ys = [results.get((attack, adapter, k), {}).get(what, np.nan) for k in layers]
            if not np.all(np.isnan(ys)):  # nudged sideways so that equal curves stay visible
                ax.plot([x + 0.04 * (i - 1.5) for x in xs], [100 * y for y in ys], style, color=colour,
                        label=f"{attack.replace('whitebox', 'white-box')}, {adapter} adapter")
        ax.set_xticks(list(xs), labels)
        ax.set_xlabel("layer the server sees (input of block k)")
        ax.set_ylabel(f"history {what} recovered exactly (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(caption, fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="1,2,4,8,16,29", help="blocks whose input is attacked (29: the tail's)")
    ap.add_argument("--learned-victims", type=int, default=69, help="69: every test user")
    ap.add_argument("--attacker-prompts", type=int, default=150)
    ap.add_argument("--whitebox-victims", type=int, default=3)
    ap.add_argument("--whitebox-titles", type=int, default=10)
    ap.add_argument("--random-victims", type=int, default=2)
    ap.add_argument("--random-titles", type=int, default=2)
    ap.add_argument("--b-std", type=float, default=0.02)
    ap.add_argument("--candidates", choices=("catalogue", "vocab"), default="catalogue")
    ap.add_argument("--metric", choices=("l2", "cosine"), default="l2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=Path("docs/plots/attack_split.png"))
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {msg}", file=sys.stderr, flush=True)

    p = prepare(load_config(None, []))
    catalogue = p.dataset.items.title.tolist()
    prompt = Prompt.for_dataset(p.dataset.name)
    tok, base = load_base(SMOLLM2)  # the attacker's copy: the public base weights, no adapter
    num_blocks = base.config.num_hidden_layers
    try:
        layers = sorted({int(x) for x in args.layers.split(",")})
        for k in layers:
            A.check_layer(k, num_blocks)
    except ValueError as e:
        ap.error(f"--layers: {e}")
    tail = num_blocks - 1
    test = p.samples.test
    order = np.random.default_rng(args.seed).permutation(len(test))
    victims = [A.victim(tok, prompt, catalogue, test.history[i]) for i in order[:args.learned_victims]]
    known = A.known_prefix(tok, prompt)
    if any(v.ids[:len(known)] != known for v in victims):
        raise SystemExit("the template's opening tokenises differently in a victim's prompt")
    cands = A.catalogue_candidates(tok, prompt, catalogue) if args.candidates == "catalogue" else \
        torch.arange(len(tok))
    say(f"{len(test)} test users, {len(victims)} victims, {len(cands)} candidate tokens, "
        f"{len(known)} known template tokens")

    # ---- the attacker's own data and decoders ----
    owned = A.owned_items(catalogue, test.history)
    histories = A.attacker_histories(owned, args.attacker_prompts, length=10, seed=args.seed)
    states, tokens = A.training_pairs(base, tok, prompt, catalogue, histories, layers, known=known)
    emb = base.get_input_embeddings().weight[cands].detach()
    decoders = {k: A.train_decoder(states[k], tokens, cands, emb, seed=args.seed) for k in layers}
    seen = set(tokens.tolist())
    title_tokens = [t for v in victims for t, o in zip(v.ids, v.owner, strict=True) if o >= 0]
    say(f"attacker: {len(owned)} owned titles, {len(histories)} prompts, {len(tokens)} training positions; "
        f"{np.mean([t in seen for t in title_tokens]):.1%} of the victims' title tokens occur in them, "
        f"{np.mean([t in set(cands.tolist()) for t in title_tokens]):.1%} are candidates")
    del states

    results: dict[tuple[str, str, int], dict[str, float]] = {}

    def record(attack, adapter, k, parts):
        r = sum((x[0] for x in parts), A.Recovery())
        named, items = sum(x[1] for x in parts), sum(x[2] for x in parts)
        results[(attack, adapter, k)] = {"tokens": r.token_share, "titles": r.title_share,
                                         "named": named / items, "n_tokens": r.tokens, "n_titles": r.titles}

    base_views = views(base, tok, victims[:max(1, args.random_victims)], layers)
    for adapter, b_std in (("fresh", 0.0), ("random", args.b_std)):
        model = client_model(b_std, seed=args.seed + 1)
        seen_by_server = views(model, tok, victims, layers)
        if adapter == "random":
            m = len(base_views)
            moved = {k: np.median([float(((w[k] - b[k]).norm(dim=-1) / b[k].norm(dim=-1))[len(known):v.end()]
                                         .median()) for v, w, b in zip(victims[:m], seen_by_server[:m], base_views,
                                                                      strict=True)])
                     for k in layers}
            say("random adapter: median relative change of the states the server sees, per layer: "
                + ", ".join(f"{k}: {m:.3f}" for k, m in moved.items()))
        for k in layers:
            record("learned", adapter, k, [score(v, known, decoders[k].tokens(s[k][len(known):v.end()]), 10, tok,
                                                 catalogue) for v, s in zip(victims, seen_by_server, strict=True)])
        n, titles = (args.whitebox_victims, args.whitebox_titles) if adapter == "fresh" else \
            (args.random_victims, args.random_titles)
        parts: dict[int, list] = {k: [] for k in layers}
        for i, (v, s) in enumerate(zip(victims[:n], seen_by_server[:n], strict=True)):
            t0 = time.perf_counter()
            got = A.whitebox(base, s, known=known, end=v.end(titles), candidates=cands, metric=args.metric)
            for k in layers:
                parts[k].append(score(v, known, got[k], titles, tok, catalogue))
            say(f"white-box, {adapter} adapter, victim {i + 1}/{n}: {v.end(titles) - len(known)} positions in "
                f"{time.perf_counter() - t0:.0f} s")
        for k in layers:
            if parts[k]:
                record("whitebox", adapter, k, parts[k])
        del model

    print(table(results, layers, tail))
    print()
    for (attack, adapter, k), r in sorted(results.items()):
        if k == layers[0]:
            print(f"{attack}, {adapter} adapter: {r['n_tokens']} title tokens, {r['n_titles']} titles per layer")
    plot(results, layers, tail, args.plot,
         f"SmolLM2-135M, ML-100K: history read back from the states the server sees ({args.candidates} candidates)")
    if args.json:
        rows = [{"attack": a, "adapter": w, "layer": k, **r} for (a, w, k), r in sorted(results.items())]
        atomic(args.json, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    say(f"plot: {args.plot}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
