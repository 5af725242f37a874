"""s-TS (speculative token shuffling, Speculative MoE arXiv 2503.04398): the token split after
attention follows predicted routing, so most token-expert pairs are already local when the
router runs and only the rest take the all-to-all.

Shape legend: T tokens of the step, T_r tokens on this rank, K experts per token (the predictor's
guess has K ids too), E experts per layer, N ranks.

Flow for MoE layer m+1, started at layer m:
  1. dispatch at layer m (on this rank's T_r tokens) asks the predictor for layer m+1's scores
     from layer m's router input and keeps the top-K ids [T_r, K].
  2. those ids ride as extra columns on layer m's all-gather, so every rank then holds the
     same [T, K] guesses in original token order.
  3. token_split(m+1): every rank computes the same balanced assignment from them (the
     collectives' sizes depend on it: all ranks must agree), and the shuffled reduce-scatter
     delivers each token's attention sum to its chosen rank.
  4. after gating, pairs whose expert is elsewhere go through the baseline all-to-all (dedup'd).
The layer driver's all-gather puts tokens back in their original order, so the result does not
depend on the guesses at all: a wrong prediction costs bytes, never accuracy.
At MoE layer 0 nothing has been observed yet: the split is the baseline's even split.

Two sources of guesses:
  predictor       any router_predict Predictor, fed layer m's router input (step 1 above);
  ResidualGate    layer m+1's own post-attention norm and router applied to layer m's *output*
                  (the residual stream entering layer m+1), computed on the slice just before
                  the all-gather: fresher than layer m's router input, it misses only layer m+1's
                  attention update.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from moe_rt.errors import MoeRtError
from moe_rt.layers.moe.dispatch import DispatchOutput
from router_predict.base import LayerObservation, Predictor

from .alltoall import AllToAllDispatcher, AllToAllHandle
from .base import DispatcherSetup, TokenSplit, even_split


def balanced_assign(scores: np.ndarray, cap: int, default: np.ndarray) -> np.ndarray:
    """Pure: rank per token from per-rank preference scores, at most `cap` tokens per rank.

    scores [T, N] (predicted experts each rank holds), default [T] (the token's even-split rank).
    Tokens with the strongest preference choose first (stable in token order); each takes its
    best rank with room, ties going to its default rank, then the lowest rank.
    """
    T, N = scores.shape
    if cap * N < T:
        raise ValueError(f"cap {cap} x {N} ranks cannot hold {T} tokens")
    load = np.zeros(N, dtype=np.int64)
    out = np.empty(T, dtype=np.int64)
    first = np.argsort(-scores.max(axis=1), kind="stable")
    for t in first:
        # rank preference: higher score, then the default rank, then lower rank id
        pref = sorted(range(N), key=lambda r: (-scores[t, r], r != default[t], r))
        for r in pref:
            if load[r] < cap:
                out[t] = r
                load[r] += 1
                break
    return out


class ResidualGate:
    """Scores [T_r, E] for MoE layer m+1 from layer m's output slice, with the model's own modules."""

    def __init__(self, norms: list, gates: list) -> None:
        self.norms, self.gates = norms, gates  # per MoE layer: post-attention RMSNorm, router Linear

    def __call__(self, next_moe_index: int, layer_out: torch.Tensor) -> torch.Tensor:
        # At the router's own precision: DeepSeek keeps its router in float32 under a bf16 model.
        w = self.gates[next_moe_index].weight
        return F.linear(self.norms[next_moe_index](layer_out).to(w.dtype), w).float()


class SpeculativeDispatcher(AllToAllDispatcher):
    """The baseline's dispatch/combine (same handle) after a token split chosen from guesses."""

    kind = "speculative"

    def __init__(self, comm, placement, predictor: "Predictor | ResidualGate", slack: float = 0.25,
                 device=None) -> None:
        super().__init__(comm, placement, device)
        # A router_predict predictor reads this rank's hidden states: it computes beside them.
        self.predictor = predictor.to(self.device) if isinstance(predictor, Predictor) else predictor
        self.slack = slack
        self.num_moe_layers = self.holder.shape[0]
        self.top_k = 0  # K, learnt from the first dispatch (guesses have K ids)
        self._guess_full: dict[int, torch.Tensor] = {}  # moe_index -> [T, K] guesses, all tokens
        self._guess_here: torch.Tensor | None = None  # [T_r, K] guesses for this rank's tokens now
        self._side: torch.Tensor | None = None  # [T_r, K] int32 guesses for the next MoE layer

    @classmethod
    def build(cls, setup: DispatcherSetup) -> "SpeculativeDispatcher":
        if setup.predictor is None:
            raise MoeRtError("the speculative dispatcher (s-TS) needs a routing predictor")
        return cls(setup.comm, setup.placement, setup.predictor, setup.slack, setup.device)

    def token_split(self, moe_index: int | None, T: int, device=None) -> TokenSplit:
        N = self.comm.world
        guess = self._guess_full.pop(moe_index, None) if moe_index is not None else None
        if moe_index == 0:
            self._guess_full.clear()  # a new forward pass: nothing carries over from the last one
        if guess is None or guess.shape[0] != T:
            self._guess_here = None
            return even_split(T, N, device)
        holds = self.holder[moe_index].long()  # [E, N]
        scores = holds[guess].sum(dim=1).cpu().numpy()  # [T, N] predicted experts held per rank
        cap = max(1, math.ceil((1 + self.slack) * T / N))
        default = even_split(T, N).owner().numpy()
        rank_of = torch.from_numpy(balanced_assign(scores, cap, default)).to(guess.device)
        order = torch.argsort(rank_of, stable=True)
        counts = torch.bincount(rank_of, minlength=N).tolist()
        split = TokenSplit(order.to(device) if device is not None else order, counts)
        self._guess_here = guess[split.owned(self.comm.rank).to(guess.device)]
        return split

    def dispatch(self, moe_index: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> DispatchOutput[AllToAllHandle]:
        if self._guess_here is not None and self._guess_here.shape[0] == topk_ids.shape[0]:
            g = self._guess_here.to(topk_ids.device)
            self.stats.pred_hits += int((topk_ids[:, :, None] == g[:, None, :]).any(-1).sum())
            self.stats.pred_pairs += topk_ids.numel()
        self._guess_here = None
        self._side = None
        self.top_k = topk_ids.shape[1]
        if moe_index + 1 < self.num_moe_layers and isinstance(self.predictor, Predictor):
            obs = LayerObservation(moe_index, topk_ids, topk_weights, hidden=hidden)
            scores = self.predictor.predict(obs, 1)[0]  # [T_r, E] for layer moe_index + 1
            K = topk_ids.shape[1]
            # rides on the all-gather with the hidden states: same device whatever the predictor returns
            self._side = scores.topk(K, dim=-1).indices.to(device=hidden.device, dtype=torch.int32)
        return super().dispatch(moe_index, hidden, topk_ids, topk_weights)

    def side_columns(self, moe_index: int, layer_out: torch.Tensor) -> torch.Tensor | None:
        if moe_index + 1 >= self.num_moe_layers:
            return None
        if isinstance(self.predictor, ResidualGate):
            K = self.top_k
            self._side = self.predictor(moe_index + 1, layer_out).topk(K, dim=-1).indices.to(torch.int32)
        return self._side

    def accept_side(self, moe_index: int, columns: torch.Tensor) -> None:
        self._guess_full[moe_index + 1] = columns.long()
        self._side = None
