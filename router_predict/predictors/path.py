"""Path predictor (Read-ME-style decoupled pre-gating): from a token's id, its previous token and
its position, predict every MoE layer's experts before the forward pass starts.

Because it needs no hidden state it can run a whole step ahead, on the scheduler's side. Token ids
beyond the trained vocabulary share one "unknown" row; prev id -1 (sequence start) has its own.

Shape legend: B batch, T tokens, V trained vocabulary, R embedding width, L MoE layers,
E routed experts, k experts per token.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from moe_rt.errors import MoeRtError
from router_predict.base import LayerObservation, Predictor
from router_predict.predictors.common import multi_hot, prev_tokens, trace_ids
from router_predict.predictors.learned import read_predictor_json
from router_predict.predictors.training import TrainConfig, TrainLog, train
from router_predict.trace import Trace, split_by_seq

KIND = "path"
POSITION_BUCKETS = 16  # log2 buckets: 0, 1, 2-3, 4-7, ... positions past 2^14 share the last


class PathNet(torch.nn.Module):
    def __init__(self, vocab: int, num_layers: int, num_experts: int, width: int = 64) -> None:
        super().__init__()
        self.shape = (vocab, num_layers, num_experts, width)
        self.tok = torch.nn.Embedding(vocab + 1, width)  # row V: unknown token
        self.prev = torch.nn.Embedding(vocab + 2, width)  # row V: unknown, V+1: sequence start
        self.pos = torch.nn.Embedding(POSITION_BUCKETS, width)
        self.out = torch.nn.Linear(width, num_layers * num_experts)

    def forward(self, token_ids: torch.Tensor, prev_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B] each → logits [B, L, E]."""
        vocab, num_layers, e, _ = self.shape
        tok = torch.where((token_ids >= 0) & (token_ids < vocab), token_ids, vocab)
        prev = torch.where(prev_ids < 0, vocab + 1, torch.where(prev_ids < vocab, prev_ids, vocab))
        bucket = torch.floor(torch.log2(positions.float().clamp(min=0) + 1)).long().clamp(max=POSITION_BUCKETS - 1)
        x = torch.nn.functional.gelu(self.tok(tok) + self.prev(prev) + self.pos(bucket))
        return self.out(x).reshape(-1, num_layers, e)


class PathPredictor(Predictor):
    name = "path"
    needs_token_ids = True

    def __init__(self, net: PathNet, top_k: int) -> None:
        _, num_layers, e, _ = net.shape
        super().__init__(num_layers, e, top_k)
        self.net = net.eval()

    def predict_path(self, token_ids: torch.Tensor, positions: torch.Tensor,
                     prev_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        prev = torch.full_like(token_ids, -1) if prev_token_ids is None else prev_token_ids
        with torch.no_grad():
            return self.net(token_ids.long(), prev.long(), positions.long()).transpose(0, 1).contiguous()

    def predict(self, obs: LayerObservation, depth: int) -> torch.Tensor:
        if obs.token_ids is None or obs.positions is None:
            raise MoeRtError("path predictor needs token_ids and positions")
        d = self.lookahead(obs.moe_index, depth)
        path = self.predict_path(obs.token_ids, obs.positions, obs.prev_token_ids)  # [L, T, E]
        return path[obs.moe_index + 1: obs.moe_index + 1 + d]

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        vocab, num_layers, e, width = self.net.shape
        save_file(self.net.state_dict(), os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "predictor.json"), "w") as f:
            json.dump({"kind": KIND, "vocab": vocab, "num_layers": num_layers, "num_experts": e,
                       "width": width, "top_k": self.top_k}, f, indent=1)

    @classmethod
    def load(cls, folder: str) -> "PathPredictor":
        cfg = read_predictor_json(folder, KIND)
        net = PathNet(cfg["vocab"], cfg["num_layers"], cfg["num_experts"], cfg["width"])
        net.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        return cls(net, cfg["top_k"])


@dataclass
class PathTraining:
    predictor: PathPredictor
    log: TrainLog


def train_path(trace: Trace, width: int = 64, cfg: TrainConfig = TrainConfig()) -> PathTraining:
    """Train on whole sequences of `trace` (needs token_ids), report held-out loss and recall."""
    if trace.token_ids is None:
        raise MoeRtError("training the path predictor needs a trace with token_ids")
    fit, held = split_by_seq(trace, cfg.held_out, cfg.seed)
    torch.manual_seed(cfg.seed)
    net = PathNet(int(trace.token_ids.max()) + 1, trace.num_layers, trace.num_experts, width)

    def batch_fn(split: Trace):
        ids = trace_ids(split.topk_ids)
        tok, pos = torch.from_numpy(split.token_ids), torch.from_numpy(split.positions)
        prev = torch.from_numpy(prev_tokens(split.seq_ids, split.positions, split.token_ids))
        every = torch.ones(split.num_rows, trace.num_layers, dtype=torch.bool)

        def make(rows: torch.Tensor):
            return (tok[rows], prev[rows], pos[rows]), multi_hot(ids[rows], trace.num_experts), every[rows]
        return make

    log = train(net, batch_fn(fit), fit.num_rows, batch_fn(held), held.num_rows, trace.top_k, cfg,
                desc="train path predictor")
    return PathTraining(PathPredictor(net, trace.top_k), log)
