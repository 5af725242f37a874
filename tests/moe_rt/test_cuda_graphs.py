"""cuda_graphs=True (moe_rt/engine/cuda_graphs.py): decode steps replayed from captured graphs.

On the CPU: the shapes and padding rules exactly, the refusals in one line, and the static decode
path itself (padded batches, padded block tables, the scratch slot) run uncaptured against the
eager engine. On a GPU (marked cuda): captured replays give the eager engine's greedy tokens and
logits for several batch sizes, padded ones among them, and a step that reads the GPU from the
host is refused before it is captured."""
import pytest
import torch
from checkpoints import write_checkpoint

from moe_rt.engine.cuda_graphs import GraphShapes, graph_blocker
from moe_rt.engine.decode_rows import DecodeRows, bucket, decode_views, doubling_sizes
from moe_rt.engine.model_runner import ModelRunner
from moe_rt.engine.sequence import Sequence
from moe_rt.errors import MoeRtError
from moe_rt.sampling_params import SamplingParams
from moe_rt_app import LLM
from moe_rt_app.cli.main import main
from moe_rt_app.config import build_config

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
# 1 prompt; 3 (padded to 4 rows); 5 (padded to 8), of lengths that cross 8-token blocks
BATCHES = [[[5, 17, 42]], [[101, 7, 64, 9, 12, 3, 8, 30, 31], [4, 4], [77] * 14],
           [[11, 12, 13, 14, 15], [21] * 20, [3, 9], [8] * 9, [60, 61, 62, 63, 64, 65, 66]]]


def test_capture_sizes_double_up_to_the_limit_and_a_batch_takes_the_next():
    assert doubling_sizes(1) == (1,)
    assert doubling_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert doubling_sizes(12) == (1, 2, 4, 8, 12)
    sizes = doubling_sizes(12)
    assert [bucket(n, sizes) for n in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    with pytest.raises(MoeRtError, match="exceeds the largest captured size 12"):
        bucket(13, sizes)
    assert GraphShapes.for_engine(32, 100, 16) == GraphShapes((1, 2, 4, 8, 16, 32), (1, 2, 4, 7))


def test_decode_rows_and_their_padded_layout():
    seqs = []
    for i, (tokens, table) in enumerate([([5, 6, 7], [3]), ([1] * 6, [0, 4])]):
        s = Sequence(i, f"r{i}", 0, tokens, SamplingParams())
        s.block_table = table
        seqs.append(s)
    rows = DecodeRows.of(seqs, block_size=4)
    # last token, its position, its slot (block * 4 + offset), context length, tables
    assert (rows.ids, rows.pos, rows.slots, rows.lens, rows.tables) == ([7, 1], [2, 5], [14, 17], [3, 6], [[3], [0, 4]])
    assert rows.width == 2
    flat = rows.padded(4, 3, scratch_slot=99)
    assert flat == [7, 1, 0, 0,  2, 5, 0, 0,  14, 17, 99, 99,  3, 6, 1, 1,
                    3, 0, 0,  0, 4, 0,  0, 0, 0,  0, 0, 0]
    ids, pos, slots, lens, tables = decode_views(torch.tensor(flat + [-1] * 5), 4, 3)
    assert [t.tolist() for t in (ids, pos, slots, lens)] == [[7, 1, 0, 0], [2, 5, 0, 0], [14, 17, 99, 99], [3, 6, 1, 1]]
    assert tables.tolist() == [[3, 0, 0], [0, 4, 0], [0, 0, 0], [0, 0, 0]]  # the trailing -1s are not viewed
    assert rows.padded(2, 2, 99)[:2] == [7, 1]  # no padding needed
    with pytest.raises(ValueError):
        rows.padded(1, 2, 99)
    with pytest.raises(ValueError):
        rows.padded(2, 1, 99)


def _record_steps(llm) -> list[tuple[list[int], torch.Tensor]]:
    """Every step of the engine, in order: (sequence id of each row, the step's logits)."""
    runner, seen = llm.engine.runner, []
    run = runner.run

    def recording(prefill, decode):
        out = run(prefill, decode)
        seen.append(([s.seq_id for s in prefill + decode], out.float().cpu()))
        return out

    runner.run = recording
    return seen


def _run_batches(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for batch in BATCHES for o in llm.generate(batch, GREEDY)]


def _assert_same_steps(got, want, rtol: float, ties: bool = False) -> None:
    """Step by step, each sequence's logits agree within rtol (of the row's largest) as long as its
    greedy tokens have. With `ties`, a token may differ where eager's top two are within twice that
    of each other (a rounding decides it), and that sequence is compared no further; without, it
    may not. With ignore_eos and a fixed max_tokens the steps hold the same sequences whatever
    tokens they sample."""
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    gone: set[int] = set()
    for (ids, g), (_, w) in zip(got, want):
        for seq, gr, wr in zip(ids, g, w):
            if seq in gone:
                continue
            scale = wr.abs().max().item()
            torch.testing.assert_close(gr, wr, rtol=rtol, atol=rtol * scale)
            mine, theirs = int(gr.argmax()), int(wr.argmax())
            if mine != theirs:
                assert ties and wr[theirs] - wr[mine] <= 2 * rtol * scale, (seq, mine, theirs)
                gone.add(seq)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])  # grouped-query attention; MLA's latent cache
