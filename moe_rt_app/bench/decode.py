"""`moe-rt bench decode`: decode tokens/s of moe-rt next to transformers' generate on the same
weights in the same run, and how close each decode step comes to the memory-bandwidth floor
(bytes of weights the step must read / bandwidth measured in this run). With --expert-bits 8,4 (or
a bits plan, 8,PLAN) the same model with quantized experts is timed in the same runs, as a ratio to
the full-precision moe-rt. With --profile, instead: what a decode step costs in aten ops and host reads, per layer
(bench/profile.py)."""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from moe_rt.errors import MoeRtError

from .common import (add_model_choice, add_repeats, add_torch_threads, emit, measure_bandwidth, parse_ints,
                     repeat_stats, resolve_model)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_choice(p)
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per sequence (>= 2)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    add_repeats(p, 3)
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--expert-bits", default="",
                   help="comma-separated 8, 4 and/or a bits-plan YAML: also time moe-rt with experts quantized "
                        "so, interleaved with the full-precision run (columns int8_*, int4_*, plan_*; ratio to "
                        "full precision)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64, help="int4 group size (--expert-bits 4)")
    add_torch_threads(p, where=", both sides")
    p.add_argument("--profile", action="store_true",
                   help="instead of timing, profile moe-rt's decode steps: aten ops and host reads per layer "
                        "and per step, top ops by self time (see moe_rt_app/bench/profile.py)")
    p.add_argument("--profile-steps", type=int, default=16, help="decode steps recorded per batch size with --profile")


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


def run_prefills(eng, rids: list[str]) -> None:
    """Step until every request's prompt has run (its prefill step samples its first token)."""
    prefilled: set[str] = set()
    while len(prefilled) < len(rids) and eng.has_unfinished():
        res = eng.step()
        prefilled.update(o.request_id for o in res.outputs if o.new_token_ids)


