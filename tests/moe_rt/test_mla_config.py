"""DeepSeek config parsing without a model: YaRN frequencies and scales against transformers' own
functions, one-line refusals (other rope types, quantized weights, missing MLA fields, --ep) and
what `moe-rt info` reports for an MLA checkpoint."""
import pytest
import torch

from checkpoints import hf_config, write_checkpoint
from moe_rt import MoeRtError
from moe_rt.layers import yarn
from moe_rt.models.deepseek import mla_attention, yarn_spec
from moe_rt.models.registry import parse_config

# DeepSeek-V2-Lite's real rope settings, then variants that exercise every branch of the YaRN formulas.
V2_LITE_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
YARNS = {
    "v2-lite": V2_LITE_YARN,
    "unequal-mscale": {**V2_LITE_YARN, "mscale": 1.0, "mscale_all_dim": 0.8},
    "no-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512},
    "no-truncate-betas": {**V2_LITE_YARN, "truncate": False, "beta_fast": 16, "beta_slow": 2},
    "explicit-attention-factor": {**V2_LITE_YARN, "attention_factor": 1.3},
}


def ds_config(family: str = "deepseek_v3", **over):
    cfg = hf_config(family, 320, **over)
    hf = cfg.to_dict()
    hf["architectures"] = ["DeepseekV3ForCausalLM" if family == "deepseek_v3" else "DeepseekV2ForCausalLM"]
    return cfg, hf


@pytest.mark.parametrize("name", list(YARNS))
def test_yarn_frequencies_and_scales_match_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    cfg, hf = ds_config(rope_scaling=dict(YARNS[name]), qk_rope_head_dim=64, qk_nope_head_dim=128,
                        max_position_embeddings=163840)
    ref_inv_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    theta, y = yarn_spec(hf)
    assert torch.equal(yarn.inv_freq(64, theta, y), ref_inv_freq)
    assert yarn.attention_factor(y) == pytest.approx(ref_factor, rel=1e-12)
    ref_scale = DeepseekV3Attention(cfg, 0).scaling
    assert mla_attention(hf, v3=True).mla.softmax_scale == pytest.approx(ref_scale, rel=1e-12)


def test_rope_table_is_scaled_by_the_attention_factor():
    from moe_rt.layers.rotary import RotaryEmbedding

    _, hf = ds_config(rope_scaling=YARNS["unequal-mscale"], max_position_embeddings=128)
    a = mla_attention(hf, v3=True)
    rope = RotaryEmbedding(a.rope_dim, 128, a.rope_theta, a.yarn)
    f = yarn.attention_factor(a.yarn)
    assert f != 1.0
    torch.testing.assert_close(rope.cos[0], torch.full((a.rope_dim,), f))  # position 0: cos = 1 before scaling


@pytest.mark.parametrize("rope, msg", [
    ({"type": "linear", "factor": 2.0}, "DeepSeek rope type 'linear' is not supported (only default and yarn)"),
    ({"type": "yarn", "factor": 2.0}, "yarn rope_scaling lacks 'original_max_position_embeddings'"),
])
def test_other_rope_scaling_is_one_line(rope, msg):
    _, hf = ds_config()
    hf.pop("rope_parameters", None)
    hf["rope_scaling"] = rope
    with pytest.raises(MoeRtError) as e:
        parse_config(hf)
    assert str(e.value) == msg


def test_quantized_and_incomplete_configs_are_one_line():
    _, hf = ds_config()
    with pytest.raises(MoeRtError, match=r"^config.json: quantization method 'gptq' is not supported"):
        parse_config({**hf, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    # block-scaled fp8 is read (moe_rt/quant/checkpoint.py)
    parse_config({**hf, "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    del hf["kv_lora_rank"]
    with pytest.raises(MoeRtError, match="^config.json of DeepseekV3ForCausalLM lacks 'kv_lora_rank'$"):
        parse_config(hf)


def test_spec_layers_and_cache_row():
    _, hf = ds_config("deepseek_v2")
    spec = parse_config(hf)
    assert spec.layer_kinds == ("dense", "moe", "moe")
    a = spec.attention
    assert a.mla.q_lora_rank is None and a.num_kv_heads == 1 and a.cache_row == (1, 32 + 8)
    assert a.kv_bytes_per_token(2) == 40 * 2  # vs 2 * 4 heads * 24 * 2 for decompressed K and V
    assert a.mla.softmax_scale == pytest.approx(24**-0.5)


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ds"), "deepseek_v2")


EP_REFUSAL = ("moe-rt: error: expert parallelism (--ep) shards attention heads, which MLA attention "
              "(DeepSeek-V2/V3) does not support yet; run without --ep")


def test_serve_ep_refuses_mla_in_one_line(ds_dir, capsys):
    from moe_rt_app.cli import serve as cli_serve

    assert cli_serve.main(["--model", str(ds_dir), "--ep", "2", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == EP_REFUSAL


def test_generate_ep_refuses_mla_in_one_line(ds_dir, capsys):
    from moe_rt_app.cli.main import main

    assert main(["generate", "--model", str(ds_dir), "--prompt", "Hi", "--ep", "2"]) == 2
    assert capsys.readouterr().err.strip() == EP_REFUSAL


def test_info_shows_mla_fields(ds_dir):
    from moe_rt_app.cli.info import model_info

    info = model_info(str(ds_dir))
    assert info["attention"] == "MLA" and "kv_heads" not in info
    assert (info["q_lora_rank"], info["kv_lora_rank"], info["qk_rope_head_dim"]) == ("none (q_proj)", 32, 8)
    assert info["kv_cache_bytes_per_token"] == 3 * 40 * 4  # 3 layers of [latent 32 | k_pe 8] in fp32
