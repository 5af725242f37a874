"""One sequence being generated: a prompt plus the tokens sampled so far."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from moe_rt.outputs import TokenLogprob
from moe_rt.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to recompute
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None  # per-request seed
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""  # detokenized output so far (stop strings cut off)
    emitted: int = 0  # characters of text already streamed
    logprobs: list[TokenLogprob] | None = None
    detok: object = None  # IncrementalDetokenizer
    guide: object = None  # JsonObjectGuide when response_format is "json_object"; the sampler advances it
    error: str | None = None  # why the sequence finished with finish_reason "error"

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED
