"""Speed of the LLM backbones on this machine: training samples/s, tokens/s, achieved GFLOP/s and
model FLOPs utilisation (MFU) against the fp32 matmul peak measured in the same run.

    .venv/bin/python benchmarks/bench_llm.py                       # SmolLM2: ranker, BIGRec, item-tokens
    .venv/bin/python benchmarks/bench_llm.py --profile bigrec      # + where a training step's time goes

The ranker and BIGRec train LoRA (q, v) on every block with batch 8 of 10-item histories (their
configs' settings); the item-token backbone trains with its demo settings: batch 32 of 20-item
leave-one-out histories, LoRA (q, k, v, o) on the last 4 blocks, the 26 frozen blocks' states taken
from memory (every epoch after the first; the first pays them once, shown as "states not cached").

FLOPs are counted by torch's FlopCounterMode on one real step (matmuls and attention, forward and
backward), so MFU = counted FLOPs / step time / peak. The peak is the best GFLOP/s of square fp32
matmuls (sizes 1024-4096) on the same threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from fellrec.adapters import add_lora
from fellrec.backbones import text
from fellrec.backbones.bigrec import BIGRec
from fellrec.backbones.prompts import Prompt
from fellrec.backbones.ranker import TextRanker
from fellrec.config import LoraConfig, load_config
from fellrec.llm import load_base, model_id
from fellrec.pipeline import prepare


def matmul_peak(reps: int = 5) -> float:
    best = 0.0
    for n in (1024, 2048, 3072, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def report(name: str, times: list[float], flops: int, tokens: int, peak: float, samples: int | None = None) -> float:
    """One line of figures; returns samples/s (0 without ``samples``)."""
    med = statistics.median(times)
    gflops = flops / med / 1e9
    rate = f"{samples / med:7.1f} samples/s" if samples else " " * 17
    print(f"{name:40} {med:7.3f} s {rate} {tokens / med:8.0f} tok/s  {flops / 1e9:8.1f} GFLOP  "
          f"{gflops:6.1f} GFLOP/s  MFU {gflops / peak:5.1%}")
    return samples / med if samples else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", choices=["ranker", "bigrec", "item-tokens"], default=None)
    ap.add_argument("--item-batch", type=int, default=32)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    p = prepare(load_config(None, ["partition.method=attribute", "partition.attribute=gender"]))
    titles = p.dataset.items.title.tolist()
    prompt = Prompt.for_dataset(p.dataset.name)
    tok, base = load_base(args.model)
    model = add_lora(base, LoraConfig(), seed=0)
    key = model_id(args.model)
    ranker = TextRanker(model, tok, titles, prompt, cache_key=key)
    bigrec = BIGRec(model, tok, titles, prompt, cache_key=key)
    ranker.item_table()
    # samples with full 10-item histories, as in training
    full = [i for i, h in enumerate(p.samples.train.history) if len(h) == 10]
    batch = p.samples.train.take(np.asarray(full[:args.batch]))
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}; batch {args.batch}")
    peak = matmul_peak()
    print(f"fp32 matmul peak (same run): {peak:.1f} GFLOP/s\n")

    def step(loss_fn):
        def run():
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(batch).backward()
            optimizer.step()
        return run

    user_texts = [prompt.history([titles[i] for i in h]) for h in batch.history]
    user_tokens = int(text.tokenize(tok, user_texts, 512)["attention_mask"].sum())
    bigrec_tokens = int(bigrec.examples(batch)["attention_mask"].sum())
    print(f"tokens per batch: ranker {user_tokens} ({user_tokens / args.batch:.0f}/sample), "
          f"bigrec {bigrec_tokens} ({bigrec_tokens / args.batch:.0f}/sample)")
    ranker_rate = report("train step, ranker (LoRA q,v)", timed(step(ranker.loss), args.reps),
                         count_flops(step(ranker.loss)), user_tokens, peak, args.batch)
    report("train step, bigrec (LoRA q,v)", timed(step(bigrec.loss), args.reps), count_flops(step(bigrec.loss)),
           bigrec_tokens, peak, args.batch)
    item_rate, item_step = item_tokens_steps(args, peak)
    print(f"\nitem-tokens trains {item_rate / ranker_rate:.1f}x the ranker's samples/s "
          f"(each of its samples is a {ITEM_HISTORY}-item window that predicts at every position)")

    def rank():
        model.eval()
        ranker.rank(batch)

    report("rank batch, ranker (forward)", timed(rank, args.reps), count_flops(rank), user_tokens, peak)
    item_tokens = int(sum(len(x) for x in tok(titles[:256], add_special_tokens=False)["input_ids"]))

    def items():
        with torch.no_grad():
            text.encode(model, tok, titles[:256], max_len=512)

    report("encode 256 titles (forward)", timed(items, max(1, args.reps // 2)), count_flops(items), item_tokens,
           peak)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        run = {"ranker": step(ranker.loss), "bigrec": step(bigrec.loss), "item-tokens": item_step}[args.profile]
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        print(f"\nwhere a {args.profile} training step's time goes (self CPU time):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


ITEM_HISTORY = 20


def item_tokens_steps(args, peak: float):
    """The item-token backbone's training step, with its frozen blocks' states computed (first epoch)
    and taken from memory (later epochs); returns the cached samples/s and the cached step."""
    from fellrec.backbones.item_tokens import ItemTokenRec

    cfg = load_config(None, ["split.method=leave-one-out", f"split.history_len={ITEM_HISTORY}",
                             f"split.train_stride={ITEM_HISTORY}", "partition.method=attribute",
                             "partition.attribute=gender"])
    p = prepare(cfg)
    titles = p.dataset.items.title.tolist()
    tok, base = load_base(args.model)
    model = add_lora(base, LoraConfig(targets=["q_proj", "k_proj", "v_proj", "o_proj"], last_blocks=4,
                                      dropout=0.05), seed=0)
    rec = ItemTokenRec(model, tok, titles, Prompt.for_dataset(p.dataset.name), item_dim=64)
    full = [i for i, h in enumerate(p.samples.train.history) if len(h) == ITEM_HISTORY]
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    tokens = args.item_batch * (ITEM_HISTORY + len(rec.prefix_ids))
    batches = iter(range(0, len(full), args.item_batch))

    def step(fresh: bool):
        def run():
            start = next(batches) if fresh else 0
            batch = p.samples.train.take(np.asarray(full[start:start + args.item_batch]))
            model.train()
            optimizer.zero_grad(set_to_none=True)
            rec.loss(batch).backward()
            optimizer.step()
        return run

    report("train step, item-tokens, states not cached", timed(step(True), args.reps),
           count_flops(step(True)), tokens, peak, args.item_batch)
    cached = step(False)
    rate = report("train step, item-tokens (LoRA q,k,v,o, last 4)", timed(cached, args.reps), count_flops(cached),
                  tokens, peak, args.item_batch)
    return rate, cached


if __name__ == "__main__":
    main()
