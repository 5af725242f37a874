"""The engine: a thin loop over named parts.

    step() = schedule -> run (model forward) -> sample -> postprocess

Requests enter with add_request and leave when finished or aborted; the running batch changes
between steps (continuous batching). step() returns what each touched sequence produced and the
final outputs of the requests that finished in it, which leave the engine there (the one
finished-request rule, see core.py). LLMEngine implements EngineCore.
"""
from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Callable

import torch

from moe_rt.checkpoint import read_config, read_json
from moe_rt.config import EngineConfig, ModelConfig
from moe_rt.device import resolve_device, resolve_dtype
from moe_rt.errors import MoeRtError
from moe_rt.layers.moe.compute import get_expert_compute
from moe_rt.layers.moe.routing import DynamicTopK
from moe_rt.loader import load_model
from moe_rt.models.compiled_decode import CompiledDecode
from moe_rt.outputs import CompletionOutput, RequestOutput, StepOutput, StepResult
from moe_rt.sampling_params import SamplingParams
from moe_rt.tokenizer import IncrementalDetokenizer, Tokenizer

from .block_manager import BlockManager
from .kv_budget import kv_cache_bytes
from .decode_policy import make_decode_policy
from .core import CoreStats
from .cuda_graphs import GraphShapes
from .model_runner import ModelRunner
from .sampler import sample, token_logprobs
from .scheduler import Scheduler
from .sequence import Sequence, Status

log = logging.getLogger(__name__)