def test_static_decode_path_pads_and_matches_eager_on_cpu(family, mixtral_dir, tmp_path):
    """The graph runner's own path (static buffer, padded rows and tables, scratch slot), run
    uncaptured on the CPU: the eager engine's tokens and logits, and nothing written to a real slot
    that eager did not write."""
    model_dir = mixtral_dir if family == "mixtral" else write_checkpoint(tmp_path, family)
    opts = dict(dtype="float32", device="cpu", progress=False, max_num_seqs=8, max_model_len=64, kv_block_size=8)
    eager, static = LLM(model_dir, **opts), LLM(model_dir, **opts)
    eng = static.engine
    shapes = GraphShapes.for_engine(8, eng.max_model_len, 8)
    assert shapes == GraphShapes((1, 2, 4, 8), (1, 2, 4, 8))
    eng.runner = runner = ModelRunner(eng.model, eng.blocks.num_blocks, 8, eng.dtype, eng.device, shapes)
    want, got = _record_steps(eager), _record_steps(static)
    assert _run_batches(static) == _run_batches(eager)
    _assert_same_steps(got, want, rtol=1e-5)
    # batches of 1, 3 and 5 rows replayed as 1, 4 and 8; tables of up to 3 blocks padded to 4
    assert {b for b, _ in runner.graphs.steps} == {1, 4, 8}
    assert {w for _, w in runner.graphs.steps} >= {1, 2, 4}
    assert runner.graphs.replays == 3 * (GREEDY.max_tokens - 1)
    assert runner.graphs.stats() == {"captured": len(runner.graphs.steps), "replayed_steps": 15}
    scratch = eng.blocks.num_blocks * 8
    for mine, theirs in zip(runner.kv, eager.engine.runner.kv):
        assert mine.k.shape[0] == theirs.k.shape[0] + 1
        torch.testing.assert_close(mine.k[:scratch], theirs.k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.v[:scratch], theirs.v, rtol=1e-5, atol=1e-5)
        assert mine.k[scratch].abs().sum() > 0  # the padding rows wrote there

    # An observer subscribed at run time reads every step's routing: steps go eager, same tokens.
    assert graph_blocker(eng.model.moe_ctx) is None
    events = []
    off = eng.model.hub.subscribe(events.append)
    try:
        assert graph_blocker(eng.model.moe_ctx) == "an observer or forecaster reads every step's routing"
        replays = runner.graphs.replays
        assert [o.outputs[0].token_ids for o in static.generate(BATCHES[1], GREEDY)] == \
            [o.outputs[0].token_ids for o in eager.generate(BATCHES[1], GREEDY)]
        assert runner.graphs.replays == replays and events
    finally:
        off()


@pytest.mark.parametrize("options, message", [
    (dict(compile=True), "invalid option engine: compile and cuda_graphs do not combine"),
    (dict(dynamic_topk_threshold=0.1), "cuda_graphs does not combine with dynamic top-k"),
    (dict(scheduler_policy="expert_aware"), "cuda_graphs needs scheduler_policy fcfs"),
    (dict(expert_compute="loop"), r"cuda_graphs needs expert_compute torch or triton \(loop reads"),
    (dict(parallel={"ep": 2}), "cuda_graphs runs on one rank"),
    (dict(cache={"offload": "cpu", "capacity_slots": 2}), "cuda_graphs does not combine with an expert cache"),
    (dict(predictor="frequency"), "cuda_graphs does not combine with a predictor"),
])
def test_host_dependent_steps_are_refused_with_the_config(options, message):
    with pytest.raises(MoeRtError, match=message) as e:
        build_config(model="m", cuda_graphs=True, **options)
    assert "\n" not in str(e.value)
    assert build_config(model="m", **options).engine.cuda_graphs is False  # without cuda_graphs it is valid


