"""The MoE block on its own: DeepSeek-V2/V3 routing against transformers' own MoE modules, the
torch expert backend against the slow reference, and the observer hub."""
import pytest
import torch
import torch.nn.functional as F

from moe_rt.layers.moe.block import MoEBlock, MoEContext
from moe_rt.layers.moe.compute import loop_experts, torch_experts
from moe_rt.layers.moe.reference import reference_experts
from moe_rt.layers.moe.store import ResidentExpertStore
from moe_rt.models.deepseek import moe_spec

DEEPSEEK = {
    "v3-grouped-sigmoid": ("DeepseekV3Config", dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                                                     norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=1)),
    "v3-ungrouped-no-norm": ("DeepseekV3Config", dict(n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                                                       norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2)),
    "v2-greedy": ("DeepseekV2Config", dict(n_routed_experts=8, num_experts_per_tok=2, topk_method="greedy",
                                            routed_scaling_factor=1.5, n_shared_experts=1)),
    "v2-group-limited": ("DeepseekV2Config", dict(n_routed_experts=16, num_experts_per_tok=3, topk_method="group_limited_greedy",
                                                   n_group=4, topk_group=2, routed_scaling_factor=1.0, n_shared_experts=1)),
}


@pytest.mark.parametrize("name", list(DEEPSEEK))
def test_deepseek_block_matches_transformers(name):
    import transformers as tf

    cls, over = DEEPSEEK[name]
    cfg = getattr(tf, cls)(hidden_size=32, moe_intermediate_size=16, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, vocab_size=64, **over)
    torch.manual_seed(hash(name) % 1000)
    module_cls = tf.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE if "V3" in cls \
        else tf.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe
    hf = module_cls(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(0, 0.3)
        if hasattr(hf.gate, "e_score_correction_bias"):
            hf.gate.e_score_correction_bias.normal_(0, 0.5)
    spec = moe_spec(cfg.to_dict())
    ctx = MoEContext(store=ResidentExpertStore([hf.experts.gate_up_proj.data], [hf.experts.down_proj.data]))
    block = MoEBlock(spec, 32, 0, 0, ctx)
    with torch.no_grad():
        block.gate.weight.copy_(hf.gate.weight)
        if block.e_score_correction_bias is not None:
            block.e_score_correction_bias.copy_(hf.gate.e_score_correction_bias)
        sh = hf.shared_experts
        block.shared_expert.gate_up_proj.weight.copy_(torch.cat([sh.gate_proj.weight, sh.up_proj.weight]))
        block.shared_expert.down_proj.weight.copy_(sh.down_proj.weight)
        x = torch.randn(24, 32)
        torch.testing.assert_close(block(x), hf(x[None])[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [torch_experts, loop_experts])
@pytest.mark.parametrize("T,K,S,D,I", [(1, 1, 4, 24, 40), (7, 2, 8, 24, 40), (33, 4, 16, 24, 40), (5, 2, 4, 10, 7)])
def test_torch_backends_match_reference(backend, T, K, S, D, I):
    g = torch.Generator().manual_seed(T * 100 + K)
    x = torch.randn(T, D, generator=g)
    w13 = torch.randn(S, 2 * I, D, generator=g) / D**0.5
    w2 = torch.randn(S, D, I, generator=g) / I**0.5
    ids = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)])
    ids[0, 0] = -1  # a choice computed elsewhere (expert parallelism) contributes nothing
    w = torch.rand(T, K, generator=g)
    torch.testing.assert_close(backend(x, w13, w2, ids, w), reference_experts(x, w13, w2, ids, w), rtol=1e-5, atol=1e-5)
    none_here = torch.full_like(ids, -1)
    assert backend(x, w13, w2, none_here, w).abs().max() == 0


