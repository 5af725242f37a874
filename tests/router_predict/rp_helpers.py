"""Small synthetic traces for the router_predict tests (kept tiny: the CI box has 2 shared cores)."""
from __future__ import annotations

import numpy as np

from router_predict.trace import Trace, TraceMeta


def make_trace(topk_ids: np.ndarray, num_experts: int, *, seq_ids=None, steps=None, positions=None,
               hidden: np.ndarray | None = None, token_ids=None, weights=None,
               layer_output: np.ndarray | None = None) -> Trace:
    """topk_ids: [N, L, k]. Defaults: one sequence, one row per step, positions 0..N-1."""
    ids = np.asarray(topk_ids, dtype=np.int32)
    n, num_layers, k = ids.shape
    as64 = (lambda a, d: np.asarray(d if a is None else a, dtype=np.int64))
    w = np.full(ids.shape, 1.0 / k, np.float32) if weights is None else np.asarray(weights, np.float32)
    return Trace(
        topk_ids=ids, topk_weights=w,
        seq_ids=as64(seq_ids, np.zeros(n)), positions=as64(positions, np.arange(n)),
        steps=as64(steps, np.arange(n)),
        meta=TraceMeta(num_experts=num_experts, top_k=k, layer_ids=tuple(range(num_layers)),
                       model="synthetic"),
        hidden=None if hidden is None else np.asarray(hidden, np.float16),
        token_ids=None if token_ids is None else np.asarray(token_ids, np.int64),
        layer_output=None if layer_output is None else np.asarray(layer_output, np.float16),
    )


def perm_chain_trace(n: int, num_layers: int, num_experts: int, k: int, seed: int = 0,
                     num_seqs: int = 4) -> tuple[Trace, np.ndarray]:
    """Layer l+1 experts = perm(layer l experts), layer 0 uniform at random. Returns (trace, perm)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_experts)
    ids = np.zeros((n, num_layers, k), np.int64)
    for i in range(n):
        ids[i, 0] = rng.choice(num_experts, size=k, replace=False)
    for layer in range(1, num_layers):
        ids[:, layer] = perm[ids[:, layer - 1]]
    seq = np.arange(n) % num_seqs
    return make_trace(ids, num_experts, seq_ids=seq, steps=np.arange(n) // num_seqs,
                      positions=np.arange(n) // num_seqs), perm


def zero_residual_checkpoint(folder, zero=("o_proj.weight", ".w2.weight"), shared_router=True):
    """A tiny 3-layer Mixtral (tests/checkpoints.py) with the weights whose names end in `zero`
    zeroed: by default attention and experts add nothing, so the residual stream is the same at
    every layer. shared_router: layers 1, 2 get layer 0's router. The router norms keep their own
    random weights, so layers route differently even with one router."""
    import torch
    from safetensors.torch import load_file, save_file

    from checkpoints import write_checkpoint

    write_checkpoint(folder, "mixtral", num_hidden_layers=3)
    path = folder / "model.safetensors"
    w = load_file(str(path))
    for name in list(w):
        if name.endswith(tuple(zero)):
            w[name] = torch.zeros_like(w[name])
    if shared_router:
        for i in (1, 2):
            w[f"model.layers.{i}.block_sparse_moe.gate.weight"] = w["model.layers.0.block_sparse_moe.gate.weight"].clone()
    save_file(w, str(path), metadata={"format": "pt"})
    return folder
