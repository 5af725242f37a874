"""fused_experts and its alignment step against the dense reference (moe_rt.layers.moe.reference)."""
import logging

import pytest
import torch

from moe_rt.kernels.align import align_block_size, max_padded_len
from moe_rt.kernels.fused_moe import fused_experts, interpret_mode
from moe_rt.kernels.loop import loop_experts
from moe_rt.kernels.tuning import TuningTables, config_file_name, default_config
from moe_rt.layers.moe.reference import reference_experts

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 2,
         "num_warps": 4, "num_stages": 2}

# (T, D, I, S, K, slots used, fraction of -1 choices). T is never a multiple of BLOCK_SIZE_M=16;
# D and I are not multiples of the N/K blocks, so every mask is exercised.
CASES = [
    (5, 48, 40, 4, 2, None, 0.0),
    (19, 40, 24, 6, 1, None, 0.0),
    (7, 32, 48, 8, 4, None, 0.25),
    (13, 56, 40, 6, 2, [0, 2, 5], 0.2),  # S < E: only some slots hit, as with an expert cache
    (1, 40, 24, 4, 4, None, 0.5),  # decode-sized batch
]


def make_inputs(T, D, I, S, K, used, neg_frac, dtype, device="cpu"):
    hidden = torch.randn(T, D)
    w13 = torch.randn(S, 2 * I, D) / D**0.5  # keeps gate/up O(1)
    w2 = torch.randn(S, D, I) / I**0.5
    slots = torch.tensor(used if used is not None else list(range(S)))
    # K distinct slots per token, as a router would pick.
    ids = torch.stack([slots[torch.randperm(len(slots))[:K]] for _ in range(T)])
    ids = torch.where(torch.rand(T, K) < neg_frac, torch.full_like(ids, -1), ids)
    ids[0, 0] = slots[0]  # at least one real choice, so the reference is not all zeros
    weights = torch.softmax(torch.randn(T, K), dim=-1)
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(hidden), cast(w13), cast(w2), ids.to(device), weights.to(device)


def assert_matches(out, ref, dtype, seed):
    tol = TOL[dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel <= tol, f"relative error {rel:.2e} > {tol:.0e} (seed {seed})"
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item(),
                               msg=lambda m: f"{m} (seed {seed})")


# ---------------------------------------------------------------- alignment (exact outputs)

def test_align_exact_small_case():
    # pairs: 0:(t0,s1) 1:(t0,s0) 2:(t1,s1) 3:(t1,-1) 4:(t2,s2) 5:(t2,s1); sentinel P = 6
    r = align_block_size(torch.tensor([[1, 0], [1, -1], [2, 1]]), block_m=2, num_slots=3)
    assert r.sorted_pair_ids.tolist() == [1, 6, 0, 2, 5, 6, 4, 6, 6, 6]
    assert r.block_slot_ids.tolist() == [0, 1, 1, 2, -1]
    assert r.num_padded.tolist() == [8]
    assert r.sorted_pair_ids.dtype == torch.int32 and r.num_pairs == 6


def test_align_all_dropped_and_unused_slots():
    r = align_block_size(torch.tensor([[-1, -1]]), block_m=4, num_slots=3)
    assert r.sorted_pair_ids.tolist() == [2, 2, 2, 2, 2, 2, 2, 2]
    assert r.block_slot_ids.tolist() == [-1, -1]
    assert r.num_padded.tolist() == [0]
    r = align_block_size(torch.tensor([[3], [3], [0]]), block_m=2, num_slots=5)
    assert r.sorted_pair_ids.tolist() == [2, 3, 0, 1, 3, 3]
    assert r.block_slot_ids.tolist() == [0, 3, -1]
    assert r.num_padded.tolist() == [4]


def test_align_invariants_random(seed):
    T, K, S, M = 37, 3, 7, 4
    ids = torch.randint(-1, S, (T, K))
    r = align_block_size(ids, M, S)
    n = int(r.num_padded)
    assert r.sorted_pair_ids.numel() == max_padded_len(T * K, S, M) and n % M == 0
    real = r.sorted_pair_ids[:n][r.sorted_pair_ids[:n] < T * K].long()
    expected = torch.nonzero(ids.reshape(-1) >= 0).flatten()
    assert sorted(real.tolist()) == expected.tolist(), f"seed {seed}"
    assert (r.sorted_pair_ids[n:] == T * K).all()
    for b, slot in enumerate(r.block_slot_ids.tolist()):
        pairs = r.sorted_pair_ids[b * M : (b + 1) * M].long()
        pairs = pairs[pairs < T * K]
        if slot < 0:
            assert b * M >= n and pairs.numel() == 0
        else:
            assert (ids.reshape(-1)[pairs] == slot).all(), f"seed {seed}"


# ---------------------------------------------------------------- fused kernel on CPU

needs_interpreter = pytest.mark.skipif(not interpret_mode(), reason="CPU path needs TRITON_INTERPRET=1")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-S{c[3]}-K{c[4]}" for c in CASES])
def test_fused_matches_reference_cpu(case, dtype, seed):
    args = make_inputs(*case, dtype)
    assert_matches(fused_experts(*args, config=SMALL), reference_experts(*args), dtype, seed)


