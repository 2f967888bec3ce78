"""What flexible storage saves the client: SmolLM2 + LoRA cut at k, client and server in two processes.

    .venv/bin/python benchmarks/bench_split.py                  # k in unsplit, 2, 4, 8, 16; batch 8
    .venv/bin/python benchmarks/bench_split.py --ks 8 --steps 2

For each k the server process loads the model, keeps only the trunk (blocks [k, 29)) and answers
over a pipe; the client process keeps the embeddings, blocks [0, k), block 29, the norm and the LM
head, and drops the trunk blocks before measuring. Per k it prints: the parameters the client
holds, its resident memory before the steps and its peak during them (Linux VmHWM, reset just
before the steps), the client's compute time per step (wall time minus waiting for the server),
the server's time per step, and the bytes each way per step and per round of 4 steps (the demo's
local_steps). BIGRec's loss on a fixed batch of 8 real ML-100K samples; one torch thread in each
process, so the two sides do not compete for the 2 cores.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import multiprocessing as mp
import statistics
import time

import numpy as np
import torch

from fellrec.adapters import add_lora
from fellrec.backbones.bigrec import BIGRec
from fellrec.backbones.prompts import Prompt
from fellrec.config import LoraConfig, load_config
from fellrec.llm import SMOLLM2, load_base
from fellrec.pipeline import prepare
from fellrec.storage.decoder import SplitDecoder
from fellrec.storage.parts import cut
from fellrec.storage.transport import Message, Server, decode, encode
from fellrec.storage.trunk import TrunkServer


class PipeTransport:
    """Carries messages over a ``multiprocessing`` connection to a server in another process
    (``serve``), counting bytes and the time spent waiting for replies."""

    def __init__(self, conn):
        self.conn = conn
        self.bytes_up = self.bytes_down = self.messages = 0
        self.wait_s = 0.0

    def send(self, message: Message) -> Message:
        up = encode(message)
        started = time.perf_counter()
        self.conn.send_bytes(up)
        down = self.conn.recv_bytes()
        self.wait_s += time.perf_counter() - started
        self.bytes_up += len(up)
        self.bytes_down += len(down)
        self.messages += 1
        return decode(down)

    def close(self) -> None:
        self.conn.send_bytes(encode(Message("stop", "", 0)))
        self.conn.close()


def serve(conn, server: Server) -> None:
    """Answer messages from ``conn`` with ``server`` until a ``stop`` message."""
    while True:
        message = decode(conn.recv_bytes())
        if message.kind == "stop":
            return
        conn.send_bytes(encode(server.handle(message)))


def lora_model():
    tok, base = load_base(SMOLLM2)
    return tok, add_lora(base, LoraConfig(), seed=0)


def server_main(conn, k: int) -> None:
    torch.set_num_threads(1)
    _, model = lora_model()
    _, trunk = cut(model, k)
    server = TrunkServer(trunk, make_optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4))
    serve(conn, server)


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident size


def drop_trunk(model, k: int) -> None:
    layers = model.get_base_model().model.layers
    for i in range(k, len(layers) - 1):
        layers[i] = torch.nn.Identity()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed weights back to the OS


def measure(k: int | None, batch, titles, steps: int) -> dict:
    tok, model = lora_model()
    bigrec = BIGRec(model, tok, titles, Prompt.for_dataset("ml-100k"))
    transport, proc = None, None
    if k is not None:
        ctx = mp.get_context("spawn")
        here, there = ctx.Pipe()
        proc = ctx.Process(target=server_main, args=(there, k))
        proc.start()
        client, _ = cut(model, k)
        drop_trunk(model, k)
        transport = PipeTransport(here)
        decoder = SplitDecoder(client, transport, client="bench")

        class Split:  # what text.hidden / text.lm_head look for
            fellrec_split = True

        split = Split()
        split.decoder, split.client = decoder, client
        split.parameters = client.parameters
        bigrec.model = split
        params = list(client.parameters())
        trainable = [p for p in params if p.requires_grad]
    else:
        params = list(model.parameters())
        trainable = [p for p in params if p.requires_grad]
    held = sum(p.numel() for p in {id(p): p for p in params}.values())
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    gc.collect()
    before = rss_mb()
    reset_peak()
    times, waits = [], []
    for _ in range(steps):
        wait0 = transport.wait_s if transport else 0.0
        started = time.perf_counter()
        loss = bigrec.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if transport is not None:
            decoder.step()
        times.append(time.perf_counter() - started)
        waits.append((transport.wait_s if transport else 0.0) - wait0)
    peak = rss_mb("VmHWM")
    out = {"k": "unsplit" if k is None else k, "client_params_m": held / 1e6, "rss_before_mb": before,
           "peak_mb": peak, "client_s": statistics.median(t - w for t, w in zip(times, waits, strict=True)),
           "server_s": statistics.median(waits), "up": transport.bytes_up / steps if transport else 0,
           "down": transport.bytes_down / steps if transport else 0}
    if transport is not None:
        transport.close()
        proc.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="unsplit,2,4,8,16")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--plot", default="docs/plots/split_costs.png", help="where the plot goes ('' for none)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    p = prepare(load_config(None, ["partition.method=attribute", "partition.attribute=gender"]))
    titles = p.dataset.items.title.tolist()
    batch = p.samples.train.take(np.arange(8) * 997)
    print(f"{'k':>8} {'client params':>14} {'RSS before':>11} {'peak in step':>13} {'client s/step':>14} "
          f"{'server s/step':>14} {'up/step':>10} {'down/step':>10} {'up+down/round':>14}")
    rows = []
    for k in args.ks.split(","):
        r = measure(None if k == "unsplit" else int(k), batch, titles, args.steps)
        rows.append(r)
        print(f"{r['k']!s:>8} {r['client_params_m']:>12.1f} M {r['rss_before_mb']:>8.0f} MB {r['peak_mb']:>10.0f} MB "
              f"{r['client_s']:>14.2f} {r['server_s']:>14.2f} {r['up'] / 1e6:>7.2f} MB {r['down'] / 1e6:>7.2f} MB "
              f"{4 * (r['up'] + r['down']) / 1e6:>11.1f} MB", flush=True)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")


def plot(rows: list[dict], path: str) -> None:
    """Client peak memory and client/server time per step against k, the unsplit model as a line."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    whole = next((r for r in rows if r["k"] == "unsplit"), None)
    split = [r for r in rows if r["k"] != "unsplit"]
    ks = [r["k"] for r in split]
    fig, (mem, tim) = plt.subplots(1, 2, figsize=(9, 3.4))
    mem.plot(ks, [r["peak_mb"] for r in split], "o-", label="client, split at k")
    mem.set(xlabel="k (blocks before the cut)", ylabel="peak resident memory (MB)", title="client memory in a step")
    tim.plot(ks, [r["client_s"] for r in split], "o-", label="client compute")
    tim.plot(ks, [r["server_s"] for r in split], "s--", label="server (trunk) + transfer")
    tim.set(xlabel="k (blocks before the cut)", ylabel="seconds per step", title="time per training step")
    if whole is not None:
        mem.axhline(whole["peak_mb"], color="grey", ls=":", label="unsplit model")
        tim.axhline(whole["client_s"], color="grey", ls=":", label="unsplit model")
    for ax in (mem, tim):
        ax.set_xticks(ks)
        ax.legend(fontsize=8)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
