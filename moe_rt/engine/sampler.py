"""Token sampling for a batch: greedy rows take the argmax; the rest apply temperature, top-k and
top-p and draw with their own generator when the request has a seed (so a seeded request gives
the same tokens whatever else is in the batch)."""
from __future__ import annotations

import torch

from moe_rt.outputs import TokenLogprob

from .sequence import Sequence


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] float32 -> temperature-scaled logits with -inf outside the top-k / top-p set."""
    x = logits / temperature
    if top_k > 0 and top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = probs.cumsum(-1) - probs > top_p
        x = x.clone()
        x[order[drop]] = float("-inf")
    return x


def sample(logits: torch.Tensor, seqs: list[Sequence], default_gen: torch.Generator) -> list[int]:
    """logits [B, V] -> one token per sequence."""
    logits = logits.float()
    out = logits.argmax(dim=-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        probs = filter_logits(logits[i], p.temperature, p.top_k, p.top_p).softmax(-1)
        out[i] = int(torch.multinomial(probs, 1, generator=seq.generator or default_gen))
    return out


def token_logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
    """Model logprobs (before temperature and filtering) of the chosen tokens and top alternatives."""
    res: list[TokenLogprob | None] = [None] * len(seqs)
    if all(s.params.logprobs is None for s in seqs):
        return res
    lp = torch.log_softmax(logits.float(), dim=-1)
    for i, seq in enumerate(seqs):
        n = seq.params.logprobs
        if n is None:
            continue
        top = lp[i].topk(n) if n > 0 else None
        alts = dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {}
        res[i] = TokenLogprob(tokens[i], float(lp[i, tokens[i]]), alts)
    return res
