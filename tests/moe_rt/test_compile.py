"""compile=True (moe_rt/models/compiled.py): the compiled residual adds and norms give the eager
engine's greedy tokens, and its fp32 logits within 1e-5 relative (inductor may sum a norm in
another order); batch shapes compile a bounded number of graphs. One model, few shapes: every
graph costs seconds of C++ compilation on a CPU."""
import torch

from moe_rt.sampling_params import SamplingParams
from moe_rt_app import LLM

PROMPTS = [[5, 17, 42, 9, 77, 3, 12], [101, 7, 64]]


def test_compiled_dense_glue_keeps_greedy_tokens_and_logits(mixtral_dir, capsys):
    import torch._dynamo

    opts = dict(dtype="float32", device="cpu", progress=False, max_num_seqs=4)
    eager, compiled = LLM(mixtral_dir, **opts), LLM(mixtral_dir, compile=True, **opts)
    assert eager.model.glue is None and compiled.model.glue is not None
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graphs compiled by earlier tests in this process
    # one batch of two prompts (prefill T=10, then decode T=2), then one prompt alone (T=7, T=1)
    for prompts in (PROMPTS, PROMPTS[:1]):
        want = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
        got = [o.outputs[0].token_ids for o in compiled.generate(prompts, params)]
        assert got == want
    ref = eager.prompt_logits(PROMPTS[0])
    torch.testing.assert_close(compiled.prompt_logits(PROMPTS[0]), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # static T=10, then dynamic T, then T=1 on its own: no recompiling per batch size
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3


def test_compile_flag(mixtral_dir, capsys):
    from moe_rt_app.cli.main import main

    base = ["generate", "--model", str(mixtral_dir), "--prompt", "In the beginning", "--max-tokens", "4",
            "--temperature", "0", "--dtype", "float32", "--device", "cpu", "--no-stream"]
    assert main(base) == 0
    eager = capsys.readouterr().out
    assert main(base + ["--compile"]) == 0
    assert capsys.readouterr().out == eager
    assert main(base + ["--compile", "--ep", "2"]) == 2
    assert capsys.readouterr().err == "moe-rt: error: --compile runs on one rank; drop it under expert parallelism (--ep > 1)\n"
