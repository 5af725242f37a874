"""The Python runtime API:

    from moe_rt_app import LLM, SamplingParams
    llm = LLM()                                   # the shipped demo model
    llm = LLM(model="path/to/hf-folder", dtype="float32", device="cpu", max_num_seqs=16)
    outs = llm.generate(["In the beginning"], SamplingParams(max_tokens=32, temperature=0))
    for piece in llm.stream("And God said", SamplingParams(max_tokens=20)): print(piece, end="")
"""
from __future__ import annotations

from pathlib import Path
from typing import Generator

import torch
from tqdm import tqdm

from moe_rt.checkpoint import default_model_dir
from moe_rt_app.assemble import build_engine
from moe_rt_app.config import RuntimeConfig, build_config
from moe_rt.engine.warm_up import warm_up
from moe_rt.errors import MoeRtError
from moe_rt.outputs import RequestOutput
from moe_rt.sampling_params import SamplingParams



Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | Path | None = None, *, progress: bool = True, **options) -> None:
        """options: dtype, device, placement (or config: a YAML file of config sections), any
        EngineConfig field by name (max_num_seqs, ...), and sections as objects or mappings
        (cache={...}, predictor={...} or predictor="NAME"); see moe_rt_app/config.py."""
        config = build_config(model=str(model) if model is not None else default_model_dir(), **options)
        self._start(config, progress)

    @classmethod
    def from_config(cls, config: RuntimeConfig, *, progress: bool = True) -> "LLM":
        """The LLM a validated config tree describes (the CLI builds one from flags and file)."""
        llm = cls.__new__(cls)
        llm._start(config, progress)
        return llm

    def _start(self, config: RuntimeConfig, progress: bool) -> None:
        self.config, self._progress = config, progress
        built = build_engine(config, progress=progress)
        self.engine = built.engine
        self.expert_cache, self.online_predictor = built.expert_cache, built.online_predictor

    def warm_up(self) -> list[int]:
        """With compile=True, compile every decode graph now (a few greedy tokens at one batch size
        per graph; moe_rt/engine/warm_up.py) rather than in the first requests; the engine is left
        as it was. Returns the batch sizes stepped through (none when nothing compiles). Call it
        before adding requests, as `moe-rt serve` does."""
        return warm_up(self.engine, progress=self._progress)

    def close(self) -> None:
        self.engine.close()  # stops every part installed on the engine
        self.expert_cache = self.online_predictor = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model(self):
        return self.engine.model

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in prompt order. Token-id prompts are lists of ints."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if isinstance(params, list) and len(params) != len(prompts):
            raise MoeRtError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids: list[str] = []
        done: dict[str, RequestOutput] = {}
        try:
            for p, sp in zip(prompts, plist):
                ids.append(self.engine.add_request(p, sp))
            with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm) as bar:
                while len(done) < len(ids) and self.engine.has_unfinished():
                    for out in self.engine.step().finished:
                        done[out.request_id] = out
                        bar.update(1)
        finally:
            for rid in ids:  # on an exception, leave no request behind in the engine
                self.engine.abort(rid)
        return [done[rid] for rid in ids]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Generator[str, None, RequestOutput]:
        """Yield text pieces of one completion as they are generated (n must be 1). The generator
        returns the finished RequestOutput (StopIteration.value, or `out = yield from ...`)."""
        params = params or SamplingParams()
        if params.n != 1:
            raise MoeRtError("stream() takes n=1")
        rid = self.engine.add_request(prompt, params)
        try:
            while self.engine.has_unfinished():
                step = self.engine.step()
                for out in step.outputs:
                    if out.request_id == rid and out.new_text:
                        yield out.new_text
                for final in step.finished:
                    if final.request_id == rid:
                        return final
            raise MoeRtError(f"request {rid} left the engine unfinished")  # aborted by someone else
        finally:
            self.engine.abort(rid)  # a no-op once it finished

    def chat(
        self, messages: list[dict] | list[list[dict]], params: SamplingParams | None = None
    ) -> RequestOutput | list[RequestOutput]:
        """Apply the model's chat template (with the assistant prompt) and generate. The prompt
        starts with BOS exactly when `generate` would add one (Tokenizer.encode_chat)."""
        many = bool(messages) and isinstance(messages[0], list)
        convs = messages if many else [messages]
        outs = self.generate([self.tokenizer.encode_chat(c) for c in convs], params)
        return outs if many else outs[0]

    def prompt_logits(self, token_ids: list[int] | str) -> torch.Tensor:
        """Logits [len, vocab] (float32) of every prompt position; for scoring and parity checks."""
        ids = self.engine.encode_prompt(token_ids)
        if len(ids) > self.engine.max_model_len:
            raise MoeRtError(f"{len(ids)} tokens exceed the context of {self.engine.max_model_len}")
        return self.engine.runner.prompt_logits(ids).float()
