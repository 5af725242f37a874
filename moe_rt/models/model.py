"""The decoder-only MoE language model shared by every family; families differ only in ModelSpec.

Shape legend: T tokens (flattened over sequences), D hidden, V vocabulary.
"""
from __future__ import annotations

import torch
from torch import nn

from moe_rt.layers.attention import Attention, AttentionMetadata, LayerKV
from moe_rt.layers.linear import Linear
from moe_rt.layers.mla import MLAttention
from moe_rt.layers.mlp import DenseMLP
from moe_rt.layers.moe.block import MoEBlock, MoEContext
from moe_rt.layers.norm import RMSNorm
from moe_rt.layers.rotary import RotaryEmbedding

from .spec import ModelSpec


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_id: int, rope: RotaryEmbedding, ctx: MoEContext) -> None:
        super().__init__()
        D = spec.hidden_size
        window = spec.sliding_windows[layer_id] if spec.sliding_windows else None
        if spec.attention.mla is not None:
            self.self_attn = MLAttention(spec.attention, D, rope)
        else:
            self.self_attn = Attention(spec.attention, D, spec.rms_norm_eps, rope, window)
        self.input_layernorm = RMSNorm(D, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(D, spec.rms_norm_eps)
        if spec.layer_kinds[layer_id] == "moe":
            moe_index = spec.moe_layer_ids.index(layer_id)
            self.mlp = MoEBlock(spec.moe, D, moe_index, layer_id, ctx)
        else:
            self.mlp = DenseMLP(D, spec.dense_intermediate_size)

    def forward(self, x, positions, meta: AttentionMetadata, kv: LayerKV | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, meta, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class MoEForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, ctx: MoEContext | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.moe_ctx = ctx or MoEContext()
        a = spec.attention
        rope = self.rope = RotaryEmbedding(a.rope_dim, spec.max_position_embeddings, a.rope_theta, a.yarn)
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, rope, self.moe_ctx) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # compile=True: one compiled graph per layer for decode steps of a few tokens (compiled_decode.py)
        self.compiled_decode = None

    @property
    def hub(self):
        return self.moe_ctx.hub

    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEBlock)]

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list[LayerKV] | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens.weight[input_ids]  # the embedding's rows: one index op where F.embedding takes six
        meta.rope = self.rope.lookup(positions, x.dtype)
        if self.compiled_decode is not None and self.compiled_decode.eligible(x, meta, kv_caches):
            return self.norm(self.compiled_decode(x, meta, kv_caches))
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, meta, kv_caches[i] if kv_caches is not None else None)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
