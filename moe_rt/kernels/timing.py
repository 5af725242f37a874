"""GPU timing and synthetic routing shared by the tuner and the kernel benchmark.

Shape legend as in moe_rt/layers/moe/reference.py (T tokens, E experts, K choices, D, I).
"""
from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100 50 MB, H200 60 MB)


def cuda_time_ms(fn: Callable[[], object], *, warmup: int = 5, iters: int = 20,
                 flush_l2: bool = True, reduce: Callable[[list[float]], Any] = statistics.median) -> Any:
    """Median milliseconds of fn() on the current CUDA stream, timed with CUDA events (`reduce`
    turns the iters timings into the result; the benchmark passes its median-and-fastest rule).

    With flush_l2 a 256 MB buffer is overwritten before each timed call (outside the events), so
    small expert sets are read from HBM as they would be in a real forward pass, where the other
    layers' weights evict them between uses.
    """
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if flush_l2 else None
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return reduce(times)


def cuda_graph_time_ms(fn: Callable[[], object], *, warmup: int = 5, iters: int = 20,
                       flush_l2: bool = True, reduce: Callable[[list[float]], Any] = statistics.median) -> Any:
    """As cuda_time_ms, but fn is captured once in a CUDA graph and each timed call is a replay.

    This is how a serving engine runs a decode step (vLLM and SGLang capture the forward), so the
    host's per-launch overhead drops out and what is left is the GPU's own time. fn must be
    capturable: no host syncs, no allocations that change between calls.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up off the default stream, as capture wants
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time_ms(graph.replay, warmup=warmup, iters=iters, flush_l2=flush_l2, reduce=reduce)


def measure_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """Device memory bandwidth in GB/s from a large device-to-device copy (read + write bytes)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, iters=10, flush_l2=False)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def random_routing(num_tokens: int, num_experts: int, top_k: int, device: torch.device | str,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router-like choices: top-k of random logits (K distinct experts), softmax weights over them.

    Returns topk_ids [T, K] int64 and topk_weights [T, K] fp32.
    """
    logits = torch.randn(num_tokens, num_experts, generator=generator).to(device)
    values, ids = logits.topk(top_k, dim=-1)
    return ids, torch.softmax(values, dim=-1)


def random_expert_weights(num_experts: int, hidden: int, inter: int, dtype: torch.dtype,
                          device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, D] and w2 [E, D, I], scaled so activations stay O(1)."""
    w13 = torch.randn(num_experts, 2 * inter, hidden, dtype=dtype, device=device) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, dtype=dtype, device=device) / inter**0.5
    return w13, w2
