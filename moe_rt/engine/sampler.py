"""Token sampling for a batch.

Each row goes through, in this order: logit_bias, then the repetition, presence and frequency
penalties, then, unless it is greedy, temperature, top-k, top-p and min-p, and a draw. Greedy rows
take the argmax of the (penalised) logits; a batch that uses none of these costs one batched argmax.
A draw uses the request's own generator when it has a seed, so a seeded request gives the same
tokens whatever else is in the batch. The uniforms come from CPU generators and pick a token by
inverse CDF on the logits' device, so seeds work the same on every device.

Rows with a JSON guide choose by ordered rejection (`_guided`). A row whose choice fails comes back
as its exception, so the engine can end that one request and keep the batch going.
"""
from __future__ import annotations

import torch

from moe_rt.errors import MoeRtError
from moe_rt.outputs import TokenLogprob

from .sequence import Sequence

MAX_REDRAWS = 8  # guided sampling: draws refused by the guide before walking the ranked vocabulary


def _sanitise(x: torch.Tensor) -> torch.Tensor:
    """Finite logits: an overflowing penalty or temperature must not turn a row into NaNs."""
    big = torch.finfo(x.dtype).max
    return torch.nan_to_num(x, nan=-big, posinf=big, neginf=-big)


def _ids(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs of every token in `rows`, as two index tensors."""
    r = [i for i, toks in enumerate(rows) for _ in toks]
    t = [tok for toks in rows for tok in toks]
    return torch.tensor(r, dtype=torch.long, device=device), torch.tensor(t, dtype=torch.long, device=device)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [R, V] of `seqs` -> a copy with each row's logit_bias added, then its repetition penalty
    over prompt + output tokens (positive logits divided, negative multiplied) and its presence and
    frequency penalties over output tokens (logit -= presence * (count > 0) + frequency * count)."""
    x = logits.clone()
    dev = x.device
    bias = [(i, t, b) for i, s in enumerate(seqs) for t, b in s.params.logit_bias.items()]
    if bias:
        rows, toks, vals = zip(*bias)
        idx = (torch.tensor(rows, device=dev), torch.tensor(toks, device=dev))
        x.index_put_(idx, torch.tensor(vals, dtype=x.dtype, device=dev), accumulate=True)
    rep = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if rep:
        seen = torch.zeros(len(rep), x.shape[1], dtype=torch.bool, device=dev)
        seen[_ids([seqs[i].token_ids for i in rep], dev)] = True
        r = torch.tensor([seqs[i].params.repetition_penalty for i in rep], dtype=x.dtype, device=dev)[:, None]
        sub = x[rep]
        x[rep] = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
    pf = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
    if pf:
        counts = torch.zeros(len(pf), x.shape[1], dtype=x.dtype, device=dev)
        idx = _ids([seqs[i].output_token_ids for i in pf], dev)
        counts.index_put_(idx, torch.ones(len(idx[0]), dtype=x.dtype, device=dev), accumulate=True)
        pres = torch.tensor([seqs[i].params.presence_penalty for i in pf], dtype=x.dtype, device=dev)[:, None]
        freq = torch.tensor([seqs[i].params.frequency_penalty for i in pf], dtype=x.dtype, device=dev)[:, None]
        x[pf] -= freq * counts + pres * (counts > 0)
    return _sanitise(x)


def filter_logits_batch(
    x: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float], min_p: list[float]
) -> torch.Tensor:
    """x [R, V] -> temperature-scaled logits with -inf outside each row's top-k, top-p and min-p sets
    (the Hugging Face warpers' rules, ties at the top-k edge kept). The best token always survives."""
    R, V = x.shape
    col = lambda v: torch.tensor(v, dtype=x.dtype, device=x.device)[:, None]  # noqa: E731
    x = _sanitise(x / col(temperature))
    if any(0 < k < V for k in top_k):
        k = torch.tensor([k if 0 < k < V else V for k in top_k], device=x.device)
        kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        x = x.masked_fill(x < kth, float("-inf"))
    if any(p < 1.0 for p in top_p):
        # the smallest set whose mass reaches top_p: drop the low tail that holds at most 1 - top_p
        asc, order = x.sort(dim=-1)
        drop = asc.softmax(-1).cumsum(-1) <= col([1.0 - p for p in top_p])
        drop[:, -1] = False
        x = x.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if any(m > 0.0 for m in min_p):
        probs = x.softmax(-1)
        x = x.masked_fill(probs < col(min_p) * probs.amax(-1, keepdim=True), float("-inf"))
    return x


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """One row: logits [V] -> filtered logits [V] (see filter_logits_batch)."""
    return filter_logits_batch(logits[None], [temperature], [top_k], [top_p], [min_p])[0]


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [R, V] (unnormalised, >= 0), u [R] uniforms in [0, 1) -> one token per row by inverse
    CDF. A zero-probability token is never chosen."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    idx = torch.searchsorted(cdf, u.to(cdf.device, torch.float64)[:, None] * total, right=True)
    last = (cdf < total).sum(-1, keepdim=True)  # the last token with mass, for u * total rounding up to total
    return torch.minimum(idx, last).squeeze(1)


