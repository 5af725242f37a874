"""Per-request sampling options (the vLLM/OpenAI set), validated on construction.

Every number is checked here, once, so no request can reach the engine with a value that makes
sampling raise (NaN, infinities, seeds a torch generator refuses). Token ids in logit_bias are
checked against the model's vocabulary when the engine admits the request.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from moe_rt.errors import MoeRtError

# Below this temperature a request is greedy: dividing logits by less overflows float32 (vLLM uses
# the same cut-off).
MIN_TEMPERATURE = 1e-5
# torch generators take 64-bit seeds; the n completions use seed, seed+1, ..., seed+n-1.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
RESPONSE_FORMATS = ("text", "json_object")


def _real(name: str, v, ok: Callable[[float], bool], what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
        raise MoeRtError(f"{name} must be {what}, got {v!r}")


def _int(name: str, v, ok: Callable[[int], bool], what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not ok(v):
        raise MoeRtError(f"{name} must be {what}, got {v!r}")


def _token_id(key) -> int:
    """A logit_bias key: an int or, as OpenAI's JSON sends them, a decimal string."""
    if isinstance(key, str):
        try:
            key = int(key)
        except ValueError:
            pass  # reported below
    _int("logit_bias keys", key, lambda k: k >= 0, "token ids (integers >= 0)")
    return key


@dataclass
class SamplingParams:
    """Per-request options. The sampler applies them in this order: logit_bias, the repetition,
    presence and frequency penalties, then (unless greedy) temperature, top-k, top-p and min-p.
    Reported logprobs are always the model's own, before any of these."""

    max_tokens: int = 16  # new tokens to generate at most
    temperature: float = 1.0  # >= 0; below MIN_TEMPERATURE (0 included) = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 or -1 = no top-k cut
    seed: int | None = None  # per-request seed; the n samples use seed, seed+1, ... (all within int64)
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1  # completions per prompt
    logprobs: int | None = None  # return the chosen token's logprob and this many top alternatives
    # in [0, 1]: drop tokens whose probability is below min_p times the top token's (after temperature)
    min_p: float = 0.0
    # > 0; for every token in the prompt or the output so far, a positive logit is divided by it and
    # a negative one multiplied (Hugging Face / vLLM); 1 = off
    repetition_penalty: float = 1.0
    # in [-2, 2] (OpenAI): logit -= presence_penalty * (count > 0) + frequency_penalty * count, where
    # count is how often the token occurs in the output so far
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # token id -> bias in [-100, 100], added to the logits before everything else (+100 all but
    # forces a token, -100 all but bans it); string keys (OpenAI JSON) are read as ids
    logit_bias: dict[int, float] = field(default_factory=dict)
    # "text", or "json_object": the output is constrained to one JSON object (then EOS)
    response_format: str = "text"

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _int("max_tokens", self.max_tokens, lambda v: v >= 1, "a positive integer")
        _real("temperature", self.temperature, lambda v: v >= 0, "a finite number >= 0")
        _real("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        _int("top_k", self.top_k, lambda v: v >= -1, "-1, 0 or positive")
        _real("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1]")
        _real("repetition_penalty", self.repetition_penalty, lambda v: v > 0, "a finite number > 0")
        _real("presence_penalty", self.presence_penalty, lambda v: -2 <= v <= 2, "in [-2, 2]")
        _real("frequency_penalty", self.frequency_penalty, lambda v: -2 <= v <= 2, "in [-2, 2]")
        _int("n", self.n, lambda v: v >= 1, ">= 1")
        if self.logprobs is not None:
            _int("logprobs", self.logprobs, lambda v: 0 <= v <= 20, "between 0 and 20")
        if self.seed is not None:
            _int("seed", self.seed, lambda v: SEED_MIN <= v and v + self.n - 1 <= SEED_MAX,
                 f"an integer in [{SEED_MIN}, {SEED_MAX} - (n - 1)] (the n samples use seed, seed+1, ...)")
        if any(not s for s in self.stop):
            raise MoeRtError("stop strings must be non-empty")
        if not isinstance(self.logit_bias, dict):
            raise MoeRtError("logit_bias must map token ids to biases")
        bias = {}
        for key, value in self.logit_bias.items():
            tid = _token_id(key)
            _real(f"logit_bias[{tid}]", value, lambda v: -100 <= v <= 100, "a number in [-100, 100]")
            bias[tid] = float(value)
        self.logit_bias = bias
        if self.response_format not in RESPONSE_FORMATS:
            raise MoeRtError(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {self.response_format!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalised(self) -> bool:
        """Whether the logits need changing before the choice (bias or any penalty)."""
        return bool(self.logit_bias) or self.repetition_penalty != 1.0 or bool(self.presence_penalty) \
            or bool(self.frequency_penalty)
