"""Quantized experts through the expert cache: a cached int8/int4 model computes exactly what the
all-resident quantized model computes (logits bit for bit, so greedy tokens too), on every tier,
and moves and counts one quantized record per load; quantized packs hold those records and are
refused when their bits disagree with the config."""
import json

import pytest
import torch

from checkpoints import write_checkpoint
from expert_cache.packs import INDEX, PackError, open_pack, write_pack
from expert_cache.records import expert_format
from moe_rt.checkpoint import CheckpointReader, default_model_dir
from moe_rt.errors import MoeRtError
from moe_rt.layers.moe import compute_quant
from moe_rt.loader import load_model, load_spec
from moe_rt_app import LLM, SamplingParams

PROMPT = [5, 6, 7, 8, 9, 10, 20, 30, 100, 3, 44, 55, 66, 77, 88, 99, 12, 13, 14, 15]
PROMPTS = [[5, 6, 7, 8, 9], [100, 3, 44, 55, 66, 77, 88]]
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
GROUP = 32  # divides the tiny model's hidden (64) and intermediate (96) sizes


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    return str(write_checkpoint(tmp_path_factory.mktemp("qmix4"), "mixtral", num_hidden_layers=4))


def outputs(model, bits, cache=None, **engine):
    """(prompt logits, greedy tokens, cache stats or None) of the model with `bits` experts
    (or, with bits None, what `engine` names, e.g. expert_bits_plan)."""
    llm = LLM(model, dtype="float32", device="cpu", progress=False, expert_bits=bits,
              expert_group_size=GROUP, cache=cache, **engine)
    try:
        logits = llm.prompt_logits(PROMPT)
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
        return logits, tokens, None if cache is None else llm.expert_cache.stats()
    finally:
        llm.close()


@pytest.fixture(scope="module")
def resident(model4):
    return {bits: outputs(model4, bits) for bits in (8, 4)}


TIERS = {"cpu": dict(offload="cpu"), "disk-pack": dict(offload="disk"),
         "disk-quantize-on-read": dict(offload="disk", auto_pack=False)}
GATE = dict(policy="predictive", predictor="gate_lookahead")


CASES = [(bits, tier, False) for bits in (8, 4) for tier in TIERS] + [(8, "cpu", True), (4, "disk-pack", True)]


@pytest.mark.parametrize("bits, tier, predict", CASES, ids=lambda v: str(v))
def test_cached_quantized_model_equals_the_resident_one(model4, resident, bits, tier, predict):
    cache = dict(TIERS[tier], capacity_slots=2, **(GATE if predict else dict(policy="lru")))  # 25% of 8
    logits, tokens, stats = outputs(model4, bits, cache)
    ref_logits, ref_tokens, _ = resident[bits]
    assert torch.equal(logits, ref_logits)
    assert tokens == ref_tokens
    fmt = expert_format(load_spec(model4), bits, GROUP, torch.float32, "cpu")
    assert stats["expert_bytes"] == fmt.record_bytes and stats["expert_format"] == fmt.label()
    assert stats["loads"] > 0 and stats["bytes_moved_total"] == stats["loads"] * fmt.record_bytes


@pytest.mark.parametrize("bits", [8, 4])
def test_equal_on_the_dequantising_path_too(model4, bits, monkeypatch):
    """Above CPU_LOWBIT_MAX_ROWS rows an expert is dequantised and multiplied in the compute
    dtype; forcing that path everywhere, cached and resident still agree bit for bit."""
    monkeypatch.setattr(compute_quant, "CPU_LOWBIT_MAX_ROWS", {8: 0, 4: 0})
    ref = outputs(model4, bits)
    got = outputs(model4, bits, dict(offload="cpu", capacity_slots=2, policy="lru"))
    assert torch.equal(got[0], ref[0]) and got[1] == ref[1]


def test_host_compute_of_misses_runs_the_quantized_host_stacks(model4, resident):
    _, tokens, stats = outputs(model4, 8, dict(offload="cpu", capacity_slots=2, cpu_compute_on_miss="always"))
    assert stats["host_computed"] > 0
    assert tokens == resident[8][1]


def test_records_are_the_compact_bytes_of_the_target():
    """On the demo model: int8 records take <= 0.55x, int4 (group 64) <= 0.3x the bf16 expert,
    and a record is exactly its parts (int8: codes + one bf16 scale per row) up to 64-byte gaps."""
    spec = load_spec(default_model_dir())
    D, I = spec.hidden_size, spec.moe.intermediate_size
    bf16 = 3 * D * I * 2
    int8 = expert_format(spec, 8, 64, torch.float32, "cpu")
    int4 = expert_format(spec, 4, 64, torch.float32, "cpu")
    assert 0 <= int8.record_bytes - (3 * D * I + 2 * (2 * I + D)) < 64 * len(int8.parts)
    assert int8.record_bytes <= 0.55 * bf16 and int4.record_bytes <= 0.3 * bf16
    assert int4.layouts == ("int4_cpu", "int4_cpu") and int4.stride % 4096 == 0


