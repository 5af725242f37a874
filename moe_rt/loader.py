"""Build a model from a Hugging Face checkpoint folder: spec, non-expert weights, expert store."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from moe_rt.errors import MoeRtError

from .checkpoint import CheckpointReader, read_config
from .layers.moe.block import MoEBlock, MoEContext
from .layers.moe.store import ResidentExpertStore
from .layers.rotary import RotaryEmbedding
from .models.model import MoEForCausalLM
from .models.registry import parse_config
from .models.spec import ModelSpec
from .quant.experts import quantize_experts
from .quant.mixed import group_by_width, stack_by_width
from .quant.plan import BitsPlan


def load_spec(model_dir: str | Path) -> ModelSpec:
    hf = read_config(model_dir)
    try:
        return parse_config(hf)
    except MoeRtError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:  # a field of the wrong kind
        raise MoeRtError(f"{Path(model_dir) / 'config.json'} is malformed: {type(e).__name__}: {e}") from None


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
    *,
    load_experts: bool = True,
    progress: bool = True,
    expert_bits: int | None = None,
    expert_group_size: int = 64,
    expert_bits_plan: BitsPlan | None = None,
) -> tuple[MoEForCausalLM, CheckpointReader]:
    """Returns the model (in eval mode) and the open checkpoint reader.

    With load_experts=False the experts stay on disk and the caller installs its own store
    (an expert cache) into model.moe_ctx.store. With expert_bits (8 or 4) the resident routed
    experts are quantized from the checkpoint's values (moe_rt/quant/experts.py); every other
    weight keeps `dtype`. With expert_bits_plan each layer's experts take the plan's widths
    (moe_rt/quant/plan.py), permuted so that each width's slots are contiguous (a MixedStack).
    """
    spec = load_spec(model_dir)
    reader = CheckpointReader(model_dir)
    try:
        with torch.device("meta"):
            model = MoEForCausalLM(spec, MoEContext())
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. config.json sizes of the wrong type
        raise MoeRtError(f"cannot build the model that {Path(model_dir) / 'config.json'} describes: "
                         f"{type(e).__name__}: {e}") from None
    model.to_empty(device=device)
    model.to(dtype)
    _keep_routers_fp32(model)
    if spec.tie_word_embeddings:  # to_empty gives every parameter its own storage: tie again
        model.lm_head.weight = model.embed_tokens.weight
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset(device)
    layers = tqdm(range(spec.num_layers), desc="Loading weights", disable=not progress, leave=False)
    with torch.no_grad():
        _copy(model.embed_tokens.weight, reader, "model.embed_tokens.weight")
        _copy(model.norm.weight, reader, "model.norm.weight")
        if not spec.tie_word_embeddings:
            _copy(model.lm_head.weight, reader, "lm_head.weight")
        for i in layers:
            _load_layer(model, spec, reader, i)
        if load_experts:
            plan = expert_bits_plan
            if plan is not None:  # the plan's ranges need the model
                plan.check_model(len(spec.moe_layer_ids), spec.num_experts)
            w13, w2, slot_of = [], [], []
            for l in range(len(spec.moe_layer_ids)):
                pairs = [reader.read_expert(spec, l, e) for e in range(spec.num_experts)]
                if plan is not None:
                    groups, slots = group_by_width(plan.widths(l, spec.num_experts))
                    slot_of.append(torch.tensor(slots, device=device))
                for out, i in ((w13, 0), (w2, 1)):
                    w = torch.stack([p[i] for p in pairs]).to(device=device)
                    if plan is not None:
                        out.append(stack_by_width(w, groups, plan.group_size or expert_group_size, dtype))
                    elif expert_bits is None:
                        out.append(w.to(dtype))
                    else:  # from the checkpoint's values, not from their rounding to dtype
                        out.append(quantize_experts(w, expert_bits, expert_group_size, dtype))
            model.moe_ctx.store = ResidentExpertStore(w13, w2, slot_of or None)
    model.eval()
    return model, reader


def _keep_routers_fp32(model: MoEForCausalLM) -> None:
    """Routers whose spec scores in float32 (DeepSeek) also store their gate weight and correction
    bias in float32 whatever the model dtype, as transformers does: rounding either to bf16 flips
    near-tied expert choices. Done before loading so the checkpoint's values arrive unrounded."""
    for m in model.modules():
        if isinstance(m, MoEBlock) and m.spec.routing.logits_fp32:
            m.gate.float()
            if m.e_score_correction_bias is not None:
                m.e_score_correction_bias = m.e_score_correction_bias.float()


