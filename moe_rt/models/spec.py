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
class YarnSpec:
    """YaRN rotary scaling (rope_type "yarn"), field for field as in transformers' _compute_yarn_parameters."""

    factor: float  # context extension factor s
    original_max_position_embeddings: int  # the pretraining context the correction range is measured on
    beta_fast: float = 32.0  # rotations above which a frequency is kept (extrapolated)
    beta_slow: float = 1.0  # rotations below which a frequency is divided by `factor` (interpolated)
    mscale: float | None = None
    mscale_all_dim: float | None = None  # DeepSeek: also scales the softmax by mscale(factor, this)**2
    attention_factor: float | None = None  # explicit cos/sin scale; None = derived from the mscales
    truncate: bool = True  # round the correction range outwards to whole dimensions

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.original_max_position_embeddings <= 0:
            raise MoeRtError(f"yarn rope_scaling needs factor > 0 and original_max_position_embeddings > 0, got "
                             f"{self.factor} and {self.original_max_position_embeddings}")


@dataclass(frozen=True)
class MLASpec:
    """Multi-head Latent Attention (DeepSeek-V2/V3). Keys and values of all heads are rebuilt from
    one per-token latent c [R] (kv_b_proj); the rotary part of the key, k_pe [dr], is shared by all
    heads. Only [c | k_pe] is cached."""

    kv_lora_rank: int  # R
    qk_nope_head_dim: int  # dn: per-head key/query part without rotary
    qk_rope_head_dim: int  # dr: rotary part (shared key, per-head query)
    v_head_dim: int  # dv
    softmax_scale: float  # qk_head_dim**-0.5, times YaRN mscale(factor, mscale_all_dim)**2 when set
    q_lora_rank: int | None = None  # None: q_proj; else q_a_proj -> q_a_layernorm -> q_b_proj (V2-Lite has None)
    rope_interleave: bool = True  # rotary pairs are (x0, x1), (x2, x3)... (V2 always; V3 per config)
    attention_bias: bool = False  # bias on q_a_proj, kv_a_proj_with_mqa and o_proj

    def __post_init__(self) -> None:
        dims = (self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim)
        if min(dims) <= 0 or (self.q_lora_rank is not None and self.q_lora_rank <= 0):
            raise MoeRtError(f"MLA dimensions must be positive: kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, "
                             f"v_head_dim = {dims}, q_lora_rank = {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise MoeRtError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotary pairs)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int  # MLA: 1, the single latent row each token caches
    head_dim: int  # MLA: qk_head_dim (query/key width per head)
    qkv_bias: bool = False
    qk_norm: Literal["none", "head", "full"] = "none"  # head: Qwen3 (per head), full: OLMoE (whole projection)
    clip_qkv: float | None = None  # OLMoE
    rope_theta: float = 10000.0
    yarn: YarnSpec | None = None  # None = plain RoPE
    mla: MLASpec | None = None  # None = standard (grouped-query) attention

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise MoeRtError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.mla is not None and (self.num_kv_heads != 1 or self.head_dim != self.mla.qk_head_dim):
            raise MoeRtError("an MLA attention spec has num_kv_heads=1 and head_dim=qk_nope_head_dim+qk_rope_head_dim")

    @property
    def rope_dim(self) -> int:
        """Width the rotary tables are built for: MLA rotates only the qk_rope_head_dim part."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    @property
    def cache_row(self) -> tuple[int, int]:
        """(heads, width) of one token's cache entry in one layer. Standard attention stores a K and a
        V row of this shape; MLA stores one row [latent | k_pe] that serves as both."""
        if self.mla is not None:
            return 1, self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return self.num_kv_heads, self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV-cache bytes one token takes in one layer (what the cache budget is divided by)."""
        heads, width = self.cache_row
        return (1 if self.mla is not None else 2) * heads * width * dtype_bytes


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
