"""What the engine hands out: per-step deltas (StepOutput, StepResult) and final outputs
(RequestOutput of CompletionOutputs), plain data with no engine state behind them."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the `logprobs` most likely alternatives (token id -> logprob)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (eos, stop token or string), "length", "abort", "error"
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None  # with finish_reason "error": what went wrong for this request


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def error(self) -> str | None:
        """The first completion's error, if the request failed (all its completions then end in "error")."""
        return next((o.error for o in self.outputs if o.error is not None), None)

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    @property
    def failed(self) -> bool:
        """The engine could not serve it (its sampling or postprocessing raised); not bad input."""
        return any(o.finish_reason == "error" for o in self.outputs)


@dataclass
class StepOutput:
    """What one sequence produced in one step (for streaming)."""

    request_id: str
    index: int  # which of the request's n completions
    new_token_ids: list[int]
    new_text: str  # stop strings held back until they cannot match
    finish_reason: str | None  # "stop", "length", "abort" or "error"
    error: str | None = None  # with finish_reason "error": the message for this request's client
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for logprobs


@dataclass
class StepResult:
    """One engine step: the deltas of every sequence it touched, and the final output of every
    request whose last sequence finished in it (the engine no longer holds those)."""

    outputs: list[StepOutput] = field(default_factory=list)
    finished: list[RequestOutput] = field(default_factory=list)