def _copy(param: torch.Tensor, reader: CheckpointReader, name: str) -> None:
    param.copy_(reader.get_shaped(name, tuple(param.shape)))


def _load_layer(model: MoEForCausalLM, spec: ModelSpec, reader: CheckpointReader, i: int) -> None:
    layer = model.layers[i]
    p = f"model.layers.{i}"
    _copy(layer.input_layernorm.weight, reader, f"{p}.input_layernorm.weight")
    _copy(layer.post_attention_layernorm.weight, reader, f"{p}.post_attention_layernorm.weight")
    attn = layer.self_attn
    a = spec.attention
    if a.mla is not None:  # MLAttention names its parameters after the HF tensors
        for name, param in attn.named_parameters():
            _copy(param, reader, f"{p}.self_attn.{name}")
    else:
        _load_attention(attn, a, reader, p)
    mlp = layer.mlp
    if isinstance(mlp, MoEBlock):
        mp = f"{p}.{spec.moe_weight_prefix}"
        _copy(mlp.gate.weight, reader, f"{mp}.gate.weight")
        if mlp.e_score_correction_bias is not None:
            _copy(mlp.e_score_correction_bias, reader, f"{mp}.gate.e_score_correction_bias")
        if mlp.shared_expert is not None:
            sname = "shared_expert" if reader.has(f"{mp}.shared_expert.up_proj.weight") else "shared_experts"
            _load_dense(mlp.shared_expert, reader, f"{mp}.{sname}")
            if mlp.shared_expert_gate is not None:
                _copy(mlp.shared_expert_gate.weight, reader, f"{mp}.shared_expert_gate.weight")
    else:
        _load_dense(mlp, reader, f"{p}.mlp")


def _load_attention(attn, a, reader: CheckpointReader, p: str) -> None:
    """Standard attention: q/k/v fused into qkv_proj."""
    sizes = [a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]
    for part in ("weight", "bias") if a.qkv_bias else ("weight",):
        chunks = getattr(attn.qkv_proj, part).split(sizes, dim=0)
        for chunk, name in zip(chunks, ("q_proj", "k_proj", "v_proj")):
            _copy(chunk, reader, f"{p}.self_attn.{name}.{part}")
    _copy(attn.o_proj.weight, reader, f"{p}.self_attn.o_proj.weight")
    if a.qk_norm != "none":
        _copy(attn.q_norm.weight, reader, f"{p}.self_attn.q_norm.weight")
        _copy(attn.k_norm.weight, reader, f"{p}.self_attn.k_norm.weight")


def _load_dense(mlp, reader: CheckpointReader, prefix: str) -> None:
    gate, up = mlp.gate_up_proj.weight.chunk(2, dim=0)
    _copy(gate, reader, f"{prefix}.gate_proj.weight")
    _copy(up, reader, f"{prefix}.up_proj.weight")
    _copy(mlp.down_proj.weight, reader, f"{prefix}.down_proj.weight")


def check_model_dir(model_dir: str | Path) -> None:
    """Raise a one-line MoeRtError if the folder cannot be served (used by the CLI before heavy work)."""
    load_spec(model_dir)
    CheckpointReader(model_dir)
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise MoeRtError(f"{model_dir} has no tokenizer.json")
