"""`moe-rt trace`: run prompts through the engine and record which experts every token used.

All prompts are queued at once and the engine steps until every request is done, so the trace has
the batches continuous batching really forms (prefills admitted between decode steps, finished
sequences leaving). Each forward row is one token: a request contributes prompt + generated - 1
rows (its last sampled token is never fed back), more if the scheduler preempted and recomputed it.

From Python, `record_trace(llm, prompts, params)` does the same on a live engine. The recorder can
also be switched on around any other use of the engine:

    recorder = TraceRecorder(llm.model.hub, len(llm.model.moe_blocks()), with_hidden=False)
    recorder.start()
    llm.generate(prompts, params)   # or engine.step() from a server loop
    recorder.stop()
    trace = recorder.to_trace(trace_meta(llm))
"""
from __future__ import annotations

import argparse
import json
import os

from moe_rt_app.cli.args import float_in, output_file, positive_int, seed
from moe_rt.errors import MoeRtError
from router_predict.recorder import TraceRecorder
from router_predict.trace import Trace, TraceMeta, save_trace


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moe_rt_app.cli.flags import add_model_arguments

    p.add_argument("--prompts", required=True,
                   help="prompt file: one prompt per line, or JSONL (.jsonl, or every line a JSON object) "
                        "with a 'prompt' field")
    p.add_argument("--out", required=True, type=output_file, help="trace file to write (.npz, docs/traces.md)")
    p.add_argument("--max-tokens", type=positive_int, default=32, help="new tokens per prompt at most")
    p.add_argument("--with-hidden", action="store_true",
                   help="also store each MoE layer's router input (float16; needed by gate_lookahead/learned)")
    p.add_argument("--with-layer-output", action="store_true",
                   help="also store the residual stream leaving each MoE layer's decoder layer "
                        "(float16; needed by gate_lookahead_output)")
    p.add_argument("--max-num-seqs", type=positive_int, help="sequences decoded together at most (engine default if unset)")
    p.add_argument("--temperature", type=float_in(0, 2), default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed (prompt i uses seed + i)")
    add_model_arguments(p)


def read_prompts(path: str) -> list[str]:
    """Prompts from a text file (one per non-blank line) or JSONL with a 'prompt' field per line."""
    if not os.path.isfile(path):
        raise MoeRtError(f"prompts file {path}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise MoeRtError(f"prompts file {path} is empty")
    if path.endswith(".jsonl") or all(_is_json_object(text) for _, text in lines):
        prompts = []
        for n, text in lines:
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise MoeRtError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            prompt = row.get("prompt") if isinstance(row, dict) else None
            if not isinstance(prompt, str) or not prompt:
                raise MoeRtError(f"{path}:{n}: needs a non-empty string field 'prompt'")
            prompts.append(prompt)
        return prompts
    return [text for _, text in lines]


def _is_json_object(text: str) -> bool:
    if not text.startswith("{"):
        return False
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def trace_meta(llm, **extra) -> TraceMeta:
    """Meta of a trace recorded from `llm`: experts, top-k, MoE layer ids, model folder, dtype."""
    spec = llm.model.spec
    return TraceMeta(num_experts=spec.num_experts, top_k=spec.top_k, layer_ids=tuple(spec.moe_layer_ids),
                     model=str(llm.config.model),
                     extra={"architecture": spec.architecture, "dtype": str(llm.engine.dtype).replace("torch.", ""),
                            **extra})


def record_trace(llm, prompts: list[str | list[int]], params, with_hidden: bool = False,
                 progress: bool = False, with_layer_output: bool = False) -> Trace:
    """Run `prompts` with continuous batching while a TraceRecorder listens; return the trace.

    params: one SamplingParams or one per prompt. Requests other callers already queued in the
    engine are recorded too (their rows share the batches; generate drives the engine, so their
    outputs are not kept). Nothing stays subscribed afterwards.
    """
    if not prompts:
        raise MoeRtError("record_trace needs at least one prompt")
    if llm.model.moe_ctx.dynamic_topk is not None:  # the trace format has no dropped (-1) choice
        raise MoeRtError("traces are recorded with dynamic top-k off (dynamic_topk_threshold 0, top_p 1)")
    recorder = TraceRecorder(llm.model.hub, len(llm.model.moe_blocks()), with_hidden, model=llm.model,
                             with_layer_output=with_layer_output)
    recorder.start()
    try:
        outs = llm.generate(prompts, params, use_tqdm=progress)  # leaves no request behind, even on an error
    finally:
        recorder.stop()
    prompt_tokens = sum(len(o.prompt_token_ids) * len(o.outputs) for o in outs)
    generated = sum(len(c.token_ids) for o in outs for c in o.outputs)
    first = params[0] if isinstance(params, list) else params
    return recorder.to_trace(trace_meta(llm, num_prompts=len(prompts), prompt_tokens=prompt_tokens,
                                        generated_tokens=generated, max_tokens=first.max_tokens,
                                        temperature=first.temperature))


def run(args: argparse.Namespace) -> int:
    from moe_rt_app.cli.flags import build_llm
    from moe_rt.sampling_params import SamplingParams

    prompts = read_prompts(args.prompts)  # before loading the model: bad input fails fast
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed + i)
              for i in range(len(prompts))]
    llm = build_llm(args)
    trace = record_trace(llm, prompts, params, with_hidden=args.with_hidden, progress=True,
                         with_layer_output=args.with_layer_output)
    save_trace(args.out, trace)
    seqs = len(set(trace.seq_ids.tolist()))
    steps = len(set(trace.steps.tolist()))
    print(f"wrote {args.out}: {trace.num_rows} rows from {seqs} sequences in {steps} forward steps, "
          f"{trace.num_layers} MoE layers x {trace.num_experts} experts (top-{trace.top_k})"
          f"{', with hidden' if trace.hidden is not None else ''}"
          f"{', with layer output' if trace.layer_output is not None else ''}")
    return 0
