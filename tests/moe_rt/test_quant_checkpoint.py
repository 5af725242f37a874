"""Quantized checkpoints: block-scaled FP8 read and dequantised at load (against numpy), and
quantization methods moe-rt does not read refused in one line."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints import write_checkpoint
from moe_rt_app import LLM
from moe_rt_app.cli.main import main
from moe_rt.errors import MoeRtError
from moe_rt.quant.checkpoint import dequantize_fp8

FP8_MAX = 448.0  # largest float8_e4m3fn


def np_dequantize(w_fp8: torch.Tensor, scale_inv: torch.Tensor, bn: int, bk: int) -> np.ndarray:
    """One block at a time, the way the format is written down."""
    w = w_fp8.float().numpy()
    s = scale_inv.numpy()
    out = np.empty_like(w)
    for i in range(0, w.shape[0], bn):
        for j in range(0, w.shape[1], bk):
            out[i:i + bn, j:j + bk] = w[i:i + bn, j:j + bk] * s[i // bn, j // bk]
    return out


def fp8_quantize(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-style: scale_inv = amax(block) / 448 per block, w / scale_inv cast to e4m3."""
    N, K = w.shape
    s = torch.empty(-(-N // bn), -(-K // bk))
    q = torch.empty(N, K, dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].float()
            s[i, j] = blk.abs().max().clamp(min=1e-12) / FP8_MAX
            q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


@pytest.mark.parametrize("shape", [(200, 300), (128, 256), (5, 7)])
def test_dequantize_matches_numpy_with_partial_edge_blocks(shape):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(shape, generator=g) * 100).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    s = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128), generator=g)
    got = dequantize_fp8(w, s, (128, 128), "x.weight")
    np.testing.assert_array_equal(got.numpy(), np_dequantize(w, s, 128, 128))


def test_scale_of_the_wrong_shape_is_named():
    w = torch.zeros(200, 300, dtype=torch.float8_e4m3fn)
    with pytest.raises(MoeRtError, match=r"'x.weight_scale_inv' has shape \(1, 3\), expected \(2, 3\)"):
        dequantize_fp8(w, torch.ones(1, 3), (128, 128), "x.weight")


def _quantized(name: str) -> bool:
    # as DeepSeek-V3 ships: linear layers in fp8; embeddings, norms, the router and lm_head not
    return name.endswith("proj.weight") or (".experts." in name and name.endswith(".weight"))


@pytest.fixture(scope="module")
def fp8_pair(tmp_path_factory):
    """(fp8 folder, the same weights dequantised by numpy and saved in float32): intermediate 160
    = one full 128 block and one partial one; hidden 64 = one partial block."""
    src = write_checkpoint(tmp_path_factory.mktemp("full"), "mixtral", intermediate_size=160)
    fp8_dir, ref_dir = tmp_path_factory.mktemp("fp8"), tmp_path_factory.mktemp("dequantised")
    for d in (fp8_dir, ref_dir):
        for f in src.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, d / f.name)
    fp8, ref = {}, {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if _quantized(name):
            q, s = fp8_quantize(t, 128, 128)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            ref[name] = torch.from_numpy(np_dequantize(q, s, 128, 128))
        else:
            fp8[name] = ref[name] = t
    assert any(t.dtype == torch.float8_e4m3fn for t in fp8.values())
    save_file(fp8, str(fp8_dir / "model.safetensors"))
    save_file(ref, str(ref_dir / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    return fp8_dir, ref_dir


def test_fp8_checkpoint_loads_as_its_dequantised_weights(fp8_pair):
    fp8_dir, ref_dir = fp8_pair
    ids = list(range(3, 30))
    a = LLM(fp8_dir, dtype="float32", progress=False)
    b = LLM(ref_dir, dtype="float32", progress=False)
    torch.testing.assert_close(a.prompt_logits(ids), b.prompt_logits(ids), rtol=1e-6, atol=1e-6)
    # the loaded expert weights are the numpy dequantisation, exactly
    ref = load_file(str(ref_dir / "model.safetensors"))
    got = a.model.moe_ctx.store.w2[0][3]
    torch.testing.assert_close(got, ref["model.layers.0.block_sparse_moe.experts.3.w2.weight"], rtol=0, atol=0)


def test_fp8_checkpoint_with_quantized_experts_and_bf16(fp8_pair):
    fp8_dir, _ = fp8_pair
    llm = LLM(fp8_dir, dtype="bfloat16", progress=False, expert_bits=8)
    assert llm.model.lm_head.weight.dtype == torch.bfloat16
    assert torch.isfinite(llm.prompt_logits([3, 4, 5])).all()


def test_info_counts_fp8_weights_not_their_scales(fp8_pair, capsys):
    from moe_rt_app.cli.info import model_info

    fp8_dir, ref_dir = fp8_pair
    fp8, ref = model_info(str(fp8_dir)), model_info(str(ref_dir))
    assert (fp8["quantization"], ref["quantization"]) == ("fp8 block 128x128", "none")
    for key in ("parameters_total", "parameters_experts", "parameters_active_per_token"):
        assert fp8[key] == ref[key], key
    assert ref["parameters_experts"] == 2 * 8 * 3 * 64 * 160
    # one byte per weight plus the float32 block scales: w1, w3 [160, 64] and w2 [64, 160] have 2 each
    assert fp8["bytes_per_expert"] == 3 * 64 * 160 + 3 * 2 * 4
    assert ref["bytes_per_expert"] == 3 * 64 * 160 * 4
    assert fp8["checkpoint_dtype_bytes"] == 4  # the unquantized tensors' float32, not fp8's byte
    assert main(["info", "--model", str(fp8_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["quantization", "fp8", "block", "128x128"]


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "compressed-tensors"])
def test_unsupported_quantization_method_is_one_line(mixtral_dir, tmp_path, method, capsys):
    d = tmp_path / method
    shutil.copytree(mixtral_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoeRtError, match=f"quantization method '{method}' is not supported"):
        LLM(d, progress=False)
    capsys.readouterr()
    assert main(["generate", "--model", str(d), "--prompt", "x"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"quantization method '{method}' is not supported" in lines[0], lines


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, "fp8 format 'e5m2'"),
    ({"quant_method": "fp8"}, "fp8 without weight_block_size"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size must be two positive integers"),
])
def test_fp8_variants_not_read_are_refused(mixtral_dir, tmp_path, qc, message):
    d = tmp_path / "m"
    shutil.copytree(mixtral_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    with pytest.raises(MoeRtError, match=message):
        LLM(d, progress=False)
