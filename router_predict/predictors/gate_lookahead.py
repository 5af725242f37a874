"""Training-free look-ahead: apply the routers of layers l+1..l+D to the hidden state at layer l.

Residual streams change slowly between adjacent layers, so later routers applied early are a good
guess. Router inputs are RMSNorm(x) * g_l with a per-layer norm weight g_l; where the norm weights
are known the hidden state is rescaled by g_{l+d} / g_l first, so the forecast is exact whenever
the residual stream x itself does not change (whatever the norm weights). Scores rank
experts like the model's own selection: raw logits (softmax routers), or sigmoid(logits) +
e_score_correction_bias where the model has that bias (DeepSeek-V3 style). Group-limited routing
(n_group/topk_group) is not modelled: the ranking is over all experts.

Shape legend: T tokens, H router input size, E routed experts, L MoE layers, d look-ahead distance.
"""
from __future__ import annotations

import json
import os

import torch

from moe_rt.errors import MoeRtError
from router_predict.base import LayerObservation, Predictor

GATE_NAMES = ("model.layers.{i}.block_sparse_moe.gate.weight",  # Mixtral
              "model.layers.{i}.mlp.gate.weight")  # Qwen-MoE, OLMoE, DeepSeek
BIAS_NAME = "model.layers.{i}.mlp.gate.e_score_correction_bias"
NORM_NAME = "model.layers.{i}.post_attention_layernorm.weight"  # the router's input norm, all families


class RouterLookahead(Predictor):
    """The later routers (and their input norms and correction biases) of a model, as a predictor base.

    Shared by gate_lookahead (reads layer l's router input) and gate_lookahead_output (reads layer
    l's output): both only differ in what they feed the routers of layers l+1..l+d.
    """

    def __init__(self, gate_weights: list[torch.Tensor], top_k: int,
                 biases: list[torch.Tensor] | None = None, layer_ids: list[int] | None = None,
                 norm_weights: list[torch.Tensor] | None = None, eps: float = 1e-6) -> None:
        """gate_weights: per MoE layer [E, H]; biases: per MoE layer [E] correction bias, or None;
        norm_weights: per MoE layer [H] weight of the RMSNorm in front of its router, or None;
        eps: that RMSNorm's epsilon (the model's rms_norm_eps)."""
        name = self.name
        if not gate_weights:
            raise MoeRtError(f"{name} needs at least one router weight")
        shapes = {tuple(w.shape) for w in gate_weights}
        if len(shapes) != 1:
            raise MoeRtError(f"{name}: router weights differ in shape: {sorted(shapes)}")
        super().__init__(len(gate_weights), gate_weights[0].shape[0], top_k)
        self.weights = torch.stack([w.float() for w in gate_weights])  # [L, E, H]
        self.biases = None if biases is None else torch.stack([b.float() for b in biases])  # [L, E]
        self.layer_ids = layer_ids if layer_ids is not None else list(range(len(gate_weights)))
        self.eps = float(eps)
        self.norms = None  # [L, H]
        if norm_weights is not None:
            if len(norm_weights) != len(gate_weights):
                raise MoeRtError(f"{name}: {len(norm_weights)} norm weights for {len(gate_weights)} routers")
            self.norms = torch.stack([n.float() for n in norm_weights])
            if self.norms.shape[1] != self.weights.shape[2]:
                raise MoeRtError(f"{name}: norm weights have size {self.norms.shape[1]}, routers "
                                 f"read {self.weights.shape[2]}")

    def _ranking_scores(self, logits: torch.Tensor, l: int, d: int) -> torch.Tensor:
        """logits [d, T, E] of layers l+1..l+d -> scores ranked like the model's own selection."""
        if self.biases is None:
            return logits
        b = self.biases[l + 1: l + 1 + d]  # [d, E]
        return torch.sigmoid(logits) + b[:, None, :]

    @classmethod
    def from_model(cls, model) -> "RouterLookahead":
        """From a loaded MoEForCausalLM (anything with moe_blocks() and spec.top_k): no file reads.

        Weights are copied to fp32 CPU tensors, so later edits to the model do not leak in.
        """
        blocks = model.moe_blocks()
        if not blocks:
            raise MoeRtError(f"{cls.name}.from_model: the model has no MoE blocks")
        weights = [b.gate.weight.detach().float().cpu().clone() for b in blocks]
        has_bias = [getattr(b, "e_score_correction_bias", None) is not None for b in blocks]
        if any(has_bias) and not all(has_bias):
            raise MoeRtError(f"{cls.name}.from_model: e_score_correction_bias on some MoE layers only")
        biases = [b.e_score_correction_bias.detach().float().cpu().clone() for b in blocks] if all(has_bias) else None
        norms = [getattr(getattr(model.layers[b.layer_id], "post_attention_layernorm", None), "weight", None)
                 for b in blocks] if hasattr(model, "layers") else [None]
        norms = [n.detach().float().cpu().clone() for n in norms] if all(n is not None for n in norms) else None
        eps = getattr(model.spec, "rms_norm_eps", 1e-6)
        return cls(weights, model.spec.top_k, biases, [b.layer_id for b in blocks], norms, eps)

    @classmethod
    def from_checkpoint(cls, model_dir: str) -> "RouterLookahead":
        """Read only the router weights from a Hugging Face folder (single or sharded safetensors)."""
        config = _read_config(model_dir)
        layer_ids = moe_layer_ids(config)
        top_k = config.get("num_experts_per_tok")
        if not isinstance(top_k, int):
            raise MoeRtError(f"{model_dir}/config.json has no integer num_experts_per_tok")
        files = _tensor_files(model_dir)
        weights, biases = [], []
        for i in layer_ids:
            names = [n.format(i=i) for n in GATE_NAMES]
            found = next((n for n in names if n in files), None)
            if found is None:
                raise MoeRtError(f"{model_dir}: no router weight for MoE layer {i} (looked for {names[0]} "
                                 f"and {names[1]})")
            weights.append(_load_tensor(model_dir, files[found], found))
            bias = BIAS_NAME.format(i=i)
            if bias in files:
                biases.append(_load_tensor(model_dir, files[bias], bias))
        norm_names = [NORM_NAME.format(i=i) for i in layer_ids]
        norms = [_load_tensor(model_dir, files[n], n) for n in norm_names] if all(n in files for n in norm_names) else None
        if biases and len(biases) != len(weights):
            raise MoeRtError(f"{model_dir}: e_score_correction_bias present on some MoE layers only")
        expected = next((config[k] for k in ("num_local_experts", "num_experts", "n_routed_experts")
                         if isinstance(config.get(k), int)), None)
        if expected is not None and weights[0].shape[0] != expected:
            raise MoeRtError(f"{model_dir}: router weight has {weights[0].shape[0]} experts but config "
                             f"says {expected}")
        eps = config.get("rms_norm_eps", 1e-6)  # the default moe_rt.models.common uses too
        return cls(weights, top_k, biases or None, layer_ids, norms, eps)