def time_moe_rt(llm, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds spent in decode steps (prefill excluded) to generate max_tokens for every prompt."""
    from moe_rt import SamplingParams

    eng = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    rids = [eng.add_request(p, params) for p in prompts]
    run_prefills(eng, rids)
    t = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    return time.perf_counter() - t  # every request finished, so the engine holds none of them


def time_transformers(hf, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds of transformers' generate between the first and the last sampled token: the
    max_tokens-1 decode forwards, prefill excluded (stamped by a logits processor per step)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                          max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                          logits_processor=LogitsProcessorList([Stamp()]))
    assert out.shape[1] == ids.shape[1] + max_tokens and len(stamps) == max_tokens
    return stamps[-1] - stamps[0]


def step_weight_bytes(llm, prompts: list[list[int]]) -> float:
    """Mean bytes of weights one decode step reads: every dense weight plus each distinct expert
    the batch routes to, counted from the router events of a real (untimed) run."""
    from moe_rt import SamplingParams

    model, spec = llm.model, llm.model.spec
    esize = next(model.parameters()).element_size()
    dense = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) * esize
    if spec.tie_word_embeddings:
        dense += model.lm_head.weight.numel() * esize
    per_expert = spec.bytes_per_expert(esize)
    B = len(prompts)
    touched: list[int] = []

    def count(ev):
        if ev.topk_ids.shape[0] == B and ev.batch is not None and ev.batch.positions.min() >= len(prompts[0]):
            touched.append(int(ev.topk_ids.unique().numel()))

    off = model.hub.subscribe(count)
    try:
        llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    finally:
        off()
    L = len(spec.moe_layer_ids)
    return dense + per_expert * L * (sum(touched) / max(len(touched), 1))


def quantized_sides(text: str, group_size: int) -> dict[str, dict]:
    """--expert-bits "8,4,plan.yaml" -> {"int8": LLM options, "int4": ..., "plan": ...}."""
    sides: dict[str, dict] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item in ("8", "4"):
            sides[f"int{item}"] = {"expert_bits": int(item), "expert_group_size": group_size}
        elif item.isdigit() or "plan" in sides:
            raise MoeRtError(f"--expert-bits takes 8, 4 and at most one bits-plan file, got '{text}'")
        else:
            sides["plan"] = {"expert_bits_plan": item, "expert_group_size": group_size}
    return sides


def run(args) -> int:
    from moe_rt_app.llm import LLM

    batches = parse_ints(args.batch_sizes, "--batch-sizes")
    if args.max_tokens < 2 or args.prompt_len < 1:
        raise MoeRtError("--max-tokens must be >= 2 and --prompt-len >= 1")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    bits = quantized_sides(args.expert_bits, args.group_size)
    model_dir = resolve_model(args)
    llm = LLM(model_dir, dtype=args.dtype, device=args.device, progress=False, max_num_seqs=max(batches))
    quantized = {b: LLM(model_dir, dtype=args.dtype, device=args.device, progress=False, max_num_seqs=max(batches),
                        **opts) for b, opts in bits.items()}
    device, dtype = llm.engine.device, llm.engine.dtype
    extra = {
        "model": model_dir, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "torch_threads": torch.get_num_threads(), "prompt_len": args.prompt_len,
    }
    if args.profile:
        return _run_profile(llm, batches, args, extra)
    hf = None
    if not args.no_transformers:
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise MoeRtError("the transformers baseline needs transformers (pip install -e '.[test]')") from None
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    bandwidth = measure_bandwidth(device)
    vocab = llm.model.spec.vocab_size
    rows = []
    for B in tqdm(batches, desc="bench decode", disable=args.json):
        prompts = _prompts(B, args.prompt_len, vocab, seed=B)
        time_moe_rt(llm, prompts, 4)  # warm-up
        if hf is not None:
            time_transformers(hf, prompts, 4)
        for q in quantized.values():
            time_moe_rt(q, prompts, 4)
        # Interleaved, so every side sees the same machine conditions.
        ours, theirs, qtimes = [], [], {b: [] for b in quantized}
        for _ in range(args.repeats):
            ours.append(time_moe_rt(llm, prompts, args.max_tokens))
            if hf is not None:
                theirs.append(time_transformers(hf, prompts, args.max_tokens))
            for b, q in quantized.items():
                qtimes[b].append(time_moe_rt(q, prompts, args.max_tokens))
        steps = args.max_tokens - 1
        tokens = B * steps
        t = repeat_stats(ours)
        row = {"batch": B, "moe_rt_tok_s": tokens / t.median, "moe_rt_tok_s_best": tokens / t.best,
               "moe_rt_step_ms": 1e3 * t.median / steps}
        if hf is not None:
            h = repeat_stats(theirs)
            row["hf_tok_s"], row["hf_tok_s_best"] = tokens / h.median, tokens / h.best
            row["ratio"] = row["moe_rt_tok_s"] / row["hf_tok_s"]
            row["ratio_best"] = row["moe_rt_tok_s_best"] / row["hf_tok_s_best"]
        for b, times in qtimes.items():
            q = repeat_stats(times)
            row[f"{b}_tok_s"], row[f"{b}_tok_s_best"] = tokens / q.median, tokens / q.best
            row[f"{b}_ratio"] = row[f"{b}_tok_s"] / row["moe_rt_tok_s"]
            row[f"{b}_ratio_best"] = row[f"{b}_tok_s_best"] / row["moe_rt_tok_s_best"]
        floor_ms = 1e3 * step_weight_bytes(llm, prompts) / bandwidth
        row["floor_ms"] = floor_ms
        row["floor_share"] = floor_ms / row["moe_rt_step_ms"]
        rows.append(row)
    extra.update(bandwidth_GBps=round(bandwidth / 1e9, 2), max_tokens=args.max_tokens, repeats=args.repeats)
    if bits:
        extra["expert_group_size"] = args.group_size
    qcols = [f"{b}_{c}" for b in bits for c in ("tok_s", "ratio", "tok_s_best", "ratio_best")]
    emit(rows, args, ["batch", "moe_rt_tok_s", "hf_tok_s", "ratio", "moe_rt_tok_s_best", "hf_tok_s_best", "ratio_best",
                      *qcols, "moe_rt_step_ms", "floor_ms", "floor_share"], extra)
    return 0


def _run_profile(llm, batches: list[int], args, extra: dict) -> int:
    from .profile import print_profile, profile_decode

    if args.profile_steps < 1:
        raise MoeRtError("--profile-steps must be >= 1")
    vocab = llm.model.spec.vocab_size
    rows = [profile_decode(llm, _prompts(B, args.prompt_len, vocab, seed=B), args.profile_steps) for B in batches]
    extra["num_layers"] = llm.model.spec.num_layers
    if args.json:
        emit(rows, args, [], extra)
        return 0
    for k, v in extra.items():
        print(f"{k}: {v}")
    for r in rows:
        print_profile(r)
    return 0
