"""The residual stream leaving each MoE layer's decoder layer, caught with torch forward hooks.

Hooks go on model.layers[layer_id] for every MoE layer (layer_id = model.spec.moe_layer_ids[i]) and
exist only between hook_layer_outputs() and the remover it returns, so the model code is untouched
and a model nobody records costs nothing. A hook fires right after its decoder layer's forward, i.e.
after that layer's router event (the MoE block runs inside the decoder layer).

Shape legend: T tokens of the forward batch, H hidden size.
"""
from __future__ import annotations

from typing import Callable

import torch

from moe_rt.errors import MoeRtError

LayerOutputFn = Callable[[int, torch.Tensor], None]  # (moe_index, output [T, H])


def hook_layer_outputs(model, fn: LayerOutputFn) -> Callable[[], None]:
    """Call fn(moe_index, output) after each MoE layer's decoder layer runs; returns the remover."""
    layers, layer_ids = getattr(model, "layers", None), getattr(getattr(model, "spec", None), "moe_layer_ids", None)
    if layers is None or layer_ids is None:
        raise MoeRtError("layer outputs need a loaded model with .layers and spec.moe_layer_ids")

    def hook_for(moe_index: int):
        def hook(module, args, output):
            fn(moe_index, output[0] if isinstance(output, tuple) else output)
        return hook

    handles = [layers[layer_id].register_forward_hook(hook_for(m)) for m, layer_id in enumerate(layer_ids)]

    def remove() -> None:
        while handles:
            handles.pop().remove()
    return remove


def attach_observer(hub, on_event: Callable, model=None,
                    on_layer_output: LayerOutputFn | None = None) -> Callable[[], None]:
    """Subscribe on_event to the model's router events and, when on_layer_output is given, hook the
    MoE layers' outputs too; returns one detach function for both (idempotent)."""
    removers = [hub.subscribe(on_event)]
    if on_layer_output is not None:
        removers.append(hook_layer_outputs(model, on_layer_output))

    def detach() -> None:
        while removers:
            removers.pop()()
    return detach
