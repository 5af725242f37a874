"""`moe-rt bench decode`: decode tokens/s of moe-rt next to transformers' generate on the same
weights in the same run, and how close each decode step comes to the memory-bandwidth floor
(bytes of weights the step must read / bandwidth measured in this run). With --expert-bits 8,4 (or
a bits plan, 8,PLAN) the same model with quantized experts, with --compile the same model with
compile=True, and with --cuda-graphs (CUDA) the same model replaying decode steps from CUDA graphs,
is timed in the same runs, as a ratio to the plain (full-precision, eager) moe-rt.
With --profile, instead: what a decode step costs in aten ops and host reads, per layer
(bench/profile.py)."""
from __future__ import annotations

import argparse
import sys
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
    p.add_argument("--baselines", default="transformers",
                   help="comma-separated baselines timed in the same run: transformers, llama.cpp (needs the "
                        "optional llama-cpp-python and gguf packages; skipped with one line without them), or none")
    p.add_argument("--no-transformers", action="store_true", help="drop transformers from --baselines")
    p.add_argument("--llama-cpp-defaults", action="store_true",
                   help="run llama.cpp with its own defaults (float16 KV cache, flash attention) instead of "
                        "float32 attention matching the fp32 model")
    p.add_argument("--gguf-dir", default=None,
                   help="where the llama.cpp baseline's GGUF files are written, once per checkpoint "
                        "(default ~/.cache/moe-rt/gguf)")
    p.add_argument("--expert-bits", default="",
                   help="comma-separated 8, 4 and/or a bits-plan YAML: also time moe-rt with experts quantized "
                        "so, interleaved with the full-precision run (columns int8_*, int4_*, plan_*; ratio to "
                        "full precision)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64, help="int4 group size (--expert-bits 4)")
    p.add_argument("--compile", action="store_true",
                   help="also time moe-rt with compile=True, interleaved with the eager run (columns compiled_*; "
                        "ratio to eager); its graphs compile in the warm-up")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA: also time moe-rt with cuda_graphs=True, interleaved with the eager run (columns "
                        "cuda_graphs_*; ratio to eager); its warm-up decodes every shape the timed runs "
                        "reach, so the graphs are captured before timing")
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


def _baselines(args) -> set[str]:
    names = {b.strip() for b in args.baselines.split(",") if b.strip()} - {"none"}
    unknown = names - {"transformers", "llama.cpp"}
    if unknown:
        raise MoeRtError(f"--baselines takes transformers, llama.cpp or none, got '{args.baselines}'")
    return names - ({"transformers"} if args.no_transformers else set())


def greedy_tokens(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from moe_rt import SamplingParams

    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Share of sequences' tokens that agree before their first divergence (greedy decoding of
    the same weights: a divergence is a near-tie rounded differently, after which they differ)."""
    same = total = 0
    for a, b in zip(ours, theirs):
        total += len(a)
        for x, y in zip(a, b):
            if x != y:
                break
            same += 1
    return same / max(total, 1)


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


def gpu_kv_options(model_dir: str, args, batch: int) -> dict:
    """On CUDA, with sides built beside the plain engine: each engine's KV cache sized to the run
    (`batch` sequences of prompt_len + max_tokens, a block spare each) instead of taking what
    gpu_memory_utilization leaves, which the first engine would take whole. {} on the CPU."""
    from moe_rt.config import EngineConfig
    from moe_rt.device import resolve_device, resolve_dtype
    from moe_rt.loader import load_spec

    device = resolve_device(args.device)
    if device.type != "cuda":
        return {}
    spec = load_spec(model_dir)
    block = EngineConfig().kv_block_size
    max_len = args.prompt_len + args.max_tokens
    blocks = batch * (-(-max_len // block) + 1)
    per_token = spec.num_layers * spec.attention.kv_bytes_per_token(resolve_dtype(args.dtype, device).itemsize)
    return {"max_model_len": max_len, "kv_cache_memory_gb": blocks * block * per_token / 2**30}


def run(args) -> int:
    from moe_rt_app.llm import LLM

    baselines = _baselines(args)
    batches = parse_ints(args.batch_sizes, "--batch-sizes")
    if args.max_tokens < 2 or args.prompt_len < 1:
        raise MoeRtError("--max-tokens must be >= 2 and --prompt-len >= 1")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    bits = quantized_sides(args.expert_bits, args.group_size)
    model_dir = resolve_model(args)
    # Sides timed beside the plain engine, by column prefix.
    sides = dict(bits)
    if args.compile:
        sides["compiled"] = dict(compile=True)
    if args.cuda_graphs:
        sides["cuda_graphs"] = dict(cuda_graphs=True)
    common = dict(dtype=args.dtype, device=args.device, progress=False, max_num_seqs=max(batches),
                  **(gpu_kv_options(model_dir, args, max(batches)) if sides else {}))
    llm = LLM(model_dir, **common)
    others = {name: LLM(model_dir, **common, **opts) for name, opts in sides.items()}
    device, dtype = llm.engine.device, llm.engine.dtype
    extra = {
        "model": model_dir, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "torch_threads": torch.get_num_threads(), "prompt_len": args.prompt_len,
    }
    if args.profile:
        return _run_profile({"moe_rt": llm, **others}, batches, args, extra)
    hf = llama = None
    if "llama.cpp" in baselines:
        from . import llama_cpp

        why = llama_cpp.available()
        if why:
            print(why, file=sys.stderr)
        elif device.type != "cpu":
            print("llama.cpp baseline skipped: it runs on the CPU here, and moe-rt on " + str(device), file=sys.stderr)
        else:
            path = llama_cpp.gguf_for(model_dir, args.gguf_dir or llama_cpp.default_cache_dir(),
                                      extra["dtype"] if extra["dtype"] in ("float32", "float16") else "float32",
                                      progress=not args.json)
            llama = llama_cpp.LlamaCppDecoder(path, threads=torch.get_num_threads(), max_batch=max(batches),
                                              max_len=args.prompt_len + args.max_tokens,
                                              exact=not args.llama_cpp_defaults)
            extra["gguf"] = str(path)
    if "transformers" in baselines:
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
        if llama is not None:
            _, theirs_tokens = llama.run(prompts, args.max_tokens)
            llama_agree = agreement(greedy_tokens(llm, prompts, args.max_tokens), theirs_tokens)
        for name, q in others.items():
            # compile=True compiles its graphs for this batch here; cuda_graphs captures one per
            # block-table width, so its warm-up runs as long as the timed runs
            time_moe_rt(q, prompts, args.max_tokens if name == "cuda_graphs" else 4)
        # Interleaved, so every side sees the same machine conditions.
        ours, theirs, lcpp, qtimes = [], [], [], {name: [] for name in others}
        for _ in range(args.repeats):
            ours.append(time_moe_rt(llm, prompts, args.max_tokens))
            if hf is not None:
                theirs.append(time_transformers(hf, prompts, args.max_tokens))
            if llama is not None:
                lcpp.append(llama.run(prompts, args.max_tokens)[0])
            for name, q in others.items():
                qtimes[name].append(time_moe_rt(q, prompts, args.max_tokens))
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
        if llama is not None:
            c = repeat_stats(lcpp)
            row["llama_cpp_tok_s"], row["llama_cpp_tok_s_best"] = tokens / c.median, tokens / c.best
            row["ratio_llama_cpp"] = row["moe_rt_tok_s"] / row["llama_cpp_tok_s"]
            row["ratio_llama_cpp_best"] = row["moe_rt_tok_s_best"] / row["llama_cpp_tok_s_best"]
            row["llama_cpp_agree"] = llama_agree
        for name, times in qtimes.items():
            q = repeat_stats(times)
            row[f"{name}_tok_s"], row[f"{name}_tok_s_best"] = tokens / q.median, tokens / q.best
            row[f"{name}_ratio"] = row[f"{name}_tok_s"] / row["moe_rt_tok_s"]
            row[f"{name}_ratio_best"] = row[f"{name}_tok_s_best"] / row["moe_rt_tok_s_best"]
        floor_ms = 1e3 * step_weight_bytes(llm, prompts) / bandwidth
        row["floor_ms"] = floor_ms
        row["floor_share"] = floor_ms / row["moe_rt_step_ms"]
        rows.append(row)
    extra.update(bandwidth_GBps=round(bandwidth / 1e9, 2), max_tokens=args.max_tokens, repeats=args.repeats)
    if bits:
        extra["expert_group_size"] = args.group_size
    qcols = [f"{name}_{c}" for name in others for c in ("tok_s", "ratio", "tok_s_best", "ratio_best")]
    lcols = ["llama_cpp_tok_s", "ratio_llama_cpp", "llama_cpp_tok_s_best", "ratio_llama_cpp_best", "llama_cpp_agree"]
    if llama is not None:
        llama.close()
    emit(rows, args, ["batch", "moe_rt_tok_s", "hf_tok_s", "ratio", "moe_rt_tok_s_best", "hf_tok_s_best", "ratio_best",
                      *(lcols if llama is not None else []), *qcols, "moe_rt_step_ms", "floor_ms", "floor_share"], extra)
    return 0


def _run_profile(sides: dict, batches: list[int], args, extra: dict) -> int:
    """Profiles of the plain engine and of each side beside it (--compile, --expert-bits, ...)."""
    from .profile import print_profile, profile_decode

    if args.profile_steps < 1:
        raise MoeRtError("--profile-steps must be >= 1")
    llm = sides["moe_rt"]
    vocab = llm.model.spec.vocab_size
    rows = []
    for name, side in sides.items():
        for B in batches:
            prompts = _prompts(B, args.prompt_len, vocab, seed=B)
            # (compile=True compiles its graphs in profile_decode's warm-up steps, before the recording)
            rows.append({"side": name, **profile_decode(side, prompts, args.profile_steps)})
    extra["num_layers"] = llm.model.spec.num_layers
    if args.json:
        emit(rows, args, [], extra)
        return 0
    for k, v in extra.items():
        print(f"{k}: {v}")
    for r in rows:
        if len(sides) > 1:
            print(f"[{r['side']}]", end=" ")
        print_profile(r)
    return 0
