"""Learned pre-gate (ExpertFlow / ProMoE style): small per-layer nets read the hidden state at MoE
layer l and predict the experts of layers l+1..l+D, trained on a trace's recorded `hidden`.

Inputs are standardised per layer with train-set statistics, because residual-stream scales grow
with depth and would otherwise make one learning rate wrong for most layers.

Shape legend: N rows, B batch, T tokens, L MoE layers, H hidden size, M MLP width (0 = linear),
D trained depth, E routed experts, k experts per token.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from moe_rt.errors import MoeRtError
from router_predict.base import LayerObservation, Predictor
from router_predict.predictors.common import multi_hot, trace_ids
from router_predict.predictors.training import TrainConfig, TrainLog, train
from router_predict.trace import Trace, split_by_seq

KIND = "learned_pregate"


class PreGateNet(torch.nn.Module):
    """One linear map or 1-hidden-layer MLP per MoE layer, run for all layers as batched einsums."""

    def __init__(self, num_layers: int, hidden_size: int, depth: int, num_experts: int, mlp_hidden: int = 0):
        super().__init__()
        self.shape = (num_layers, hidden_size, depth, num_experts, mlp_hidden)
        out, width = depth * num_experts, mlp_hidden or hidden_size
        self.register_buffer("mean", torch.zeros(num_layers, hidden_size))
        self.register_buffer("std", torch.ones(num_layers, hidden_size))
        self.w_out = torch.nn.Parameter(torch.randn(num_layers, width, out) * width ** -0.5)  # [L, M|H, D*E]
        self.b_out = torch.nn.Parameter(torch.zeros(num_layers, out))
        if mlp_hidden:
            self.w_in = torch.nn.Parameter(torch.randn(num_layers, hidden_size, mlp_hidden) * hidden_size ** -0.5)
            self.b_in = torch.nn.Parameter(torch.zeros(num_layers, mlp_hidden))

    def forward(self, hidden: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
        """hidden [B, L', H] for MoE layers `layers` → logits [B, L', D, E]."""
        num_layers, _, depth, e, mlp = self.shape
        x = (hidden - self.mean[layers]) / self.std[layers]
        if mlp:
            x = torch.nn.functional.gelu(torch.einsum("blh,lhm->blm", x, self.w_in[layers]) + self.b_in[layers])
        y = torch.einsum("blm,lmo->blo", x, self.w_out[layers]) + self.b_out[layers]
        return y.reshape(*y.shape[:2], depth, e)


class LearnedPregate(Predictor):
    name = "learned"
    needs_hidden = True

    def __init__(self, net: PreGateNet, top_k: int) -> None:
        num_layers, _, depth, e, _ = net.shape
        super().__init__(num_layers, e, top_k)
        self.net = net.eval()
        self.max_depth = depth

    def predict(self, obs: LayerObservation, depth: int) -> torch.Tensor:
        if obs.hidden is None:
            raise MoeRtError("learned pre-gate needs the hidden state at each MoE layer")
        d = self.lookahead(obs.moe_index, depth)
        if d > self.max_depth:
            raise MoeRtError(f"learned pre-gate was trained for depth {self.max_depth}, asked {d}")
        l = obs.moe_index
        with torch.no_grad():
            logits = self.net(obs.hidden.float()[:, None, :], slice(l, l + 1))[:, 0]  # [T, D, E]
        return logits[:, :d].transpose(0, 1).contiguous()

    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        num_layers, hidden_size, depth, e, mlp = self.net.shape
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()},
                  os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, "predictor.json"), "w") as f:
            json.dump({"kind": KIND, "num_layers": num_layers, "hidden_size": hidden_size, "depth": depth,
                       "num_experts": e, "mlp_hidden": mlp, "top_k": self.top_k}, f, indent=1)

    @classmethod
    def load(cls, folder: str) -> "LearnedPregate":
        cfg = read_predictor_json(folder, KIND)
        net = PreGateNet(cfg["num_layers"], cfg["hidden_size"], cfg["depth"], cfg["num_experts"],
                         cfg["mlp_hidden"])
        net.load_state_dict(load_file(os.path.join(folder, "model.safetensors")))
        return cls(net, cfg["top_k"])


@dataclass
class PregateTraining:
    predictor: LearnedPregate
    log: TrainLog


def train_pregate(trace: Trace, depth: int, mlp_hidden: int = 0,
                  cfg: TrainConfig = TrainConfig()) -> PregateTraining:
    """Train on whole sequences of `trace`, report loss and recall on held-out sequences."""
    if trace.hidden is None:
        raise MoeRtError("training the learned pre-gate needs a trace with hidden states")
    if trace.num_layers < 2:
        raise MoeRtError("a learned pre-gate needs at least 2 MoE layers to look ahead")
    depth = min(depth, trace.num_layers - 1)
    fit, held = split_by_seq(trace, cfg.held_out, cfg.seed)
    torch.manual_seed(cfg.seed)
    net = PreGateNet(trace.num_layers, trace.hidden.shape[2], depth, trace.num_experts, mlp_hidden)
    mean, std = _layer_stats(fit.hidden)
    net.mean.copy_(mean)
    net.std.copy_(std)
    # mask[l, d-1]: layer l+d exists.
    ls, ds = torch.arange(trace.num_layers)[:, None], torch.arange(1, depth + 1)[None, :]
    mask = ls + ds < trace.num_layers  # [L, D]
    target_layer = (ls + ds).clamp(max=trace.num_layers - 1)  # [L, D]

    def batch_fn(split: Trace):
        ids, hidden = trace_ids(split.topk_ids), split.hidden

        def make(rows: torch.Tensor):
            hot = multi_hot(ids[rows], trace.num_experts)  # [B, L, E]
            x = torch.from_numpy(hidden[rows.numpy()]).float()
            return (x,), hot[:, target_layer], mask.expand(len(rows), -1, -1)
        return make

    # The model outputs [B, L, D, E]; the trainer treats (L, D) as P slots.
    flat = _Flatten(net)
    log = train(flat, _flat_batch(batch_fn(fit)), fit.num_rows, _flat_batch(batch_fn(held)),
                held.num_rows, trace.top_k, cfg, desc="train pre-gate")
    return PregateTraining(LearnedPregate(net, trace.top_k), log)


def _layer_stats(hidden, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer mean and std [L, H] of hidden [N, L, H], in chunks so fp32 copies stay small."""
    total = torch.zeros(hidden.shape[1:], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, hidden.shape[0], chunk):
        x = torch.from_numpy(hidden[start: start + chunk]).double()
        total += x.sum(0)
        squares += (x * x).sum(0)
    n = hidden.shape[0]
    mean = total / n
    var = (squares / n - mean * mean).clamp(min=0)
    return mean.float(), var.sqrt().float().clamp(min=1e-3)


class _Flatten(torch.nn.Module):
    def __init__(self, net: PreGateNet):
        super().__init__()
        self.net = net

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        y = self.net(hidden)
        return y.reshape(y.shape[0], -1, y.shape[-1])


def _flat_batch(make):
    def flat(rows: torch.Tensor):
        (x,), targets, mask = make(rows)
        return (x,), targets.reshape(len(rows), -1, targets.shape[-1]), mask.reshape(len(rows), -1)
    return flat


def read_predictor_json(folder: str, kind: str) -> dict:
    path = os.path.join(folder, "predictor.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise MoeRtError(f"{folder}: not a trained predictor folder (needs predictor.json and model.safetensors)")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise MoeRtError(f"{path}: not valid JSON ({e.msg})") from None
    if cfg.get("kind") != kind:
        raise MoeRtError(f"{folder}: holds a {cfg.get('kind')!r} predictor, not {kind!r}")
    return cfg