def test_hub_sees_every_moe_layer_with_batch_info(mixtral_llm):
    from moe_rt import SamplingParams

    events = []
    unsubscribe = mixtral_llm.model.hub.subscribe(events.append)
    try:
        mixtral_llm.generate("In the beginning", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    finally:
        unsubscribe()
    spec = mixtral_llm.model.spec
    L = len(spec.moe_layer_ids)
    assert len(events) == 3 * L  # one prefill and two decode steps (the last token is never fed back)
    assert [e.moe_index for e in events[:L]] == list(range(L))
    first = events[0]
    assert first.topk_ids.shape == (first.hidden.shape[0], spec.top_k)
    assert first.batch.positions.tolist() == list(range(first.hidden.shape[0]))
    assert events[-1].batch.step == events[0].batch.step + 2
    assert not mixtral_llm.model.hub.active


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,K", [(1, 2), (1, 4), (5, 2), (16, 2), (40, 3)])
def test_torch_backend_paths_agree_bit_for_bit(dtype, T, K):
    """The CPU used-slot loops and grouped_mm do the same products and additions. In half precision
    they are equal, not close. In float32 the row loops' matmuls take layers.linear's (w·xᵀ)ᵀ form
    and the backend takes the column loop (compute_columns.py), whose BLAS may add a dot product's
    terms in another order: each equal to its own definition (each used slot's rows through linear;
    each used slot's rows as columns, groups of few rows two at a time as batched matmuls), close to
    grouped_mm."""
    from moe_rt.layers.linear import ROW_MAJOR_MAX_ROWS, linear
    from moe_rt.layers.moe.compute import _grouped, _one_token, _used_slots
    from moe_rt.layers.moe.compute_columns import PAIR_MAX_ROWS

    S, D, I = 8, 32, 48
    g = torch.Generator().manual_seed(T * 10 + K)
    x = torch.randn(T, D, generator=g).to(dtype)
    w13 = (torch.randn(S, 2 * I, D, generator=g) / D**0.5).to(dtype)
    w2 = (torch.randn(S, D, I, generator=g) / I**0.5).to(dtype)
    ids = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)

    def by_definition(case):  # each used slot's rows through linear, added per token in slot order
        out = torch.zeros_like(x)
        for s in sorted(set(case[case >= 0].tolist())):
            rows, ks = (case == s).nonzero(as_tuple=True)
            h = linear(x[rows], w13[s])
            out.index_add_(0, rows, linear(F.silu(h[:, :I]) * h[:, I:], w2[s]) * w[rows, ks][:, None])
        return out

    def by_blocks(case):  # each used slot's rows as columns; runs of consecutive groups of at most
        # PAIR_MAX_ROWS rows whose slots are evenly spaced (any two are), an even number of them,
        # as one batched matmul per projection over n columns (the largest count, at least 2; a
        # shorter group padded with its first row); other groups alone (a lone row beside a second column, groups over
        # linear's row limit as x·wᵀ); the weighted outputs added per token in slot order
        groups = [(s, *(case == s).nonzero(as_tuple=True)) for s in sorted(set(case[case >= 0].tolist()))]
        few = [len(r) <= PAIR_MAX_ROWS for _, r, _ in groups]
        ys, rows_all, w_all, g = [], [], [], 0
        while g < len(groups):
            m = 1
            while few[g] and g + m < len(groups) and few[g + m] and (
                    m == 1 or groups[g + m][0] - groups[g + m - 1][0] == groups[g + 1][0] - groups[g][0]):
                m += 1
            m -= m % 2 if m > 2 else 0  # an even number of them
            block = groups[g : g + m]
            if m > 1:
                n = max(2, *(len(r) for _, r, _ in block))
                xs = torch.stack([x[torch.cat((r, r[:1].expand(n - len(r))))] for _, r, _ in block])  # [m, n, D]
                slots = [s for s, _, _ in block]
                h = torch.bmm(w13[slots], xs.transpose(1, 2))
                z = (F.silu(h[:, :I]) * h[:, I:]).transpose(1, 2).contiguous()  # rows, read transposed
                y = torch.bmm(w2[slots], z.transpose(1, 2))  # [m, D, n]
                ys += [y[j][:, : len(r)].t() for j, (_, r, _) in enumerate(block)]
            else:
                (s, rows, _), = block
                if len(rows) > ROW_MAJOR_MAX_ROWS:  # many rows: x·wᵀ, as linear's rule says
                    h = x[rows] @ w13[s].t()
                    ys.append((F.silu(h[:, :I]) * h[:, I:]) @ w2[s].t())
                else:
                    cols = torch.cat((rows, rows[:1])) if len(rows) == 1 else rows
                    h = w13[s] @ x[cols].t()
                    z = (F.silu(h[:I]) * h[I:]).t().contiguous()
                    ys.append((w2[s] @ z.t())[:, : len(rows)].t())
            for _, r, k in block:
                rows_all.append(r), w_all.append(w[r, k])
            g += m
        if not ys:
            return torch.zeros_like(x)
        return torch.zeros_like(x).index_add_(0, torch.cat(rows_all), torch.cat(ys) * torch.cat(w_all)[:, None])

    def by_pairs(case):  # one token: its chosen slots two at a time, each pair one batched matmul
        # per projection over the token as two equal columns (an odd last slot alone); column 0 of
        # each product weighted and summed in slot order
        chosen = sorted((s, k) for k, s in enumerate(case[0].tolist()) if s >= 0)
        if not chosen:
            return torch.zeros_like(x)
        xc = torch.cat((x, x)).t()  # [D, 2]
        ys = []
        for j in range(0, len(chosen), 2):
            slots = [s for s, _ in chosen[j : j + 2]]
            if len(slots) == 2:
                h = torch.bmm(w13[slots], xc.expand(2, D, 2))
                z = (F.silu(h[:, :I]) * h[:, I:]).transpose(1, 2).contiguous()  # rows, read transposed
                ys += list(torch.bmm(w2[slots], z.transpose(1, 2)))
            else:
                h = w13[slots[0]] @ xc
                ys.append(w2[slots[0]] @ (F.silu(h[:I]) * h[I:]).t().contiguous().t())
        weights = torch.stack([w[0, k] for _, k in chosen])[:, None]
        return (torch.stack([y[:, 0] for y in ys]) * weights).sum(0, keepdim=True)

    for case in (ids, torch.where(torch.rand(T, K, generator=g) < 0.3, -1, ids)):  # with choices computed elsewhere
        ref = _grouped(x, w13, w2, case, w)
        loop = _used_slots(x, w13, w2, case, w)
        if dtype == torch.float32:
            assert torch.equal(loop, by_definition(case))
            torch.testing.assert_close(loop, ref, rtol=1e-5, atol=1e-6)
            want = by_pairs(case) if T == 1 else by_blocks(case)
            torch.testing.assert_close(want, ref, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(loop, ref)
            want = loop
        if T == 1:
            assert torch.equal(_one_token(x, w13, w2, case, w), loop)
        assert torch.equal(torch_experts(x, w13, w2, case, w), want)
    for fn in (_grouped, _used_slots) + ((_one_token,) if T == 1 else ()):
        assert fn(x, w13, w2, torch.full_like(ids, -1), w).abs().max() == 0


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_outputs_add_in_float32(dtype, device):
    """Each weighted expert row is rounded to the model dtype and a token's K rows are added in
    float32, then rounded once: on the CPU the definition, written out per token, is what every
    path gives; on any device the sum does not depend on the order the pairs arrive in (CUDA adds
    with atomics in no fixed order), which expert parallelism's equality with one process needs."""
    from moe_rt.layers.moe.compute import _grouped, _used_slots

    T, K, S, D, I = 6, 3, 4, 16, 24
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(T, D, generator=g) * 4).to(dtype)
    w13 = (torch.randn(S, 2 * I, D, generator=g) / D**0.5).to(dtype)
    w2 = (torch.randn(S, D, I, generator=g) / I**0.5).to(dtype)
    ids = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    on = [a.to(device) for a in (x, w13, w2, ids, w)]
    got = _grouped(*on)
    for perm in ([2, 0, 1], [1, 2, 0]):  # the same pairs, arriving in other orders
        assert torch.equal(_grouped(on[0], on[1], on[2], on[3][:, perm], on[4][:, perm]), got)
    if device != "cpu":
        return
    want = torch.empty(T, D, dtype=dtype)
    for t in range(T):
        acc = torch.zeros(1, D)
        for k in sorted(range(K), key=lambda k: int(ids[t, k])):
            s = int(ids[t, k])
            h = x[t : t + 1] @ w13[s].t()
            y = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ w2[s].t()
            acc += (y * w[t, k]).to(dtype).float()
        want[t] = acc[0].to(dtype)
    assert torch.equal(got, want)
    assert torch.equal(_used_slots(*on), want)


