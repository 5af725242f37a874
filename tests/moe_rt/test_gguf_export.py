"""The GGUF file the llama.cpp decode baseline runs: the same weights as the checkpoint, in the
layout llama.cpp reads (expert stacks, rotary row order), and the bench's baseline plumbing."""
import importlib
import json

import numpy as np
import pytest
import torch

from moe_rt.checkpoint import CheckpointReader
from moe_rt.loader import load_spec
from moe_rt_app.bench.decode import agreement
from moe_rt_app.bench.gguf_export import _interleave_rope_rows, export_gguf
from moe_rt_app.cli.main import main
from tests.checkpoints import write_checkpoint

gguf = pytest.importorskip("gguf")


def _rope_half(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """HF's rotary: pairs (i, i + d/2) of each head row x [heads, d]."""
    d = x.shape[-1]
    f = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * f.cos() - b * f.sin(), b * f.cos() + a * f.sin()], dim=-1)


def _rope_pairs(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """llama.cpp's rotary for the llama architecture: pairs (2i, 2i+1)."""
    d = x.shape[-1]
    f = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * f.cos() - b * f.sin(), b * f.cos() + a * f.sin()], dim=-1).flatten(-2)


def test_rope_row_order_keeps_attention_scores():
    """q.k after rotary is the same whether HF's rows rotate in halves or the reordered rows
    rotate in pairs: the reordering is exactly what makes llama.cpp compute HF's attention."""
    g = torch.Generator().manual_seed(0)
    heads, d, D = 3, 8, 12
    wq = torch.randn(heads * d, D, generator=g, dtype=torch.float64)
    wk = torch.randn(heads * d, D, generator=g, dtype=torch.float64)
    x, y = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    hf = (_rope_half((wq @ x).view(heads, d), 5, 1e4) * _rope_half((wk @ y).view(heads, d), 2, 1e4)).sum(-1)
    pq, pk = _interleave_rope_rows(wq, heads), _interleave_rope_rows(wk, heads)
    ll = (_rope_pairs((pq @ x).view(heads, d), 5, 1e4) * _rope_pairs((pk @ y).view(heads, d), 2, 1e4)).sum(-1)
    torch.testing.assert_close(ll, hf)
    assert not torch.equal(pq, wq)  # the test would pass vacuously on an identity reordering


def test_export_writes_every_weight_in_llama_cpp_layout(tmp_path):
    model = write_checkpoint(tmp_path / "m", "mixtral")
    spec, reader = load_spec(model), CheckpointReader(model)
    path = export_gguf(model, tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in r.fields.values()}

    def scalar(name):
        f = fields[name]
        return f.parts[f.data[0]][0]

    assert scalar("llama.block_count") == spec.num_layers
    assert scalar("llama.expert_count") == spec.num_experts
    assert scalar("llama.expert_used_count") == spec.top_k
    assert scalar("llama.attention.head_count_kv") == spec.attention.num_kv_heads
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    I = spec.moe.intermediate_size
    for l in range(spec.num_layers):
        w13, w2 = zip(*(reader.read_expert(spec, l, e) for e in range(spec.num_experts)))
        w13 = torch.stack(w13).float().numpy()
        np.testing.assert_array_equal(tensors[f"blk.{l}.ffn_gate_exps.weight"], w13[:, :I])
        np.testing.assert_array_equal(tensors[f"blk.{l}.ffn_up_exps.weight"], w13[:, I:])
        np.testing.assert_array_equal(tensors[f"blk.{l}.ffn_down_exps.weight"], torch.stack(w2).float().numpy())
        q = reader.get(f"model.layers.{l}.self_attn.q_proj.weight")
        np.testing.assert_array_equal(tensors[f"blk.{l}.attn_q.weight"],
                                      _interleave_rope_rows(q, spec.attention.num_heads).float().numpy())
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == spec.vocab_size
    assert not (tmp_path / "m.gguf.partial").exists()


def test_export_refuses_other_architectures(tmp_path, capsys):
    from moe_rt.errors import MoeRtError

    model = write_checkpoint(tmp_path / "q", "qwen2_moe")
    with pytest.raises(MoeRtError, match="Mixtral-architecture"):
        export_gguf(model, tmp_path / "q.gguf")


def test_agreement_counts_tokens_before_the_first_divergence():
    assert agreement([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 9, 6]]) == pytest.approx(4 / 6)


def test_bench_skips_llama_cpp_in_one_line_when_missing(tmp_path, capsys, monkeypatch):
    from moe_rt_app.bench import llama_cpp

    monkeypatch.setattr(llama_cpp, "available", lambda: "llama.cpp baseline skipped: llama_cpp not installed")
    argv = ["bench", "decode", "--synthetic", "mixtral-tiny", "--cache-dir", str(tmp_path), "--batch-sizes", "1",
            "--max-tokens", "3", "--prompt-len", "4", "--repeats", "1", "--baselines", "llama.cpp", "--json"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert cap.err.count("llama.cpp baseline skipped") == 1
    row = json.loads(cap.out[cap.out.index("{"):])["results"][0]
    assert "llama_cpp_tok_s" not in row and "hf_tok_s" not in row
    assert main(argv[:-3] + ["--baselines", "vllm"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_decodes_the_same_greedy_tokens(tmp_path, capsys):
    argv = ["bench", "decode", "--synthetic", "mixtral-tiny", "--cache-dir", str(tmp_path), "--batch-sizes", "1,3",
            "--max-tokens", "6", "--prompt-len", "5", "--repeats", "1", "--baselines", "llama.cpp",
            "--gguf-dir", str(tmp_path / "gguf"), "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for row in json.loads(out[out.index("{"):])["results"]:
        assert row["llama_cpp_tok_s"] > 0
        assert row["ratio_llama_cpp"] == pytest.approx(row["moe_rt_tok_s"] / row["llama_cpp_tok_s"])
        assert row["llama_cpp_agree"] == 1.0  # same fp32 weights, same greedy tokens
