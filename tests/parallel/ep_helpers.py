"""Tiny routing traces for the expert-parallel tests, written with plain numpy."""
from __future__ import annotations

import json

import numpy as np

# Layer 0 groups, and the layer-1 group each one is always followed by.
GROUPS_L0 = [(0, 5), (1, 4), (2, 7), (3, 6)]
GROUPS_L1 = [(3, 6), (0, 2), (1, 7), (4, 5)]


def planted_ids(tokens: int = 64) -> np.ndarray:
    """[T, 2, 2] int32: token i uses GROUPS_L0[i % 4] then GROUPS_L1[i % 4] (equal expert loads)."""
    g = np.arange(tokens) % 4
    return np.array([[GROUPS_L0[i], GROUPS_L1[i]] for i in g], dtype=np.int32)


def write_trace(path, topk_ids: np.ndarray, num_experts: int, seqs: int = 4,
                hidden: int | None = None) -> str:
    """Write a valid .npz trace: `seqs` sequences of consecutive rows, 8 rows per step."""
    n, num_layers, k = topk_ids.shape
    seq_ids = np.arange(n) * seqs // n
    arrays = {
        "topk_ids": topk_ids.astype(np.int32),
        "topk_weights": np.full((n, num_layers, k), 1.0 / k, dtype=np.float32),
        "seq_ids": seq_ids.astype(np.int64),
        "positions": (np.arange(n) - np.searchsorted(seq_ids, seq_ids)).astype(np.int64),
        "steps": (np.arange(n) // 8).astype(np.int64),
        "meta": np.array(json.dumps({"num_experts": num_experts, "top_k": k,
                                     "layer_ids": list(range(num_layers)), "model": "tiny"})),
    }
    if hidden is not None:
        arrays["hidden"] = np.zeros((n, num_layers, hidden), dtype=np.float16)
    np.savez(path, **arrays)
    return str(path)
