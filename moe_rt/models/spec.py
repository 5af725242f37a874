"""ModelSpec: one family-independent description of a decoder-only MoE checkpoint.

Each family file (mixtral.py, qwen2_moe.py, ...) turns a Hugging Face config.json into a ModelSpec
and names its tensors; everything downstream (layers, loader, engine, cache, planner) reads only
the spec. Values are checked once, here, so the layers can trust them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moe_rt.errors import MoeRtError


@dataclass(frozen=True)
class RoutingSpec:
    """How a router turns logits [T, E] into (topk_weights, topk_ids)."""

    num_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True  # renormalise the chosen K weights to sum to 1
    routed_scaling_factor: float = 1.0  # multiplies the final weights (DeepSeek)
    n_group: int = 1  # expert groups for group-limited top-k (DeepSeek)
    topk_group: int = 1  # groups a token may pick from
    group_score: Literal["max", "top2_sum"] = "max"  # V2 uses the group max, V3 the sum of its top 2
    correction_bias: bool = False  # e_score_correction_bias added for choice only (DeepSeek-V3)
    logits_fp32: bool = False  # compute router logits in float32 regardless of model dtype

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise MoeRtError(f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise MoeRtError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise MoeRtError(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")


@dataclass(frozen=True)
class MoESpec:
    routing: RoutingSpec
    intermediate_size: int  # I of each routed expert
    shared_intermediate_size: int = 0  # 0 = no shared expert
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(Linear(D, 1)) scales the shared expert


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    qk_norm: Literal["none", "head", "full"] = "none"  # head: Qwen3 (per head), full: OLMoE (whole projection)
    clip_qkv: float | None = None  # OLMoE
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise MoeRtError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    attention: AttentionSpec
    moe: MoESpec
    layer_kinds: tuple[str, ...]  # per decoder layer: "moe" or "dense"
    dense_intermediate_size: int  # I of the dense MLP used by "dense" layers
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    moe_weight_prefix: str = "mlp"  # "block_sparse_moe" for Mixtral checkpoints
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # w1, w3, w2 in HF files
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.layer_kinds) != self.num_layers:
            raise MoeRtError(f"layer_kinds has {len(self.layer_kinds)} entries for {self.num_layers} layers")
        if "moe" not in self.layer_kinds:
            raise MoeRtError("the model has no MoE layer")

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Decoder-layer index of each MoE layer, in order (moe_index -> layer_id)."""
        return tuple(i for i, k in enumerate(self.layer_kinds) if k == "moe")

    @property
    def num_experts(self) -> int:
        return self.moe.routing.num_experts

    @property
    def top_k(self) -> int:
        return self.moe.routing.top_k

    def bytes_per_expert(self, dtype_bytes: int) -> int:
        return 3 * self.hidden_size * self.moe.intermediate_size * dtype_bytes