class LLMEngine:
    """The core engine: model, KV cache, scheduler, sampler. What is built on it (an expert cache,
    an online predictor, expert parallelism) is installed by moe_rt_app/assemble.py after
    construction and registered with `attach`, which exports its stats and closes it with the
    engine."""

    def __init__(self, model: ModelConfig, engine: EngineConfig, *, load_experts: bool = True,
                 reserve_bytes: int = 0, progress: bool = True) -> None:
        """reserve_bytes: device memory the parts installed after construction will take (an expert
        cache's slots); a CUDA engine sizes its KV cache around it (engine/kv_budget.py)."""
        self.device = resolve_device(model.device)
        if engine.cuda_graphs and self.device.type != "cuda":
            raise MoeRtError("cuda_graphs captures decode steps on a CUDA device; this engine runs on "
                             f"{self.device.type}")
        self.dtype = resolve_dtype(model.dtype, self.device)
        read_config(model.model)  # a missing or broken folder is reported before anything else
        self.tokenizer = Tokenizer(model.model)
        # load_experts=False: routed experts stay in the checkpoint for an expert store to fetch.
        self.model, self.reader = load_model(
            model.model, self.dtype, self.device, load_experts=load_experts, progress=progress,
            expert_bits=engine.expert_bits, expert_group_size=engine.expert_group_size,
            expert_bits_plan=engine.expert_bits_plan,
        )
        self.spec = self.model.spec
        # name -> callable returning a JSON-able dict; the cache, predictor and expert parallelism
        # register here (attach) and the server exports the union (GET /v1/moe/stats, /metrics).
        self.stat_sources: dict[str, Callable[[], dict]] = {}
        self._closers: list[tuple[str, Callable[[], None]]] = []
        self.model.moe_ctx.compute = get_expert_compute(engine.expert_compute, self.spec.num_experts)
        if engine.compile:
            self.model.compiled_decode = CompiledDecode(self.model)
        self.eos_ids = self._eos_ids(model.model)
        ec = engine
        per_token = self.spec.attention.kv_bytes_per_token(self.dtype.itemsize)  # MLA: its latent row only
        bytes_per_block = self.spec.num_layers * ec.kv_block_size * per_token
        context = ec.max_model_len or self.spec.max_position_embeddings
        most = ec.max_num_seqs * -(-context // ec.kv_block_size) * bytes_per_block
        budget = kv_cache_bytes(ec, self.device, reserve_bytes, most_bytes=most)
        budget_gb = ec.kv_cache_memory_gb if ec.kv_cache_memory_gb is not None else f"{budget / 2**30:.4g}"
        num_blocks = int(budget // bytes_per_block)
        capacity = num_blocks * ec.kv_block_size
        if capacity < 2:  # a prompt token and one generated token at least
            raise MoeRtError(
                f"the KV cache budget of {budget_gb} GB holds {capacity} tokens "
                f"({bytes_per_block} bytes per block of {ec.kv_block_size}); raise kv_cache_memory_gb"
            )
        max_len = ec.max_model_len or min(self.spec.max_position_embeddings, capacity)
        if max_len > self.spec.max_position_embeddings:
            raise MoeRtError(f"max_model_len={max_len} exceeds the model's {self.spec.max_position_embeddings} positions")
        if max_len > capacity:
            raise MoeRtError(
                f"the KV cache budget of {budget_gb} GB holds {capacity} tokens, fewer than "
                f"max_model_len={max_len}; raise kv_cache_memory_gb or lower max_model_len"
            )
        self.max_model_len = max_len
        self.blocks = BlockManager(num_blocks, ec.kv_block_size)
        policy = make_decode_policy(ec, self.model.moe_ctx, self.spec)
        self.scheduler = Scheduler(ec, self.blocks, policy)
        if ec.scheduler_policy != "fcfs":  # fcfs has nothing to report or stop
            self.attach("scheduler", policy.stats, policy.close)
        self.model.moe_ctx.dynamic_topk = DynamicTopK.from_config(ec.dynamic_topk_threshold, ec.dynamic_topk_top_p)
        if self.model.moe_ctx.dynamic_topk is not None:
            self.attach("routing", self.model.moe_ctx.dynamic_topk.stats)
        graphs = GraphShapes.for_engine(ec.max_num_seqs, max_len, ec.kv_block_size) if ec.cuda_graphs else None
        self.runner = ModelRunner(self.model, num_blocks, ec.kv_block_size, self.dtype, self.device, graphs)
        if self.runner.graphs is not None:
            self.attach("cuda_graphs", self.runner.graphs.stats)
        self.generator = torch.Generator().manual_seed(ec.seed)
        self._seq_counter = itertools.count()
        self._req_counter = itertools.count()
        self.requests: dict[str, list[Sequence]] = {}  # unfinished requests only (see step)
        self.last_batch_size = 0
        self.num_steps = 0

    def attach(self, name: str, stats: Callable[[], dict] | None = None,
               close: Callable[[], None] | None = None) -> None:
        """Register a part installed on this engine: its stats join moe_stats() under `name`, and
        close() stops it and drops its stats (in reverse order of attachment: the last installed
        stops first)."""
        if stats is not None:
            self.stat_sources[name] = stats
        self._closers.append((name, close))

    def _eos_ids(self, model_dir: str) -> set[int]:
        ids = set(self.spec.eos_token_ids)
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file():
            eos = read_json(gen).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # -- requests -------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(not isinstance(i, int) or not 0 <= i < self.spec.vocab_size for i in ids):
                raise MoeRtError(f"prompt token ids must be integers in [0, {self.spec.vocab_size})")
        if not ids:
            raise MoeRtError("the prompt is empty")
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None) -> str:
        params = params or SamplingParams()
        ids = self.encode_prompt(prompt)
        if len(ids) + 1 > self.max_model_len:
            raise MoeRtError(f"the prompt has {len(ids)} tokens; the context holds {self.max_model_len}")
        rid = request_id or f"req-{next(self._req_counter)}"
        if rid in self.requests:
            raise MoeRtError(f"request id {rid} is already in use")
        bad = [t for t in params.logit_bias if t >= self.spec.vocab_size]
        if bad:
            raise MoeRtError(f"logit_bias names token id {bad[0]}, outside the vocabulary [0, {self.spec.vocab_size})")
        seqs = []  # built in full before any is queued: a failing add leaves nothing behind
        for i in range(params.n):
            # SamplingParams keeps seed + n - 1 within int64, which torch generators accept.
            gen = torch.Generator().manual_seed(params.seed + i) if params.seed is not None else None
            seq = Sequence(next(self._seq_counter), rid, i, ids, params, gen)
            seq.detok = IncrementalDetokenizer(self.tokenizer)
            if params.response_format == "json_object":
                from .json_guide import JsonObjectGuide

                seq.guide = JsonObjectGuide(self.tokenizer, self.eos_ids)
            seqs.append(seq)
        for seq in seqs:
            self.scheduler.add(seq)
        self.requests[rid] = seqs
        return rid

    def abort(self, request_id: str) -> bool:
        """End a request, free its KV blocks and forget it. False if the engine does not hold it
        (unknown, or finished and already returned by step)."""
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        return True

    def close(self) -> None:
        """Stop every attached part (the expert cache's transfer thread, a predictor's
        subscription); idempotent."""
        while self._closers:
            name, close = self._closers.pop()
            self.stat_sources.pop(name, None)
            if close is not None:
                close()

    def moe_stats(self) -> dict:
        """MoE figures of every registered source (cache, predictor, expert parallelism)."""
        return {name: fn() for name, fn in self.stat_sources.items()}

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    def stats(self) -> CoreStats:
        return CoreStats(
            running_seqs=len(self.scheduler.running),
            waiting_seqs=len(self.scheduler.waiting),
            active_requests=frozenset(self.requests),
            last_batch_size=self.last_batch_size,
            num_steps=self.num_steps,
            num_preemptions=self.scheduler.num_preemptions,
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_free=self.blocks.num_free,
        )

    def _finish_requests(self, outs: list[StepOutput]) -> StepResult:
        """The finished-request rule (the only place it is written): a request whose every
        sequence has finished leaves the engine, and this step's result carries its final output."""
        ended = dict.fromkeys(o.request_id for o in outs if o.finish_reason is not None)  # ordered set
        finished = [self._release(rid) for rid in ended if all(s.finished for s in self.requests[rid])]
        return StepResult(outs, finished)

    def _release(self, request_id: str) -> RequestOutput:
        seqs = self.requests.pop(request_id)
        return RequestOutput(
            request_id,
            seqs[0].prompt_token_ids,
            [CompletionOutput(s.index, s.text, s.output_token_ids, s.finish_reason, s.logprobs, s.error) for s in seqs],
        )

    # -- the loop -------------------------------------------------------------------------------
    def step(self) -> StepResult:
        prefill, decode = self.scheduler.schedule()
        seqs = prefill + decode
        if not seqs:
            return StepResult()
        self.last_batch_size = len(seqs)
        self.num_steps += 1
        # run: one forward. Forecast and prefetch happen inside it, per MoE layer, because the
        # forecast for layer l+1 needs layer l's routing: route -> observe -> forecast -> prefetch
        # -> prepare -> compute -> combine (MoEBlock.forward; the contract is in
        # moe_rt/layers/moe/events.py). The step's BatchInfo is scoped to this forward (ModelRunner.run).
        # A failing forward is the whole batch's, not one request's: it propagates (engine failure).
        logits = self.runner.run(prefill, decode)
        # From here on work is per sequence: one that fails ends its request with finish_reason
        # "error" and the rest of the batch goes on.
        tokens = sample(logits, seqs, self.generator, self.eos_ids)
        logprobs = token_logprobs(logits, seqs, tokens)
        outs: dict[Sequence, StepOutput] = {}
        for seq, token, lp in zip(seqs, tokens, logprobs):
            if seq.finished:
                continue  # a sibling failed earlier in this step
            try:
                if isinstance(token, Exception):
                    raise token
                outs[seq] = self._postprocess(seq, token, lp)
            except Exception as e:
                self._fail_request(seq, e, outs)
        return self._finish_requests(list(outs.values()))

    def _fail_request(self, seq: Sequence, exc: Exception, outs: dict[Sequence, StepOutput]) -> None:
        """End `seq` and its request's other unfinished sequences with finish_reason "error", freeing
        their KV blocks; their step outputs (new or already made this step) carry the message."""
        log.error("request %s failed; ending it with an error", seq.request_id, exc_info=exc)
        msg = str(exc) if isinstance(exc, MoeRtError) else f"{type(exc).__name__}: {exc}"
        for s in self.requests[seq.request_id]:
            if s.finished and s is not seq:
                continue  # it ended before, normally
            s.finish_reason, s.error = "error", msg
            self.scheduler.finish(s)
            out = outs.setdefault(s, StepOutput(s.request_id, s.index, [], "", None))
            out.finish_reason, out.error = "error", msg

    def _postprocess(self, seq: Sequence, token: int, logprob) -> StepOutput:
        p = seq.params
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        out = seq.output_token_ids
        reason = None
        # A guided (JSON) output cannot go on past EOS, so ignore_eos does not apply to it.
        if (token in self.eos_ids and (not p.ignore_eos or seq.guide is not None)) or token in p.stop_token_ids:
            reason = "stop"
        if reason is None:
            seq.text += seq.detok.step(out)
            if p.stop:
                # Search only where a stop string could newly end.
                start = max(0, seq.emitted - max(len(s) for s in p.stop))
                hits = [i for s in p.stop if (i := seq.text.find(s, start)) >= 0]
                if hits:
                    seq.text = seq.text[: min(hits)]
                    reason = "stop"
        if reason is None and (len(out) >= p.max_tokens or len(seq) >= self.max_model_len):
            reason = "length"
        # While a stop string could still be completing, its first characters are held back so a
        # stream never shows text that is later cut.
        hold = 0 if reason is not None or not p.stop else max(len(s) for s in p.stop) - 1
        end = max(seq.emitted, len(seq.text) - hold)
        delta = seq.text[seq.emitted : end]
        seq.emitted = end
        if reason is not None:
            seq.finish_reason = reason
            self.scheduler.finish(seq)
        return StepOutput(seq.request_id, seq.index, [token], delta, reason,
                          logprobs=None if logprob is None else [logprob])