@needs_interpreter
def test_fused_bf16_default_config_and_strided_hidden(seed):
    hidden, w13, w2, ids, weights = make_inputs(9, 40, 24, 4, 2, None, 0.1, torch.bfloat16)
    wide = torch.randn(9, 64, dtype=torch.bfloat16)
    wide[:, 8:48] = hidden
    strided = wide[:, 8:48]  # row stride 64, not D: the kernel must honour strides
    out = fused_experts(strided, w13, w2, ids, weights)  # config from default_config
    assert_matches(out, reference_experts(hidden, w13, w2, ids, weights), torch.bfloat16, seed)


def test_loop_baseline_matches_reference(seed):
    args = make_inputs(*CASES[3], torch.float32)
    assert_matches(loop_experts(*args), reference_experts(*args), torch.float32, seed)


def test_rejects_bad_shapes():
    hidden, w13, w2, ids, weights = make_inputs(3, 16, 8, 2, 1, None, 0.0, torch.float32)
    with pytest.raises(ValueError, match="weight shapes"):
        fused_experts(hidden, w13, w2[:, :, :4], ids, weights)


# ---------------------------------------------------------------- tuning tables

def test_missing_table_falls_back_with_one_warning(tmp_path, caplog):
    tables = TuningTables(tmp_path)
    with caplog.at_level(logging.WARNING, logger="moe_rt.kernels.tuning"):
        first = tables.get(64, 2, 8, 14336, "NVIDIA_H100", "bf16")
        second = tables.get(16, 2, 8, 14336, "NVIDIA_H100", "bf16")
    assert first == default_config(64, 2, 8) and second == default_config(16, 2, 8)
    warnings = [r for r in caplog.records if "no fused-MoE tuning table" in r.getMessage()]
    assert len(warnings) == 1
    assert config_file_name(8, 14336, "NVIDIA_H100", "bf16") in warnings[0].getMessage()


def test_table_is_read_and_nearest_batch_chosen(tmp_path):
    cfg = lambda m: {"BLOCK_SIZE_M": m, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32,  # noqa: E731
                     "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 3}
    name = config_file_name(4, 128, "dev", "fp16")
    (tmp_path / name).write_text('{"1": %s, "64": %s}' % tuple(
        str(cfg(m)).replace("'", '"') for m in (16, 64)))
    tables = TuningTables(tmp_path)
    assert tables.get(3, 2, 4, 128, "dev", "fp16") == cfg(16)
    assert tables.get(50, 2, 4, 128, "dev", "fp16") == cfg(64)


def test_tables_are_keyed_by_the_models_expert_count(monkeypatch):
    """An expert cache hands the kernel a stack of S slots, but the batch's rows spread over the
    model's E experts: the engine's backend passes E, which picks the table and default config."""
    import moe_rt.kernels.fused_moe as fm
    from moe_rt.layers.moe.compute import get_expert_compute

    x = torch.zeros(64, 8)
    assert fm.launch_config(None, 64, 2, 16, 128, x) == default_config(64, 2, 16)
    assert default_config(64, 2, 16) != default_config(64, 2, 4)  # 8 vs 32 rows per expert
    seen = {}
    monkeypatch.setattr(fm, "fused_experts", lambda *a, **kw: seen.update(kw) or a[0])
    get_expert_compute("triton", 16)(x, torch.zeros(4, 6, 8), torch.zeros(4, 8, 3),
                                     torch.zeros(64, 2, dtype=torch.long), torch.ones(64, 2))
    assert seen["num_experts"] == 16


# ---------------------------------------------------------------- fused kernel on CUDA

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or interpret_mode(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES + [(300, 512, 384, 8, 2, None, 0.1)],
                         ids=[f"T{c[0]}-S{c[3]}-K{c[4]}" for c in CASES] + ["T300-S8-K2"])
def test_fused_matches_reference_cuda(case, dtype, seed):
    args = make_inputs(*case, dtype, device="cuda")
    ref = reference_experts(*args)
    assert_matches(fused_experts(*args), ref, dtype, seed)
    assert_matches(fused_experts(*args, config=SMALL), ref, dtype, seed)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or interpret_mode(), reason="needs a CUDA GPU")
def test_fused_step_replays_in_a_cuda_graph(seed):
    # The alignment has no host sync, so a decode step can be captured; replays must track new
    # inputs written into the captured buffers, as a serving engine's graph runner does.
    hidden, w13, w2, ids, weights = make_inputs(4, 256, 512, 8, 2, None, 0.0, torch.bfloat16, "cuda")
    fused_experts(hidden, w13, w2, ids, weights)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(hidden, w13, w2, ids, weights)
    for _ in range(3):
        hidden.copy_(torch.randn_like(hidden))
        ids.copy_(torch.stack([torch.randperm(8)[:2] for _ in range(4)]).cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out.clone(), reference_experts(hidden, w13, w2, ids, weights), torch.bfloat16, seed)


@needs_interpreter
def test_fused_skips_choices_dropped_by_dynamic_topk(seed):
    """Dynamic top-k marks dropped choices -1 with weight 0; the kernel must add nothing for them."""
    from moe_rt.layers.moe.routing import prune_choices, route
    from moe_rt.models.spec import RoutingSpec

    spec = RoutingSpec(num_experts=8, top_k=3)
    hidden, w13, w2, _, _ = make_inputs(21, 40, 24, 8, 3, None, 0.0, torch.float32)
    weights, ids = prune_choices(*route(torch.randn(21, 8), spec), spec, threshold=0.3)
    assert (ids == -1).any()
    assert_matches(fused_experts(hidden, w13, w2, ids, weights, config=SMALL),
                   reference_experts(hidden, w13, w2, ids, weights), torch.float32, seed)
