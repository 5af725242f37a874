"""Training-free look-ahead from a layer's OUTPUT: routers of layers l+1..l+D applied to the residual
stream leaving MoE layer l's decoder layer (after its experts ran).

For target t = l+d the forecast is router_t(RMSNorm_t(x)), with RMSNorm_t the norm in front of
layer t's router (`post_attention_layernorm`, the model's eps) and x layer l's output. That is
exactly what layer t computes when nothing between them moves the residual stream: for d = 1 only
layer l+1's attention stands in between, so the forecast is far closer than gate_lookahead's (which
starts from layer l's router input, before layer l's attention output and experts are added).

The price is time: the forecast exists only once layer l's decoder layer finished, so a prefetch it
triggers overlaps just layer l+1's attention (d = 1), against layer l's experts plus layer l+1's
attention for gate_lookahead. Online it is fed by a forward hook on the decoder layer
(router_predict.online); offline it reads the trace's `layer_output` array (docs/traces.md).

Scores rank experts like the model: raw logits (softmax routers), or sigmoid(logits) +
e_score_correction_bias where present. Group-limited routing is not modelled.

Shape legend: T tokens, H hidden size, E routed experts, d look-ahead distance.
"""
from __future__ import annotations

import torch

from moe_rt.errors import MoeRtError
from router_predict.base import LayerObservation
from router_predict.predictors.gate_lookahead import RouterLookahead


class GateLookaheadOutputPredictor(RouterLookahead):
    name = "gate_lookahead_output"
    needs_layer_output = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.norms is None:
            raise MoeRtError(f"{self.name} needs each router's input-norm weight "
                             "(post_attention_layernorm.weight) next to the router weights")
        # router_t(RMSNorm_t(x)) = (x / rms(x)) @ (W_t * g_t).T: fold each norm weight into its router
        # once (the model rounds in another order: only exact ties can rank differently).
        self.scaled = self.weights * self.norms[:, None, :]  # [L, E, H]

    def predict(self, obs: LayerObservation, depth: int) -> torch.Tensor:
        if obs.layer_output is None:
            raise MoeRtError(f"{self.name} needs the output of each MoE layer's decoder layer")
        d = self.lookahead(obs.moe_index, depth)
        l = obs.moe_index
        x = obs.layer_output.float()  # [T, H]
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # RMSNorm without its weight
        logits = torch.einsum("th,deh->dte", x, self.scaled[l + 1: l + 1 + d])
        return self._ranking_scores(logits, l, d)
