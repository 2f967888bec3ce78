"""Beam search for a split model: the client's blocks keep their key/value cache here, the trunk's
stays on the server (one session per ``generate`` call), and only the new token's hidden state at
the cut goes up at each step.

The search is the usual one (log-probabilities summed, a finished hypothesis scored by its sum
divided by its length, ``num_beams`` kept), written out because transformers' ``generate`` drives
a whole model in one process. ``beam_search`` takes any ``step(ids, mask, positions, beam_idx)``,
so the same search runs the whole model (``whole_model_step``) for comparison.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import DynamicCache

from fellrec.storage.transport import Message

Step = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


@torch.no_grad()
def beam_search(step: Step, input_ids: Tensor, attention_mask: Tensor, *, num_beams: int, max_new_tokens: int,
                eos_token_id: int) -> list[list[int]]:
    """The best continuation (token ids, without EOS) of each left-padded prompt."""
    b = input_ids.shape[0]
    n = num_beams
    ids = input_ids.repeat_interleave(n, 0)
    mask = attention_mask.repeat_interleave(n, 0)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    scores = torch.full((b, n), -float("inf"), dtype=torch.float64)
    scores[:, 0] = 0.0  # at the start every beam is the same: take the first
    tokens = torch.zeros((b * n, 0), dtype=torch.long)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    done = [False] * b
    logits = step(ids, mask, pos, None)
    for length in range(1, max_new_tokens + 1):
        logp = torch.log_softmax(logits.to(torch.float64), dim=-1)  # [b*n, V]
        vocab = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(b, n * vocab)
        top, idx = cand.topk(2 * n, dim=1)
        keep_beam = torch.zeros((b, n), dtype=torch.long)
        keep_token = torch.full((b, n), eos_token_id, dtype=torch.long)
        new_scores = torch.full((b, n), -float("inf"), dtype=torch.float64)
        for i in range(b):
            if done[i]:
                continue
            k = 0
            for s, j in zip(top[i].tolist(), idx[i].tolist(), strict=True):
                beam, token = divmod(j, vocab)
                if token == eos_token_id:
                    finished[i].append((s / length, tokens[i * n + beam].tolist()))
                    continue
                keep_beam[i, k], keep_token[i, k], new_scores[i, k] = beam, token, s
                k += 1
                if k == n:
                    break
            finished[i].sort(key=lambda h: -h[0])
            del finished[i][n:]
            best_running = new_scores[i].max().item() / length
            if len(finished[i]) == n and finished[i][-1][0] >= best_running:
                done[i] = True
        if all(done):
            break
        beam_idx = (torch.arange(b).unsqueeze(1) * n + keep_beam).reshape(-1)
        tokens = torch.cat([tokens[beam_idx], keep_token.reshape(-1, 1)], dim=1)
        scores = new_scores
        mask = torch.cat([mask[beam_idx], torch.ones((b * n, 1), dtype=mask.dtype)], dim=1)
        pos = pos[beam_idx][:, -1:] + 1
        if length < max_new_tokens:
            logits = step(keep_token.reshape(-1, 1), mask, pos, beam_idx)
    out = []
    for i in range(b):
        hyps = finished[i] or [(scores[i, j].item() / max(1, tokens.shape[1]), tokens[i * n + j].tolist())
                               for j in range(n)]
        if not done[i]:  # ran out of length: the running beams count as finished
            hyps += [(scores[i, j].item() / max(1, tokens.shape[1]), tokens[i * n + j].tolist()) for j in range(n)]
        out.append(max(hyps, key=lambda h: h[0])[1])
    return out


def whole_model_step(model) -> Step:
    """``step`` for a whole (unsplit) causal LM with one key/value cache."""
    cache = DynamicCache(config=model.config)

    def step(ids: Tensor, mask: Tensor, pos: Tensor, beam_idx: Tensor | None) -> Tensor:
        if beam_idx is not None:
            cache.reorder_cache(beam_idx)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
        return out.logits[:, -1]

    return step


def split_model_step(split) -> tuple[Step, Callable[[], None]]:
    """``step`` for a ``SplitLM``: the head and tail cache here, the trunk's on the server."""
    part, transport, client = split.client, split.transport, split.decoder.client
    cache = DynamicCache(config=part.config)
    session = torch.tensor(next(split.decoder.sessions))
    requests = split.decoder.requests

    def step(ids: Tensor, mask: Tensor, pos: Tensor, beam_idx: Tensor | None) -> Tensor:
        if beam_idx is not None:
            cache.reorder_cache(beam_idx)
            transport.send(Message("reorder", client, next(requests), {"session": session, "beam_idx": beam_idx}))
        h = part.run_head(ids, mask, pos, cache)
        reply = transport.send(Message("decode", client, next(requests), {
            "session": session, "hidden": h, "attention_mask": mask, "position_ids": pos}))
        h = part.run_tail(reply.tensors["hidden"], mask, pos, cache)
        return part.lm_head(h[:, -1])

    def release() -> None:
        transport.send(Message("release", client, next(requests), {"session": session}))

    return step, release
