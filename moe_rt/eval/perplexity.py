"""Perplexity of a model over a text, and how often two models make the same greedy choice.

The text is tokenized once and cut into non-overlapping windows of at most `window` tokens; when
the tokenizer adds BOS, every window starts with it (as the demo model was trained and
validated: 256-token rows, each starting with <s>), so every token of the text after the first
BOS is predicted exactly once. Without BOS the first token of each window is context only. Each
window is one scoring pass of the engine (ModelRunner.prompt_logits: no KV cache, no sampling).

    perplexity = exp(mean over predicted positions of -log p(token | window prefix))
    greedy agreement(a, b) = fraction of predicted positions where argmax a == argmax b
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_rt.engine.llm_engine import LLMEngine
from moe_rt.errors import MoeRtError


@dataclass(frozen=True)
class TextScore:
    nll_sum: float  # summed -log p over predicted positions (nats, float64)
    tokens: int  # predicted positions
    argmax: torch.Tensor  # [tokens] int64: the model's greedy choice at each predicted position

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens)


def token_windows(ids: list[int], window: int, bos: int | None) -> list[list[int]]:
    """Windows of at most `window` tokens covering ids; each starts with bos when bos is given
    (a leading bos in ids is not repeated). Windows of one token predict nothing and are dropped."""
    if window < 2:
        raise MoeRtError(f"the scoring window must hold at least 2 tokens, got {window}")
    if bos is None:
        body, step = ids, window
    else:
        body, step = (ids[1:] if ids[:1] == [bos] else ids), window - 1
    out = [([bos] if bos is not None else []) + body[i:i + step] for i in range(0, len(body), step)]
    return [w for w in out if len(w) >= 2]


def score_text(engine: LLMEngine, text: str, window: int = 256) -> TextScore:
    """Score `text` in windows of min(window, the engine's context) tokens (`LLM(...).engine`)."""
    tok = engine.tokenizer
    bos = tok.bos_token_id if tok.adds_bos else None
    windows = token_windows(tok.encode(text), min(window, engine.max_model_len), bos)
    if not windows:
        raise MoeRtError("the text has fewer than 2 tokens: nothing to score")
    nll, n, argmax = 0.0, 0, []
    for w in windows:
        logits = engine.runner.prompt_logits(w)[:-1].float()  # [len - 1, V]: position i predicts token i + 1
        target = torch.tensor(w[1:], device=logits.device)
        logp = torch.log_softmax(logits.double(), dim=-1)
        nll -= float(logp.gather(1, target[:, None]).sum())
        n += len(target)
        argmax.append(logits.argmax(dim=-1).cpu())
    return TextScore(nll, n, torch.cat(argmax))


def greedy_agreement(a: TextScore, b: TextScore) -> float:
    """Fraction of positions where the two models' greedy choices agree (same text, same windows)."""
    if a.argmax.shape != b.argmax.shape:
        raise MoeRtError(f"the scores cover different positions ({a.tokens} vs {b.tokens})")
    return float((a.argmax == b.argmax).double().mean())
