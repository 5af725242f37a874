"""Write a Mixtral-shaped Hugging Face checkpoint as a GGUF file llama.cpp loads (`llama` arch with
experts), so `bench decode --baselines llama.cpp` times llama.cpp on the very weights moe-rt runs.

Written with the `gguf` package (llama.cpp's own writer library), from moe-rt's checkpoint reader,
so any checkpoint moe-rt reads as Mixtral works, whatever its tokenizer: llama.cpp's converter
script refuses tokenizers it does not recognise (e.g. the word-level vocabulary of the synthetic
benchmark models), while the bench feeds token ids and never tokenizes text. The vocabulary is
written as a byte-level BPE ("gpt2") list with the tokenizer's merges (none for word-level ones).

Layout facts the file must follow (llama.cpp's llama architecture):
- GGUF lists a tensor's dims fastest-first; the writer reverses numpy's shape, so a numpy array
  of HF's [out, in] layout is what llama.cpp expects, and expert stacks are numpy [E, out, in].
- llama.cpp rotates query/key pairs (2i, 2i+1) within a head, HF rotates (i, i + d/2): every
  head's rows of q_proj and k_proj are reordered so the two agree (`_interleave_rope_rows`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from moe_rt.errors import MoeRtError

_FILE_TYPES = {"float32": 0, "float16": 1}  # GGUF general.file_type: all F32 / mostly F16


def _interleave_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection [heads * d, in] from HF's half-split rotary order to llama.cpp's
    pairwise one: within each head, row i (first half) and row i + d/2 become rows 2i and 2i+1."""
    rows = w.shape[0]
    d = rows // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[str], list[int]]:
    """(tokens by id, merges, token types) from tokenizer.json; ids the tokenizer leaves out are
    filled with placeholder tokens so the list covers the embedding table."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise MoeRtError(f"{model_dir} has no tokenizer.json (the GGUF file carries the vocabulary)")
    tok = json.loads(path.read_text())
    vocab = dict(tok["model"].get("vocab") or {})
    for added in tok.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # 5: unused
    special = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    for text, i in vocab.items():
        if 0 <= i < vocab_size:
            tokens[i] = text
            types[i] = 3 if i in special else 1  # 3: control, 1: normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    if not merges:  # llama.cpp requires the list; one merge it never applies (ids are fed, not text)
        merges = [f"{tokens[0]} {tokens[0]}"]
    return tokens, merges, types


def export_gguf(model_dir: str | Path, out_path: str | Path, dtype: str = "float32") -> Path:
    """Write `model_dir` (a Mixtral-architecture checkpoint) to `out_path` with float weights in
    `dtype` (float32 or float16; norms and routers stay float32, as llama.cpp's converter keeps
    them); returns out_path. Written under a temporary name and renamed when complete."""
    try:
        import gguf
    except ImportError:
        raise MoeRtError("writing a GGUF file needs the gguf package (pip install gguf)") from None
    from moe_rt.checkpoint import CheckpointReader
    from moe_rt.loader import load_spec

    if dtype not in _FILE_TYPES:
        raise MoeRtError(f"GGUF export takes float32 or float16, got {dtype}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    spec = load_spec(model_dir)
    a = spec.attention
    if (spec.architecture != "MixtralForCausalLM" or a.mla is not None or a.qkv_bias
            or a.qk_norm != "none" or a.yarn is not None or set(spec.layer_kinds) != {"moe"}):
        raise MoeRtError(f"GGUF export covers Mixtral-architecture checkpoints only, not {spec.architecture}")
    reader = CheckpointReader(model_dir)
    wdtype = np.float32 if dtype == "float32" else np.float16

    def arr(t: torch.Tensor, keep_fp32: bool = False) -> np.ndarray:
        return t.float().numpy().astype(np.float32 if keep_fp32 else wdtype)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(model_dir.name)
    w.add_file_type(_FILE_TYPES[dtype])
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_block_count(spec.num_layers)
    w.add_feed_forward_length(spec.moe.intermediate_size)
    w.add_head_count(a.num_heads)
    w.add_head_count_kv(a.num_kv_heads)
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_rope_dimension_count(a.head_dim)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_expert_count(spec.num_experts)
    w.add_expert_used_count(spec.top_k)
    w.add_vocab_size(spec.vocab_size)
    tokens, merges, types = _vocab(model_dir, spec.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if spec.bos_token_id is not None:
        w.add_bos_token_id(spec.bos_token_id)
    if spec.eos_token_ids:
        w.add_eos_token_id(spec.eos_token_ids[0])
    w.add_add_bos_token(False)

    w.add_tensor("token_embd.weight", arr(reader.get("model.embed_tokens.weight")))
    w.add_tensor("output_norm.weight", arr(reader.get("model.norm.weight"), keep_fp32=True))
    if not spec.tie_word_embeddings:  # tied: llama.cpp reuses token_embd
        w.add_tensor("output.weight", arr(reader.get("lm_head.weight")))
    I = spec.moe.intermediate_size
    for i in range(spec.num_layers):
        p, b = f"model.layers.{i}", f"blk.{i}"
        w.add_tensor(f"{b}.attn_norm.weight", arr(reader.get(f"{p}.input_layernorm.weight"), keep_fp32=True))
        w.add_tensor(f"{b}.ffn_norm.weight", arr(reader.get(f"{p}.post_attention_layernorm.weight"), keep_fp32=True))
        w.add_tensor(f"{b}.attn_q.weight", arr(_interleave_rope_rows(reader.get(f"{p}.self_attn.q_proj.weight"), a.num_heads)))
        w.add_tensor(f"{b}.attn_k.weight", arr(_interleave_rope_rows(reader.get(f"{p}.self_attn.k_proj.weight"), a.num_kv_heads)))
        w.add_tensor(f"{b}.attn_v.weight", arr(reader.get(f"{p}.self_attn.v_proj.weight")))
        w.add_tensor(f"{b}.attn_output.weight", arr(reader.get(f"{p}.self_attn.o_proj.weight")))
        w.add_tensor(f"{b}.ffn_gate_inp.weight", arr(reader.get(f"{p}.{spec.moe_weight_prefix}.gate.weight"), keep_fp32=True))
        l = spec.moe_layer_ids.index(i)
        pairs = [reader.read_expert(spec, l, e) for e in range(spec.num_experts)]
        w13 = torch.stack([x[0] for x in pairs])  # [E, 2I, D]: gate rows, then up rows
        w.add_tensor(f"{b}.ffn_gate_exps.weight", arr(w13[:, :I]))
        w.add_tensor(f"{b}.ffn_up_exps.weight", arr(w13[:, I:]))
        w.add_tensor(f"{b}.ffn_down_exps.weight", arr(torch.stack([x[1] for x in pairs])))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out_path)
    return out_path
