"""`compile=True`: decode steps of a few tokens as whole compiled layers (compiled_decode.py)
where the model's attention allows; for a model whose layers cannot be compiled whole (MLA), the
dense glue between its layers, a residual add then an RMSNorm, run through torch.compile, with
attention and the MoE step (whose shapes depend on routing) eager.

The glue is not added beside the whole layers: on the steps those leave eager (prefill, decode
batches over their rows_limit) it measured 0.84-0.98x of eager on this CPU (docs/benchmarks.md).

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
from moe_rt.models.compiled_decode import CompiledDecode


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(s, RMSNorm(s)) with s = x + delta."""
    s = x + delta
    return s, rms_norm(s, weight, eps)


def compile_dense(model) -> None:
    """Route `model`'s small decode steps through whole compiled layers where they apply, else
    its forward through one compiled add_rms_norm (MoEForCausalLM.forward reads both)."""
    if CompiledDecode.supports(model):
        model.compiled_decode = CompiledDecode(model)
    else:
        model.glue = torch.compile(add_rms_norm, dynamic=None)
