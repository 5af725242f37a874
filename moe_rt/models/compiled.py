"""`compile=True`: the dense glue between a model's layers, a residual add then an RMSNorm, run
through torch.compile; attention and the MoE step (whose shapes depend on routing) stay eager.

One compiled function serves every norm site of every layer (the weight is an argument, so layers
share the graph): the post-attention add + norm, and the next layer's input add + norm, which
takes the MoE output of the layer before (the final norm likewise). Batch sizes: the first shape
compiles a static graph, a second one a graph dynamic in T, and T == 1 (batch-1 decode) its own,
so a run compiles at most three graphs (dynamo's cache limit is 8).

Exactness: inductor fuses the norm's reduction and may sum in another order, so fp32 results move
by a few ulps (greedy tokens equal, logits within 1e-5 relative; tests/moe_rt/test_compile.py).
"""
from __future__ import annotations

import torch

from moe_rt.layers.norm import rms_norm
from moe_rt.models.compiled_decode import OneTokenDecode


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(s, RMSNorm(s)) with s = x + delta."""
    s = x + delta
    return s, rms_norm(s, weight, eps)


def compile_dense(model) -> None:
    """Route `model`'s forward through one compiled add_rms_norm, and its one-token decode steps
    through whole compiled layers where they apply (MoEForCausalLM.forward reads both)."""
    model.glue = torch.compile(add_rms_norm, dynamic=None)
    if OneTokenDecode.supports(model):
        model.decode_one = OneTokenDecode(model)
