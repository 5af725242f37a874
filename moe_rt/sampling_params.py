"""Per-request sampling options (the vLLM/OpenAI set), validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field

from moe_rt.errors import MoeRtError


@dataclass
class SamplingParams:
    max_tokens: int = 16  # new tokens to generate at most
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 or -1 = no top-k cut
    seed: int | None = None  # per-request seed; the n samples use seed, seed+1, ...
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1  # completions per prompt
    logprobs: int | None = None  # return the chosen token's logprob and this many top alternatives

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise MoeRtError(f"max_tokens must be a positive integer, got {self.max_tokens}")
        if self.temperature < 0:
            raise MoeRtError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MoeRtError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise MoeRtError(f"top_k must be -1, 0 or positive, got {self.top_k}")
        if self.n < 1:
            raise MoeRtError(f"n must be >= 1, got {self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise MoeRtError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if any(not s for s in self.stop):
            raise MoeRtError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
