"""Helpers shared by predictors: multi-hot targets and trace → tensor conversion.

Shape legend: N rows, L MoE layers, k experts per token, E routed experts.
"""
from __future__ import annotations

import numpy as np
import torch


def multi_hot(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """ids: [..., k] int → [..., E] float32 with 1.0 at every chosen expert."""
    out = torch.zeros(*ids.shape[:-1], num_experts, dtype=torch.float32)
    return out.scatter_(-1, ids.long(), 1.0)


def trace_ids(topk_ids: np.ndarray) -> torch.Tensor:
    """Trace topk_ids [N, L, k] int32 → torch int64 (indexing wants int64)."""
    return torch.from_numpy(np.ascontiguousarray(topk_ids)).long()


def prev_tokens(seq_ids: np.ndarray, positions: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """[N] previous token of each row's sequence (the row at position-1), -1 where there is none.

    Rows are in execution order, so the previous token of a sequence is always an earlier row; a
    sequence re-using a seq id from position 0 starts fresh because position-1 matches nothing then.
    """
    out = np.full(len(token_ids), -1, dtype=np.int64)
    last: dict[tuple[int, int], int] = {}
    for n, (s, p, t) in enumerate(zip(seq_ids.tolist(), positions.tolist(), token_ids.tolist())):
        out[n] = last.get((s, p - 1), -1)
        last[(s, p)] = t
    return out
