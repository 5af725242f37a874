"""Per-expert bitwidths: MixedStack compute against the dequantised reference, the plan's format and
its one-line errors, the planners' exact outputs, and LLM(expert_bits_plan=...) on a checkpoint."""
import pytest
import torch

from moe_rt.errors import MoeRtError
from moe_rt.layers.moe.compute import torch_experts
from moe_rt.layers.moe.reference import reference_experts
from moe_rt.quant.experts import QuantizedStack, quantize_experts
from moe_rt.quant.mixed import MixedStack, bytes_per_expert, group_by_width, stack_by_width
from moe_rt.quant.plan import BitsPlan, load_plan, plan_by_budget, plan_by_fraction
from test_quant_experts import _problem  # hidden [T, 64], 6 experts (I 32), ids with a -1


def _mixed(w, groups):
    return stack_by_width(w, groups, 32, torch.float32)


@pytest.mark.parametrize("T", [1, 5, 40])
def test_mixed_stack_matches_the_reference_on_its_dequantised_weights(T):
    hidden, w13, w2, ids, weights = _problem(T)
    groups = [("full", [0, 4]), (8, [1]), (4, [2, 3, 5])]
    m13, m2 = _mixed(w13, groups), _mixed(w2, groups)
    assert m13.shape == w13.shape and m13.offsets == (0, 2, 3) and m13.widths == ("full", 8, 4)
    # the parts hold the experts in the groups' order: slot 1 is expert 4, at full precision
    assert torch.equal(m13.dequantize()[1], w13[4])
    got = torch_experts(hidden, m13, m2, ids, weights)
    want = reference_experts(hidden, m13.dequantize(), m2.dequantize(), ids, weights)
    # the CPU low-bit kernels take bfloat16 activations (as in test_quant_experts)
    assert (got - want).norm() / want.norm() < 1.5e-2
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    torch.testing.assert_close(reference_experts(hidden, m13, m2, ids, weights), want)
    # the full-precision part alone is exact
    full_only = torch.where(ids >= 2, -1, ids)
    torch.testing.assert_close(torch_experts(hidden, m13, m2, full_only, weights),
                               reference_experts(hidden, w13[[0, 4]], w2[[0, 4]], full_only, weights))


@pytest.mark.parametrize("width", ["full", 8, 4])
@pytest.mark.parametrize("T", [1, 5])
def test_one_part_is_the_uniform_path_bit_for_bit(width, T):
    hidden, w13, w2, ids, weights = _problem(T)
    all_ = [(width, list(range(6)))]
    m13, m2 = _mixed(w13, all_), _mixed(w2, all_)
    u13, u2 = (w13, w2) if width == "full" else (quantize_experts(w13, width, 32), quantize_experts(w2, width, 32))
    assert torch.equal(torch_experts(hidden, m13, m2, ids, weights), torch_experts(hidden, u13, u2, ids, weights))
    assert m13.nbytes() == (u13.nbytes() if isinstance(u13, QuantizedStack) else u13.numel() * 4)


def test_parts_must_share_the_matrix_shape_and_w13_w2_the_split():
    with pytest.raises(MoeRtError, match="differ in matrix shape"):
        MixedStack((torch.zeros(1, 4, 8), torch.zeros(1, 4, 6)))
    a = MixedStack((torch.zeros(1, 4, 8), torch.zeros(2, 4, 8)))
    b = MixedStack((torch.zeros(2, 8, 2), torch.zeros(1, 8, 2)))
    with pytest.raises(MoeRtError, match="split their slots differently"):
        torch_experts(torch.zeros(1, 8), a, b, torch.tensor([[0, 2]]), torch.ones(1, 2))


def test_group_by_width_puts_each_width_contiguously_widest_first():
    groups, slot_of = group_by_width([4, "full", 4, 8, 4, 8])
    assert groups == [("full", [1]), (8, [3, 5]), (4, [0, 2, 4])]
    assert slot_of == [3, 0, 4, 1, 5, 2]


def test_plan_reads_yaml_keys_and_widths(tmp_path):
    p = tmp_path / "plan.yaml"
    p.write_text("version: 1\ngroup_size: 32\ndefault: 4\nlayers:\n  0: {8: [3, 5], full: [1]}\n  2: {'8': [0]}\n")
    plan = load_plan(p)
    assert plan.group_size == 32 and plan.widths(0, 6) == [4, "full", 4, 8, 4, 8] and plan.widths(1, 2) == [4, 4]
    assert plan.counts(3, 6) == {"full": 1, "8": 3, "4": 14}
    again = tmp_path / "again.yaml"
    again.write_text(plan.to_yaml("a header\nof two lines"))
    assert again.read_text().startswith("# a header\n# of two lines\n") and load_plan(again) == plan