def _uniform(seq: Sequence, default_gen: torch.Generator) -> torch.Tensor:
    return torch.rand(1, dtype=torch.float64, generator=seq.generator or default_gen)


def _guided(seq: Sequence, x: torch.Tensor, probs: torch.Tensor | None, default_gen: torch.Generator,
            eos_ids: set[int]) -> int:
    """The token of a row whose output a guide constrains. x [V]: penalised logits; probs [V]: the
    filtered distribution, or None when greedy. Greedy takes the best token the guide allows;
    sampling draws and, on a refusal, zeroes that token and draws again (a draw from the distribution
    restricted to allowed tokens), then walks the ranking after MAX_REDRAWS refusals."""
    guide = seq.guide
    token = None
    if guide.complete:
        # the object is closed: only whitespace or EOS may follow, so end now (even with ignore_eos)
        ends = [e for e in eos_ids if guide.allows(e)]
        token = max(ends, key=lambda e: float(x[e])) if ends else None
    if token is None and probs is not None:
        probs = probs.clone()
        for _ in range(MAX_REDRAWS):
            if not bool(probs.sum() > 0):
                break
            t = int(draw(probs[None], _uniform(seq, default_gen)))
            if guide.allows(t):
                token = t
                break
            probs[t] = 0
    if token is None:
        token = next((t for t in x.argsort(descending=True).tolist() if guide.allows(t)), None)
        if token is None:
            raise MoeRtError("no token can continue the JSON output")
    guide.advance(token)
    return token


def sample(logits: torch.Tensor, seqs: list[Sequence], default_gen: torch.Generator,
           eos_ids: set[int] = frozenset()) -> list[int | Exception]:
    """logits [B, V] -> one token per sequence, or the exception raised while choosing it."""
    logits = logits if logits.dtype == torch.float32 else logits.float()  # .float() dispatches even when float
    try:
        return _sample(logits, seqs, default_gen, eos_ids)
    except Exception as e:
        if len(seqs) == 1:
            return [e]
        # A batched stage failed before any row drew: redo the rows one by one so only the culprit fails.
        return [sample(logits[i : i + 1], [s], default_gen, eos_ids)[0] for i, s in enumerate(seqs)]


def _sample(logits: torch.Tensor, seqs: list[Sequence], default_gen: torch.Generator,
            eos_ids: set[int]) -> list[int | Exception]:
    x = logits
    pen = [i for i, s in enumerate(seqs) if s.params.penalised]
    if pen:
        x = logits.clone()
        x[pen] = apply_penalties(logits[pen], [seqs[i] for i in pen])
    out: list[int | Exception] = x.argmax(dim=-1).tolist()
    rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    probs: dict[int, torch.Tensor] = {}
    if rows:
        ps = [seqs[i].params for i in rows]
        filtered = filter_logits_batch(x[rows], [p.temperature for p in ps], [p.top_k for p in ps],
                                       [p.top_p for p in ps], [p.min_p for p in ps])
        p_rows = filtered.softmax(-1)
        probs = dict(zip(rows, p_rows))
        free = [j for j, i in enumerate(rows) if seqs[i].guide is None]
        if free:
            u = torch.cat([_uniform(seqs[rows[j]], default_gen) for j in free])
            for j, t in zip(free, draw(p_rows[free], u).tolist()):
                out[rows[j]] = t
    for i, seq in enumerate(seqs):
        if seq.guide is not None:
            try:
                out[i] = _guided(seq, x[i], probs.get(i), default_gen, eos_ids)
            except Exception as e:  # this row alone fails
                out[i] = e
    return out


def token_logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list) -> list[TokenLogprob | None]:
    """Model logprobs of the chosen tokens and top alternatives: the raw distribution, before
    logit_bias, penalties, temperature and filtering (rows whose choice failed get None)."""
    res: list[TokenLogprob | None] = [None] * len(seqs)
    if all(s.params.logprobs is None for s in seqs):
        return res
    lp = torch.log_softmax(logits.float(), dim=-1)
    for i, seq in enumerate(seqs):
        n = seq.params.logprobs
        if n is None or not isinstance(tokens[i], int):
            continue
        top = lp[i].topk(n) if n > 0 else None
        alts = dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {}
        res[i] = TokenLogprob(tokens[i], float(lp[i, tokens[i]]), alts)
    return res