def test_cuda_graphs_flag_is_refused_on_a_cpu_and_with_what_it_excludes(mixtral_dir, capsys):
    base = ["generate", "--model", str(mixtral_dir), "--prompt", "In the beginning", "--max-tokens", "2",
            "--temperature", "0", "--device", "cpu", "--no-stream", "--cuda-graphs"]
    assert main(base) == 2
    assert capsys.readouterr().err == ("moe-rt: error: --cuda-graphs captures decode steps on a CUDA device; "
                                       "this engine runs on cpu\n")
    assert main(base + ["--ep", "2"]) == 2
    assert capsys.readouterr().err == ("moe-rt: error: --cuda-graphs runs on one rank; drop it under expert "
                                       "parallelism (--ep > 1)\n")
    assert main(base + ["--compile"]) == 2
    assert capsys.readouterr().err == ("moe-rt: error: invalid option engine: --compile and --cuda-graphs do not "
                                       "combine (a graph would check the compiled region's guards once, at "
                                       "capture); choose one\n")
    with pytest.raises(MoeRtError, match="this engine runs on cpu"):
        LLM(mixtral_dir, device="cpu", cuda_graphs=True, progress=False)
    argv = ["bench", "decode", "--model", str(mixtral_dir), "--batch-sizes", "1", "--max-tokens", "2",
            "--no-transformers", "--cuda-graphs"]
    assert main(argv) == 2
    assert "cuda_graphs captures decode steps on a CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------- captured on a GPU

needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype, backend, rtol", [
    pytest.param("float32", "triton", 1e-4, marks=needs_cuda, id="fp32-triton"),
    pytest.param("bfloat16", "torch", 3e-2, marks=needs_cuda, id="bf16-torch"),
])
def test_graph_replay_matches_eager_on_cuda(mixtral_dir, dtype, backend, rtol):
    """fp32: the eager engine's greedy tokens, logits within 1e-4 (a padded batch may take other
    GEMM tiles). bf16 (the GPU default, grouped_mm's fused path): logits within bf16 rounding, and a
    token may differ only at a near tie of eager's logits."""
    # an explicit KV budget: by default the first engine would take the device's memory whole
    opts = dict(dtype=dtype, device="cuda", progress=False, max_num_seqs=8, max_model_len=64, kv_block_size=8,
                expert_compute=backend, kv_cache_memory_gb=0.05)
    eager, graphs = LLM(mixtral_dir, **opts), LLM(mixtral_dir, cuda_graphs=True, **opts)
    captured = graphs.engine.runner.graphs
    assert captured.capture and set(captured.steps) == {(8, 1)}  # the start-up probe
    want, got = _record_steps(eager), _record_steps(graphs)
    tokens = _run_batches(graphs), _run_batches(eager)
    if dtype == "float32":
        assert tokens[0] == tokens[1]
    _assert_same_steps(got, want, rtol, ties=dtype != "float32")
    assert {b for b, _ in captured.steps} == {1, 4, 8} and captured.replays == 3 * (GREEDY.max_tokens - 1)
    assert graphs.engine.moe_stats()["cuda_graphs"] == {"captured": len(captured.steps), "replayed_steps": 15}
    # a second run replays the graphs already captured, and agrees with the first
    shapes = set(captured.steps)
    assert _run_batches(graphs) == tokens[0] and set(captured.steps) == shapes


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_step_that_reads_the_gpu_from_the_host_is_refused_before_capture(mixtral_dir):
    """The start-up probe runs the step under CUDA's sync debug mode: a host read is one line, and
    no graph is recorded with it. The per-expert loop reads the routing back (tolist); the config
    refuses it by name, so it is put in behind the config's back here."""
    from moe_rt.kernels.loop import loop_experts

    llm = LLM(mixtral_dir, dtype="float32", device="cuda", progress=False, max_num_seqs=4, kv_cache_memory_gb=0.05)
    eng = llm.engine
    eng.model.moe_ctx.compute = loop_experts
    shapes = GraphShapes.for_engine(4, eng.max_model_len, 16)
    with pytest.raises(MoeRtError, match=r"reads the GPU from the host \(.*\), so it cannot be captured"):
        ModelRunner(eng.model, eng.blocks.num_blocks, 16, eng.dtype, eng.device, shapes)