def test_grouped_path_reads_nothing_back():
    """The GPU path (grouped_mm) never reads routing results on the host; on a CPU, grouped_mm's own
    fallback reads its group ends, which are not the backend's."""
    from torch.profiler import ProfilerActivity, profile

    from moe_rt_app.bench.profile import SYNC_OPS, _MarkHostReads
    from moe_rt.layers.moe.compute import _grouped

    g = torch.Generator().manual_seed(0)
    x, w13, w2 = torch.randn(6, 32, generator=g), torch.randn(8, 96, 32, generator=g), torch.randn(8, 32, 48, generator=g)
    ids = torch.tensor([[0, 3], [3, -1], [7, 1], [-1, -1], [2, 0], [5, 6]])
    with profile(activities=[ProfilerActivity.CPU]) as prof, _MarkHostReads():
        _grouped(x, w13, w2, ids, torch.rand(6, 2, generator=g))

    def in_grouped_mm(ev):
        while ev is not None:
            if ev.name == "aten::_grouped_mm":
                return True
            ev = ev.cpu_parent
        return False

    assert [e.name for e in prof.events() if e.name in SYNC_OPS and not in_grouped_mm(e)] == []


def test_host_part_starts_before_the_device_kernels_and_finishes_after():
    """LayerExperts.host_compute's two phases: started before the device kernels are queued (so
    it waits only for its inputs), finished after (so the host computes while the device does);
    the two partial outputs add up to the block's output with every expert on the device."""
    from moe_rt.layers.moe.store import LayerExperts
    from moe_rt.models.spec import MoESpec, RoutingSpec

    D, I, E = 8, 6, 4
    g = torch.Generator().manual_seed(3)
    w13, w2 = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
    x = torch.randn(5, D, generator=g)
    order = []

    class SplitStore(ResidentExpertStore):  # experts 2 and 3 run "on the host"
        def prepare(self, moe_index, topk_ids):
            def host_compute(hidden, ids, weights):
                order.append("host start")

                def finish():
                    order.append("host finish")
                    return loop_experts(hidden, w13, w2, torch.where(ids >= 2, ids, -1), weights)

                return finish

            return LayerExperts(w13, w2, torch.tensor([0, 1, -1, -1]), host_compute)

    def device(*args):
        order.append("device")
        return torch_experts(*args)

    spec = MoESpec(RoutingSpec(E, 2), I)
    split = MoEBlock(spec, D, 0, 0, MoEContext(store=SplitStore([w13], [w2]), compute=device))
    whole = MoEBlock(spec, D, 0, 0, MoEContext(store=ResidentExpertStore([w13], [w2])))
    with torch.no_grad():
        whole.gate.weight.copy_(split.gate.weight)
        got, want = split(x), whole(x)
    assert order == ["host start", "device", "host finish"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