def test_a_quantized_pack_holds_the_resident_models_experts(model4, tmp_path):
    from moe_rt_app.cli.main import main

    out = tmp_path / "p4"
    assert main(["pack-experts", "--model", model4, "--out", str(out), "--bits", "4", "--group-size",
                 str(GROUP), "--no-progress"]) == 0
    spec, reader = load_spec(model4), CheckpointReader(model4)
    fmt = expert_format(spec, 4, GROUP, torch.float32, "cpu")
    index = json.loads((out / INDEX).read_text())
    assert index["format"]["bits"] == 4 and index["format"]["group_size"] == GROUP
    assert index["stride"] == fmt.stride and index["stride"] % 4096 == 0
    tier = open_pack(out, reader, spec, fmt)
    arena = fmt.arena(1)
    tier.read_into((2, 5), arena[0], None)
    tier.close()
    w13, w2 = fmt.stacks(arena)
    model, _ = load_model(model4, expert_bits=4, expert_group_size=GROUP, progress=False)
    store = model.moe_ctx.store
    assert torch.equal(w13.dequantize(0), store.w13[2].dequantize(5))
    assert torch.equal(w2.dequantize(0), store.w2[2].dequantize(5))
    assert torch.equal(w13.cpu.qweight[0], store.w13[2].cpu.qweight[5])


def test_a_pack_of_other_bits_is_refused_in_one_line(model4, tmp_path):
    spec, reader = load_spec(model4), CheckpointReader(model4)
    write_pack(reader, spec, tmp_path / "p8", fmt=expert_format(spec, 8, GROUP, torch.float32, "cpu"))
    with pytest.raises(PackError, match="holds int8 experts, the config asks for int4 group 32"):
        open_pack(tmp_path / "p8", reader, spec, expert_format(spec, 4, GROUP, torch.float32, "cpu"))
    with pytest.raises(PackError, match="holds int8 experts, the config asks for full-precision"):
        open_pack(tmp_path / "p8", reader, spec)
    with pytest.raises(MoeRtError) as e:
        outputs(model4, 4, dict(offload="disk", capacity_slots=2, pack_dir=str(tmp_path / "p8")))
    assert "\n" not in str(e.value) and "pack-experts --out" in str(e.value)


def test_a_byte_budget_buys_quantized_records(model4):
    """capacity_gb counts record bytes: the budget of 3 int4 records per layer buys 3 slots,
    where it would buy fewer full-precision experts."""
    spec = load_spec(model4)
    fmt = expert_format(spec, 4, GROUP, torch.float32, "cpu")
    gb = 3 * fmt.record_bytes * 4 / 2**30  # 4 MoE layers
    _, _, stats = outputs(model4, 4, dict(offload="cpu", capacity_gb=gb * 1.0001, policy="lru"))
    assert stats["capacity_slots"] == 3 and 3 * fmt.record_bytes < spec.bytes_per_expert(4)


def test_a_gpu_fast_tier_with_quantized_experts_is_refused_in_one_line(model4):
    with pytest.raises(MoeRtError, match="runs on a CPU fast tier only"):
        expert_format(load_spec(model4), 8, GROUP, torch.bfloat16, "cuda")


@pytest.mark.parametrize("D, I, group, layouts", [
    (64, 96, 32, ("int4_cpu", "int4_cpu")),  # rows 192 and 64: the kernel order alone
    (96, 32, 32, ("int4_cpu", "int4_both")),  # w2's 96 rows: not a multiple of 64
    (72, 32, 8, ("int4_plain", "int4_plain"))])  # groups of 8: no CPU kernel
def test_every_int4_layout_reads_back_as_the_resident_stack(D, I, group, layouts):
    """Records of each layout give the same dequantised weights and CPU-kernel operands as the
    loader's quantize_experts on the same values."""
    from types import SimpleNamespace

    from moe_rt.quant.experts import quantize_experts

    spec = SimpleNamespace(hidden_size=D, moe=SimpleNamespace(intermediate_size=I))
    fmt = expert_format(spec, 4, group, torch.float32, "cpu")
    assert fmt.layouts == layouts
    torch.manual_seed(0)
    w13, w2 = torch.randn(3, 2 * I, D), torch.randn(3, D, I)
    got = fmt.stacks(fmt.encode(w13, w2))
    for w, q in zip((w13, w2), got):
        ref = quantize_experts(w, 4, fmt.group_size)
        assert torch.equal(q.dequantize(), ref.dequantize())
        assert (q.cpu is None) == (ref.cpu is None)
        if ref.cpu is not None:
            assert torch.equal(q.cpu.qweight, ref.cpu.qweight) and torch.equal(q.cpu.scales, ref.cpu.scales)


def test_an_automatic_pack_from_another_torch_is_rewritten(model4, caplog):
    from expert_cache.packs import PackTier, disk_tier, pack_cache_dir

    spec, reader = load_spec(model4), CheckpointReader(model4)
    fmt = expert_format(spec, 4, GROUP, torch.float32, "cpu")
    disk_tier(reader, spec, torch.float32, None, fmt=fmt).close()  # written once
    index = pack_cache_dir(reader, torch.float32, fmt) / INDEX
    data = json.loads(index.read_text())
    data["format"]["torch"] = "1.0.0"  # the int4 kernel order of another torch
    index.write_text(json.dumps(data))
    caplog.clear()
    with caplog.at_level("WARNING"):
        tier = disk_tier(reader, spec, torch.float32, None, fmt=fmt)
    tier.close()
    assert isinstance(tier, PackTier) and "writing an expert pack" in caplog.text
    assert json.loads(index.read_text())["format"] == fmt.as_json()