class GateLookaheadPredictor(RouterLookahead):
    name = "gate_lookahead"
    needs_hidden = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fused: dict[tuple[int, int], torch.Tensor] = {}  # (l, d) -> [H, d*E] fused look-ahead weights

    def predict(self, obs: LayerObservation, depth: int) -> torch.Tensor:
        if obs.hidden is None:
            raise MoeRtError("gate_lookahead needs the hidden state at each MoE layer")
        d = self.lookahead(obs.moe_index, depth)
        l = obs.moe_index
        # One [T, H] x [H, d*E] matmul per layer: the later routers, rescaled for layer l's norm,
        # are fused once per (l, d) (predict runs after every MoE layer of every step, and
        # rescaling [d, E, H] each time cost ten times the matmul at batch 1).
        fused = self._fused.get((l, d))
        if fused is None:
            fused = self._fused[(l, d)] = self.lookahead_weights(l, d).reshape(-1, self.weights.shape[2]).t().contiguous()
        t = obs.hidden.shape[0]
        # E spelled out: an expert-parallel rank may route no tokens in a step (t == 0)
        logits = (obs.hidden.float() @ fused).reshape(t, d, fused.shape[1] // d).transpose(0, 1)  # [d, T, E]
        return self._ranking_scores(logits, l, d)

    def lookahead_weights(self, l: int, d: int) -> torch.Tensor:
        """[d, E, H] the routers of layers l+1..l+d as applied to layer l's router input."""
        w = self.weights[l + 1: l + 1 + d]  # [d, E, H]
        if self.norms is not None:
            # hidden / g_l * g_t is the router input layer t would see for the same residual stream
            # (RMSNorm's 1/rms factor is common to both). A zero g_l entry carries nothing: drop it.
            src = self.norms[l]
            inv = torch.where(src.abs() > 1e-8, 1.0 / src, torch.zeros_like(src))
            w = w * (self.norms[l + 1: l + 1 + d] * inv)[:, None, :]
        return w

    def to(self, device: torch.device | str) -> "GateLookaheadPredictor":
        self._fused = {}  # rebuilt on the new device as predict asks
        return super().to(device)


def moe_layer_ids(config: dict) -> list[int]:
    """Decoder-layer indices that have a routed MoE block, from a HF config.json dict."""
    n = config.get("num_hidden_layers")
    if not isinstance(n, int):
        raise MoeRtError("config.json has no integer num_hidden_layers")
    if "first_k_dense_replace" in config:  # DeepSeek-V2/V3
        first, freq = config["first_k_dense_replace"], config.get("moe_layer_freq", 1)
        return [i for i in range(n) if i >= first and i % freq == 0]
    if "decoder_sparse_step" in config:  # Qwen2-MoE / Qwen3-MoE
        step, dense = config["decoder_sparse_step"] or 1, set(config.get("mlp_only_layers") or [])
        return [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    return list(range(n))  # Mixtral, OLMoE: every layer is MoE


def _read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise MoeRtError(f"{model_dir}: no config.json (is this a Hugging Face model folder?)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise MoeRtError(f"{path}: not valid JSON ({e.msg})") from None


def _tensor_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the shard index or the single file's header."""
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    single = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise MoeRtError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    with safe_open(single, framework="pt") as f:
        return {name: "model.safetensors" for name in f.keys()}


def _load_tensor(model_dir: str, file_name: str, name: str) -> torch.Tensor:
    from safetensors import safe_open

    path = os.path.join(model_dir, file_name)
    if not os.path.isfile(path):
        raise MoeRtError(f"{model_dir}: shard {file_name} listed in the index is missing")
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name).float()