@pytest.mark.parametrize("doc, message", [
    ("layers: {0: {3: [1]}}", "layers: unknown bits 3 (choose 8, 4 or full)"),
    ("default: 16", "default: unknown bits 16 (choose 8, 4 or full)"),
    ("layers: {0: {8: [1, 1]}}", "layer 0: expert 1 is listed twice"),
    ("layers: {0: {8: [1], full: [1]}}", "layer 0: expert 1 is listed under both 8 and full"),
    ("layers: {0: {8: [-2]}}", "layer 0: expert id -2 is negative"),
    ("layers: {x: {8: [1]}}", "layer 'x' is not a MoE-layer index"),
    ("version: 2", "version: Input should be 1"),
    ("bits: 8", "bits: Extra inputs are not permitted"),
    ("[1, 2]", "must be a mapping"),
    ("layers: {0: {8: [1}", "is not valid YAML"),
])
def test_plan_errors_are_one_line(tmp_path, doc, message):
    p = tmp_path / "plan.yaml"
    p.write_text(doc)
    with pytest.raises(MoeRtError) as e:
        load_plan(p)
    assert message in str(e.value) and "\n" not in str(e.value) and str(p) in str(e.value)


def test_plan_ranges_are_checked_against_the_model():
    plan = BitsPlan.from_data({"layers": {1: {8: [7]}}}, "p")
    plan.check_model(2, 8)
    with pytest.raises(MoeRtError, match=r"^bits plan: layer 1 is out of range \(the model has 1 MoE layers\)$"):
        plan.check_model(1, 8)
    with pytest.raises(MoeRtError, match=r"layer 1: expert 7 is out of range \(the model has 6 experts per layer\)"):
        plan.check_model(2, 6)


def test_planners_exact_outputs():
    counts = [[5, 0, 9, 9], [1, 2, 3, 4]]
    plan = plan_by_fraction(counts, 0.5, 8, 4, 64)
    assert plan.layers == {0: {8: (2, 3)}, 1: {8: (2, 3)}} and plan.default == 4 and plan.group_size == 64
    assert plan_by_fraction(counts, 0.25, "full", 8).layers == {0: {"full": (2,)}, 1: {"full": (3,)}}
    # budget: 8 experts at 10 bytes (4 bits) = 80; each raise to 8 bits costs 15
    nbytes = {"full": 100, 8: 25, 4: 10}
    assert plan_by_budget(counts, 80 + 3 * 15 + 14, nbytes, 8, 4).layers == {0: {8: (0, 2, 3)}}
    assert plan_by_budget(counts, 80 + 4 * 15, nbytes, 8, 4).layers == {0: {8: (0, 2, 3)}, 1: {8: (3,)}}
    with pytest.raises(MoeRtError, match="below the 80 bytes every expert takes at 4 bits"):
        plan_by_budget(counts, 79, nbytes, 8, 4)


def test_bytes_per_expert_is_what_the_store_holds():
    w13, w2 = torch.randn(3, 64, 64), torch.randn(3, 64, 32)
    for width in ("full", 8, 4):
        g = [(width, [0, 1, 2])]
        assert _mixed(w13, g).nbytes() + _mixed(w2, g).nbytes() == 3 * bytes_per_expert(64, 32, width, 32, torch.float32)


def _reference_llm(mixtral_dir, plan: BitsPlan):
    """The model whose experts are the checkpoint's, dequantised at their planned widths, stored dense."""
    from moe_rt_app import LLM

    llm = LLM(mixtral_dir, dtype="float32", progress=False, expert_compute="reference")
    store = llm.model.moe_ctx.store
    for l in range(store.num_layers):
        widths = plan.widths(l, store.num_experts)
        for stacks in (store.w13, store.w2):
            w = stacks[l]
            stacks[l] = torch.stack([w[e] if x == "full" else quantize_experts(w[e : e + 1], x, 32).dequantize()[0]
                                     for e, x in enumerate(widths)])
    return llm


