"""`compile=True`, small decode batches: each decoder layer as one compiled graph (norms,
projections, rotary, the KV-cache write, attention, routing, the chosen experts and the residual
adds) for a step of 1 to a few decode tokens (rows_limit).

Why: at a few tokens a layer's eager work is over a hundred dispatched ops whose fixed costs
outweigh the arithmetic (docs/benchmarks.md, "Decode overhead"); inductor turns the layer into
two C++ loops and one top-k. Up to ROW_REDUCTION_MAX_ROWS tokens the projections are written as
multiply-and-sum over the weight's rows, which inductor fuses with the norm before them and
streams as vectorised row reductions (BLAS's matrix-vector kernel reads this layout at a third of
the bandwidth); above, as a matmul. The experts are the same reductions over `w13[ids]` and
`w2[ids]`: each token's chosen experts' rows are read through the routed ids in the loop itself
(no gather copy, no host read of the routing). A token reads its own experts, so an expert two
tokens chose is read twice, the second time from cache only while the batch's expert reads fit
in it: several tokens take the compiled layers only up to rows_limit (at most MAX_ROWS of the
dtype, where the eager grouped loop, one read per used expert, catches up even for small
experts); a model whose K experts alone outgrow the last-level cache (any real Mixtral, Qwen-MoE
or OLMoE) compiles one token only.

Attention: grouped-query over the paged cache, or MLA (DeepSeek) absorbed as layers/mla.py decodes
it, attending over the cached latent rows.

When: a forward of 1 to rows_limit decode tokens and no prefill, float32 or bfloat16 on the CPU
(DTYPES), every expert resident in plain stacks (ResidentExpertStore without slot maps), the local
dispatcher and the torch expert compute, no routing observers or forecaster (they want each
layer's RouterEvent), no dynamic top-k. Anything else takes the eager layers (model.py).
`eligible` is the whole rule.

One graph serves every layer of a kind (the weights are arguments): MoE layers, and dense-MLP
layers where a family has them. The key count L and the batch are dynamic from the first call, so
decoding does not recompile as sequences grow or join: a layer kind compiles one graph for one
token (dynamo specialises a size of 1), one for 2..ROW_REDUCTION_MAX_ROWS and one above.

Exactness: the same products as the eager layer in another summation order (float32: greedy
tokens equal, per-token logprobs within 1e-4; tests/moe_rt/test_compile.py). bfloat16 keeps
intermediates in float32 where the eager layers round them, so greedy paths may part; against the
float32 model both are equally close (the same test file).

Shape legend: B decode tokens (one per sequence), D hidden, H query heads, KV key/value heads, hd
head dim, L keys, K chosen experts, I expert intermediate size.
"""
from __future__ import annotations

import itertools
import math
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_rt.layers.attention import AttentionMetadata, LayerKV
from moe_rt.layers.moe.compute import torch_experts
from moe_rt.layers.moe.dispatch import LocalDispatcher
from moe_rt.layers.moe.routing import route
from moe_rt.layers.moe.store import ResidentExpertStore
from moe_rt.layers.norm import rms_norm
from moe_rt.models.spec import AttentionSpec, RoutingSpec

# Decode batches up to this many tokens take the compiled layers, by dtype (and no more than
# rows_limit's cache bound). float32: the eager expert loop (BLAS in column form, one read per used
# expert) catches up by 8-16 tokens; per layer, mixtral-56m shapes, two threads, weights streamed:
# eager 0.85 / 1.0 / 1.4 / 2.0 ms at 2 / 4 / 8 / 16 tokens, compiled 0.45-0.5 / 0.77 / 1.16-1.3 /
# 1.8-2.8 ms. bfloat16: the eager kernels stream slowly at a few rows (grouped_mm's per-expert
# matmul at 2 rows: ~6 GB/s), so the compiled layers still win at 16 (mixtral-56m 1.91x) and 32
# tokens (demo 2.02x) (docs/benchmarks.md, "Compiled decode layers").
MAX_ROWS = {torch.float32: 8, torch.bfloat16: 32}
# Up to here projections are row reductions; above, matmuls (compiled, 2 tokens: 450 against
# 622 us per layer; 4: 767 against 791; 8: 1301 against 1164).
ROW_REDUCTION_MAX_ROWS = 4
# What the compiled layers take. bfloat16: inductor reads the weights as bfloat16 and computes in
# float32 (half the bytes: mixtral-56m 2.5x eager bfloat16 at one token, whose F.linear streams
# slowly). float16 is not tested here, so it stays eager.
DTYPES = (torch.float32, torch.bfloat16)
# The last-level cache when the system does not say (this machine's L3)
DEFAULT_CACHE_BYTES = 32 << 20


