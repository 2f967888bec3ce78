"""Speed of the LLM backbones on this machine: tokens/s, achieved GFLOP/s and model FLOPs
utilisation (MFU) against the fp32 matmul peak measured in the same run.

    .venv/bin/python benchmarks/bench_llm.py                       # SmolLM2, batch 8, ~117 tokens
    .venv/bin/python benchmarks/bench_llm.py --profile             # + where a training step's time goes

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


def report(name: str, times: list[float], flops: int, tokens: int, peak: float) -> None:
    med = statistics.median(times)
    gflops = flops / med / 1e9
    print(f"{name:34} {med:7.3f} s  {tokens / med:8.0f} tok/s  {flops / 1e9:8.1f} GFLOP  "
          f"{gflops:6.1f} GFLOP/s  MFU {gflops / peak:5.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action="store_true")
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
    report("train step, ranker (LoRA q,v)", timed(step(ranker.loss), args.reps), count_flops(step(ranker.loss)),
           user_tokens, peak)
    report("train step, bigrec (LoRA q,v)", timed(step(bigrec.loss), args.reps), count_flops(step(bigrec.loss)),
           bigrec_tokens, peak)

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

        run = step(ranker.loss)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        print("\nwhere a ranker training step's time goes (self CPU time):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
