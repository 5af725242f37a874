"""Loading: bad folders give one-line errors; dtypes; the CLI."""
import json
import shutil

import pytest
import torch

from moe_rt_app import LLM, MoeRtError
from moe_rt_app.cli.main import main
from moe_rt.loader import load_model


@pytest.fixture
def copy_dir(mixtral_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(mixtral_dir, d)
    return d


def test_unsupported_architecture(copy_dir):
    cfg = json.loads((copy_dir / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (copy_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoeRtError, match="unsupported architecture GPT2LMHeadModel"):
        load_model(copy_dir)


def test_deepseek_config_without_mla_fields_refused_clearly(copy_dir):
    cfg = json.loads((copy_dir / "config.json").read_text())
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    (copy_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoeRtError, match="^config.json of DeepseekV3ForCausalLM lacks 'qk_nope_head_dim'$"):
        load_model(copy_dir)


def test_missing_tensor_and_shape_mismatch(copy_dir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(copy_dir / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    bad = dict(tensors)
    del bad[name]
    save_file(bad, copy_dir / "model.safetensors")
    with pytest.raises(MoeRtError, match=f"tensor '{name}' is missing"):
        load_model(copy_dir)
    bad = dict(tensors)
    bad[name] = torch.zeros(3, 3)
    save_file(bad, copy_dir / "model.safetensors")
    with pytest.raises(MoeRtError, match=r"has shape \(3, 3\), expected"):
        load_model(copy_dir)


def test_missing_config_and_bad_json(tmp_path, copy_dir):
    with pytest.raises(MoeRtError, match="no config.json"):
        load_model(tmp_path)
    (copy_dir / "config.json").write_text("{not json")
    with pytest.raises(MoeRtError, match="not valid JSON"):
        load_model(copy_dir)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_fp32(mixtral_dir, mixtral_llm, dtype):
    llm = LLM(mixtral_dir, dtype=dtype, device="cpu", progress=False)
    assert llm.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    ids = llm.tokenizer.encode("In the beginning God created the heaven")
    lo, hi = llm.prompt_logits(ids), mixtral_llm.prompt_logits(ids)
    assert (lo - hi).abs().max() < 0.05 * hi.abs().max()


def test_cli_generate_info_and_errors(mixtral_dir, capsys):
    assert main(["generate", "--model", str(mixtral_dir), "--prompt", "In the", "--max-tokens", "4",
                 "--temperature", "0", "--dtype", "float32", "--device", "cpu", "--no-stream"]) == 0
    assert main(["info", "--model", str(mixtral_dir), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{"):])
    assert info["experts_per_layer"] == 8 and info["bytes_per_expert"] == 3 * 64 * 96 * 4
    for argv, msg in [
        (["generate", "--model", "/no/such/dir", "--prompt", "x"], "does not exist"),
        (["generate", "--model", str(mixtral_dir), "--prompt", "x", "--top-p", "2"], "--top-p"),
        (["generate", "--model", str(mixtral_dir), "--prompt", "x", "--device", "tpu"], "device"),
        (["frobnicate"], "unknown command"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