def last_level_cache_bytes() -> int:
    """The CPU's largest cache in bytes (Linux sysfs), else DEFAULT_CACHE_BYTES."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=DEFAULT_CACHE_BYTES)


def rows_limit(expert_bytes: int, top_k: int, cache_bytes: int, most: int = MAX_ROWS[torch.float32]) -> int:
    """Most decode tokens a step may have to take the compiled layers: as many as keep the
    experts they read (K each, a shared one read again) within the cache, 1 to `most` (MAX_ROWS of
    the dtype). Measured: mixtral-56m (1.5 MiB experts, K = 2, 32 MiB L3) gains at 8 tokens;
    mixtral-gpu (42 MiB experts) is even with eager at 4 (41.1 against 40.4 tok/s), as its re-reads
    come from memory. Pure."""
    return max(1, min(most, cache_bytes // max(1, top_k * expert_bytes)))


@dataclass(frozen=True)
class LayerShape:
    """What a layer's graph is specialised on (constants to dynamo; equal for every layer of a model)."""

    attention: AttentionSpec
    eps: float
    routing: RoutingSpec | None  # None: a dense-MLP layer


def _proj(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h [B, D] times w [N, D] transposed -> [B, N]: row reductions inductor fuses with h's
    producer for few rows, a matmul for more."""
    if h.shape[0] <= ROW_REDUCTION_MAX_ROWS:
        return (w * h[:, None, :]).sum(-1)
    return h @ w.t()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, n, hd] turned by the rotate-half rule (cos, sin [B, 1, hd]). Not RotaryEmbedding.rotate:
    its as_strided views of x made dynamo recompile per batch size (8 graphs instead of 2)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def _mlp(h: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SiLU-gated MLP of h [B, D]: gate_up [2I, D], down [D, I] -> [B, D]."""
    g = _proj(h, gate_up)
    i = down.shape[1]
    return _proj(F.silu(g[:, :i]) * g[:, i:], down)


def _attention(shape: LayerShape, x, cos, sin, k_cache, v_cache, slot, key_index, mask, ln1, attn) -> torch.Tensor:
    """x [B, D] plus its attention over the cached keys (the input norm, qkv, rotary, the KV-cache
    write, grouped-query attention, o_proj) -> [B, D]. attn: (qkv_w, qkv_b, q_norm, k_norm, o_w);
    MLA layers take _mla_attention."""
    if shape.attention.mla is not None:
        return _mla_attention(shape, x, cos, sin, k_cache, slot, key_index, mask, ln1, attn)
    qkv_w, qkv_b, q_norm, k_norm, o_w = attn
    a = shape.attention
    B, H, KV, hd = x.shape[0], a.num_heads, a.num_kv_heads, a.head_dim
    h = rms_norm(x, ln1, shape.eps)
    qkv = _proj(h, qkv_w)
    if qkv_b is not None:
        qkv = qkv + qkv_b
    q, k, v = qkv[:, : H * hd], qkv[:, H * hd : (H + KV) * hd], qkv[:, (H + KV) * hd :]
    if a.qk_norm == "full":
        q, k = rms_norm(q, q_norm, shape.eps), rms_norm(k, k_norm, shape.eps)
    if a.clip_qkv is not None:
        q, k, v = (t.clamp(-a.clip_qkv, a.clip_qkv) for t in (q, k, v))
    q, k, v = q.reshape(B, H, hd), k.reshape(B, KV, hd), v.reshape(B, KV, hd)
    if a.qk_norm == "head":
        q, k = rms_norm(q, q_norm, shape.eps), rms_norm(k, k_norm, shape.eps)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    k_cache.index_copy_(0, slot, k)
    v_cache.index_copy_(0, slot, v)
    L = key_index.shape[0] // (B * KV)
    keys = k_cache.view(-1, hd)[key_index].view(B * KV, 1, L, hd)
    values = v_cache.view(-1, hd)[key_index].view(B * KV, L, hd)
    # the query heads of a KV head attend to its keys (grouped-query attention, keys not repeated)
    scores = (q.reshape(B * KV, H // KV, 1, hd) * keys).sum(-1) * (1.0 / math.sqrt(hd)) + mask
    p = torch.softmax(scores, -1)  # [B * KV, H / KV, L]
    o = (p[..., None] * values[:, None]).sum(2).reshape(B, H * hd)
    return x + _proj(o, o_w)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, n, dr] turned pair by pair, (x0, x1), (x2, x3), ..., laid out [even | odd] as
    RotaryEmbedding.apply_interleaved does (cos, sin [B, 1, dr], each frequency twice)."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * c - odd * s, odd * c + even * s), -1)


def _mla_attention(shape: LayerShape, x, cos, sin, cache, slot, key_index, mask, ln1, attn) -> torch.Tensor:
    """MLA (layers/mla.py) for one new token per sequence, absorbed as its eager decode is: the
    query's no-rope part is turned into latent space by W_uk, attends over the cached [c | k_pe]
    rows (one shared head), and the latent output leaves through W_uv. cache [slots, 1, R + dr];
    attn: (q_w, q_a_w, q_a_b, q_a_norm, q_b_w, kv_a_w, kv_a_b, kv_a_norm, w_uk [H, dn, R],
    w_uv [H, dv, R], o_w, o_b), q_w None where the query has a LoRA (q_a_*, q_b_w)."""
    q_w, q_a_w, q_a_b, q_a_norm, q_b_w, kv_a_w, kv_a_b, kv_a_norm, w_uk, w_uv, o_w, o_b = attn
    m, H = shape.attention.mla, shape.attention.num_heads
    B, R, dn = x.shape[0], m.kv_lora_rank, m.qk_nope_head_dim
    h = rms_norm(x, ln1, shape.eps)
    if q_w is not None:
        q = _proj(h, q_w)
    else:
        qa = _proj(h, q_a_w)
        q = _proj(rms_norm(qa if q_a_b is None else qa + q_a_b, q_a_norm, 1e-6), q_b_w)
    q = q.reshape(B, H, m.qk_head_dim)
    kva = _proj(h, kv_a_w)
    kva = kva if kv_a_b is None else kva + kv_a_b
    latent, k_pe = rms_norm(kva[:, :R], kv_a_norm, 1e-6), kva[:, None, R:]
    turn = _rotate_pairs if m.rope_interleave else _rotate
    q_pe, k_pe = turn(q[..., dn:], cos, sin), turn(k_pe, cos, sin)
    cache.index_copy_(0, slot, torch.cat((latent[:, None, :], k_pe), -1))
    L = key_index.shape[0] // B
    rows = cache.view(-1, R + m.qk_rope_head_dim)[key_index].view(B, 1, L, R + m.qk_rope_head_dim)
    q_abs = (q[..., :dn, None] * w_uk).sum(2)  # [B, H, R]: W_uk^T q_nope
    scores = (torch.cat((q_abs, q_pe), -1)[:, :, None, :] * rows).sum(-1) * m.softmax_scale + mask
    p = torch.softmax(scores, -1)  # [B, H, L]
    o = (p[..., None] * rows[..., :R]).sum(2)  # [B, H, R]
    out = _proj((o[:, :, None, :] * w_uv).sum(-1).reshape(B, -1), o_w)  # W_uv per head, then o_proj
    return x + (out if o_b is None else out + o_b)


def decode_layer(shape: LayerShape, x, cos, sin, k_cache, v_cache, slot, key_index, mask,
                 ln1, ln2, attn, router, bias, w13, w2, gate_up, down, shared_gate) -> torch.Tensor:
    """One decoder layer for one new token per sequence: x [B, D] -> [B, D]; k_cache/v_cache
    [slots, KV, hd] get the tokens' keys and values at `slot` [B] (MLA: k_cache [slots, 1, R + dr]
    gets the latent rows, v_cache is its view). key_index [B * KV * L] are rows of the cache viewed
    as [slots * KV, hd] (AttentionMetadata.key_index), mask [B * KV, 1, L] the additive decode
    mask, cos/sin [B, 1, rope dim]; attn the attention's weights (_attention, _mla_attention). MoE
    layers pass router [E, D], bias (or None), w13 [E, 2I, D], w2 [E, D, I] and, for a shared
    expert, gate_up/down (and shared_gate [1, D] or None); dense layers gate_up/down only."""
    x = _attention(shape, x, cos, sin, k_cache, v_cache, slot, key_index, mask, ln1, attn)
    h = rms_norm(x, ln2, shape.eps)
    if shape.routing is None:
        return x + _mlp(h, gate_up, down)
    weights, ids = route(_proj(h, router), shape.routing, bias)  # [B, K]
    # each token's chosen experts' rows read through their ids inside the reduction (no copy)
    g = (w13[ids] * h[:, None, None, :]).sum(-1)  # [B, K, 2I]
    i = w2.shape[2]
    y = (w2[ids] * (F.silu(g[..., :i]) * g[..., i:])[:, :, None, :]).sum(-1)  # [B, K, D]
    # each weighted row rounded to x's dtype, summed in float32, rounded once (compute._combine)
    out = (y * weights[..., None]).to(x.dtype).float().sum(1).to(x.dtype)
    if gate_up is not None:
        shared = _mlp(h, gate_up, down)
        if shared_gate is not None:
            shared = torch.sigmoid(_proj(h, shared_gate)) * shared
        out = out + shared
    return x + out


def _weight(module):
    return module.weight if module is not None else None


def _bias(module):
    return module.bias if module is not None else None


def _attention_weights(attn) -> tuple:
    """The `attn` tuple _attention takes, from a layer's attention module."""
    if attn.spec.mla is None:
        return (attn.qkv_proj.weight, attn.qkv_proj.bias, _weight(getattr(attn, "q_norm", None)),
                _weight(getattr(attn, "k_norm", None)), attn.o_proj.weight)
    q, q_a = getattr(attn, "q_proj", None), getattr(attn, "q_a_proj", None)
    w_uk, w_uv = attn._w_kv()
    return (_weight(q), _weight(q_a), _bias(q_a), _weight(getattr(attn, "q_a_layernorm", None)),
            _weight(getattr(attn, "q_b_proj", None)), attn.kv_a_proj_with_mqa.weight, attn.kv_a_proj_with_mqa.bias,
            attn.kv_a_layernorm.weight, w_uk, w_uv, attn.o_proj.weight, attn.o_proj.bias)


_copies = itertools.count()


def _own_code(fn):
    """fn with a code object of its own, under a name of its own: dynamo keeps compiled graphs, and
    counts them against its recompile limit (8), per code object, and it remembers which sizes
    changed between calls (automatic dynamic shapes) per code name and line. Each model's graphs
    thereby live apart from another model's in the same process (a benchmark's sides, a test
    session): with a shared name, a second model's weights, whose sizes differ from the first's,
    would compile as dynamic sizes, into slower and differently rounded loops."""
    name = f"{fn.__name__}_{next(_copies)}"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


class CompiledDecode:
    """The compiled decode_layer and the per-layer arguments it takes, for one model."""

    def __init__(self, model) -> None:
        spec = model.spec
        self.model = model
        # dynamic=None: only what maybe_mark_dynamic marks (the batch, the key count) is symbolic.
        # Not fullgraph: past dynamo's recompile limit a fullgraph function fails hard, a plain one
        # runs eagerly (the same arithmetic); tests hold the graph counts, so a graph break shows.
        self.fn = torch.compile(_own_code(decode_layer), dynamic=None)
        routing = spec.moe.routing
        self.shapes = [LayerShape(spec.attention, spec.rms_norm_eps, routing if kind == "moe" else None)
                       for kind in spec.layer_kinds]
        self.windows = [getattr(layer.self_attn, "window", None) for layer in model.layers]  # MLA: none
        w = model.lm_head.weight
        self.runs_here = w.dtype in DTYPES and w.device.type == "cpu"  # the model's dtype and device
        self.max_rows = rows_limit(spec.bytes_per_expert(w.element_size()), routing.top_k, last_level_cache_bytes(),
                                   MAX_ROWS.get(w.dtype, 1))
        self._weights: tuple[tuple, list[tuple]] | None = None  # (the stacks they hold, per layer weights)

    def eligible(self, x: torch.Tensor, meta: AttentionMetadata, kv_caches) -> bool:
        """This forward is 1 to max_rows decode tokens on the CPU in one of DTYPES, with nothing
        that needs the eager MoE block (see the module docstring)."""
        return (x.shape[0] <= self.max_rows and kv_caches is not None and meta.has_decode
                and not meta.prefill_lens and meta.slot_mapping is not None and self.applies())

    def applies(self) -> bool:
        """The model's side of `eligible`: one of DTYPES on the CPU, and nothing installed needs the
        eager MoE block (routing observers or a forecaster, dynamic top-k, another expert compute or
        dispatcher, an expert cache or quantized stacks)."""
        ctx = self.model.moe_ctx
        store = ctx.store
        return (self.runs_here and not ctx.hub.active and ctx.dynamic_topk is None and ctx.compute is torch_experts
                and type(ctx.dispatcher) is LocalDispatcher
                and type(store) is ResidentExpertStore and store.slot_of is None
                and self._layer_weights(store) is not None)

    def warm_batches(self, max_num_seqs: int) -> list[int]:
        """A decode batch size for each graph a layer kind compiles, up to max_num_seqs: one token,
        2..ROW_REDUCTION_MAX_ROWS, and above (while within max_rows)."""
        top = min(self.max_rows, max_num_seqs)
        return [b for b in (1, 2, ROW_REDUCTION_MAX_ROWS + 1) if b <= top]

    def _layer_weights(self, store: ResidentExpertStore) -> list[tuple] | None:
        """decode_layer's weight arguments of every layer, gathered again only when the expert
        stacks change (the engine may swap the store or its stacks; the model's own parameters
        stay); None when a stack is not a plain tensor (quantized, mixed widths)."""
        stacks = (*store.w13, *store.w2)
        if self._weights is not None and all(a is b for a, b in zip(self._weights[0], stacks)):
            return self._weights[1]
        if not all(type(w) is torch.Tensor for w in stacks):
            return None
        out = []
        for layer, shape in zip(self.model.layers, self.shapes):
            mlp = layer.mlp
            dense = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                     _attention_weights(layer.self_attn))
            if shape.routing is None:
                moe = (None, None, None, None, mlp.gate_up_proj.weight, mlp.down_proj.weight, None)
            else:
                shared, sg = mlp.shared_expert, mlp.shared_expert_gate
                moe = (mlp.gate.weight, mlp.e_score_correction_bias, store.w13[mlp.moe_index],
                       store.w2[mlp.moe_index],
                       shared.gate_up_proj.weight if shared is not None else None,
                       shared.down_proj.weight if shared is not None else None,
                       _weight(sg))
            out.append(dense + moe)
        self._weights = (stacks, out)
        return out

    def __call__(self, x: torch.Tensor, meta: AttentionMetadata, kv_caches: list[LayerKV]) -> torch.Tensor:
        """Every layer for the decode tokens x [B, D] -> [B, D] (before the final norm)."""
        cos, sin, slot = meta.rope[0], meta.rope[1], meta.slot_mapping
        for t in (x, cos, sin, slot):  # B; what each layer returns inherits it
            torch._dynamo.maybe_mark_dynamic(t, 0)
        weights = self._layer_weights(self.model.moe_ctx.store)
        steps: dict = {}  # (KV, window) -> this step's key index and mask, marked dynamic in B and L
        for i, kv in enumerate(kv_caches):
            KV, window = kv.k.shape[1], self.windows[i]
            keys = steps.get((KV, window))
            if keys is None:
                keys = steps[KV, window] = (meta.key_index(KV), meta.decode_mask(window, x.dtype, KV))
                torch._dynamo.maybe_mark_dynamic(keys[0], 0)
                torch._dynamo.maybe_mark_dynamic(keys[1], 0)
                torch._dynamo.maybe_mark_dynamic(keys[1], 2)
            x = self.fn(self.shapes[i], x, cos, sin, kv.k, kv.v, slot, *keys, *weights[i])
        return x