def test_llm_with_a_plan_matches_experts_dequantised_at_their_widths(mixtral_dir, tmp_path):
    from moe_rt_app import LLM

    plan = BitsPlan.from_data({"group_size": 32, "default": 4, "layers": {0: {8: [3, 5], "full": [1]},
                                                                         1: {"full": [0, 7]}}}, "p")
    path = tmp_path / "plan.yaml"
    path.write_text(plan.to_yaml())
    ids = list(range(3, 40))
    slow = LLM(mixtral_dir, dtype="float32", progress=False, expert_bits_plan=str(path), expert_compute="reference")
    want = _reference_llm(mixtral_dir, plan)
    store = slow.model.moe_ctx.store
    assert isinstance(store.w13[0], MixedStack) and store.w13[0].widths == ("full", 8, 4)
    assert store.slot_of[0].tolist() == [3, 0, 4, 1, 5, 2, 6, 7]  # expert 1 first, then 3 and 5
    torch.testing.assert_close(slow.prompt_logits(ids), want.prompt_logits(ids), rtol=1e-5, atol=1e-5)
    fast = LLM(mixtral_dir, dtype="float32", progress=False, expert_bits_plan=plan.model_dump())  # inline
    a, b = fast.prompt_logits(ids), want.prompt_logits(ids)
    # bfloat16 activations in the CPU low-bit kernels: ~0.4% per layer, and where that flips a
    # near-tied routing choice one position's logits move further, so most positions are checked
    rel = (a - b).norm(dim=-1) / b.norm(dim=-1)
    assert rel.median() < 5e-3 and (rel < 1e-2).float().mean() > 0.9
    # real bytes, by width: 3 full + 2 int8 + 11 int4 experts
    by_width = store.bytes_by_width()
    assert set(by_width) == {"full", "8", "4"} and store.expert_bytes() == sum(by_width.values())
    assert by_width["full"] == 3 * bytes_per_expert(64, 96, "full", 32, torch.float32)
    # greedy decoding end to end on the plan agrees with the reference model
    from moe_rt.sampling_params import SamplingParams

    sp = SamplingParams(max_tokens=6, temperature=0)
    out_slow = slow.generate(["hello world"], sp)[0].outputs[0].token_ids
    assert out_slow == want.generate(["hello world"], sp)[0].outputs[0].token_ids and len(out_slow) > 0


def test_a_plan_is_refused_where_it_does_not_run(mixtral_dir, tmp_path):
    from moe_rt_app import LLM

    with pytest.raises(MoeRtError, match="layer 5 is out of range"):
        LLM(mixtral_dir, progress=False, expert_bits_plan={"layers": {5: {8: [0]}}})
    with pytest.raises(MoeRtError, match="expert_bits .* and a bits plan are both set; give one"):
        LLM(mixtral_dir, progress=False, expert_bits=8, expert_bits_plan={})
    with pytest.raises(MoeRtError, match="cpu_compute_on_miss does not combine with expert_bits_plan yet"):
        LLM(mixtral_dir, progress=False, expert_bits_plan={}, cache=dict(offload="cpu", capacity_slots=2,
                                                                         cpu_compute_on_miss="always"))
    with pytest.raises(MoeRtError, match="pack_dir does not combine with expert_bits_plan"):
        LLM(mixtral_dir, progress=False, expert_bits_plan={},
            cache=dict(offload="disk", capacity_slots=2, pack_dir=str(tmp_path / "pack")))
    with pytest.raises(MoeRtError, match="expert_bits_plan runs on expert_compute torch or reference, not loop"):
        LLM(mixtral_dir, progress=False, expert_bits_plan={}, expert_compute="loop")
    with pytest.raises(MoeRtError, match=f"bits plan {tmp_path}/none.yaml does not exist"):
        LLM(mixtral_dir, progress=False, expert_bits_plan=str(tmp_path / "none.yaml"))


@pytest.mark.parametrize("T", [1, 5, 40])
def test_the_part_sum_does_not_depend_on_slot_numbering(T):
    """An expert cache numbers the slots of each width's pool as its loads happen: the same experts
    at other slots (each width's part reordered) give the same output bit for bit."""
    hidden, w13, w2, ids, weights = _problem(T)
    outs = []
    for groups in ([("full", [0, 4]), (8, [1]), (4, [2, 3, 5])], [("full", [4, 0]), (8, [1]), (4, [5, 2, 3])]):
        slot_of = torch.full((6,), -1, dtype=torch.int64)
        for slot, e in enumerate(e for _, g in groups for e in g):
            slot_of[e] = slot
        slots = torch.where(ids >= 0, slot_of[ids.clamp(min=0)], -1)
        outs.append(torch_experts(hidden, _mixed(w13, groups), _mixed(w2, groups), slots, weights))
    assert torch.equal(outs[0], outs[1])
