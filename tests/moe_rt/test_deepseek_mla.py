"""Whole DeepSeek-V2/V3 checkpoints (MLA attention, YaRN rope) against transformers, fp32:
prompt logits within 1e-4, identical greedy continuations batched (mixed prefill+decode steps,
paged decode over several blocks) and alone; the KV cache holds only the latent rows."""
import pytest
import torch

from checkpoints import hf_greedy, write_checkpoint
from moe_rt_app import LLM, MoeRtError, SamplingParams

# V2-Lite's own rope_scaling (mscale == mscale_all_dim: cos/sin unscaled, softmax scaled by mscale^2)
YARN_V2_LITE = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32,
                "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
# unequal mscales also scale cos/sin (attention_factor != 1)
YARN_UNEQUAL = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
CASES = {
    "v2-lite-q_proj": ("deepseek_v2", {}),
    "v2-q_lora-bias": ("deepseek_v2", {"q_lora_rank": 24, "attention_bias": True}),
    "v2-lite-yarn": ("deepseek_v2", {"rope_scaling": YARN_V2_LITE}),
    "v3": ("deepseek_v3", {}),
    "v3-yarn-halves": ("deepseek_v3", {"rope_scaling": YARN_UNEQUAL, "rope_interleave": False}),
}
PROMPTS = ["In the beginning God created", "And the earth was without form, and void; and darkness", "Hello"]
NEW = 24
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
SMALL_KV = dict(kv_cache_memory_gb=0.01)  # the default 1 GB of zeroed cache only slows the tests down


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    family, over = CASES[request.param]
    folder = write_checkpoint(tmp_path_factory.mktemp(request.param), family, seed=len(request.param), **over)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = LLM(folder, dtype="float32", device="cpu", progress=False, **SMALL_KV)
    return request.param, folder, hf, llm


def test_prompt_logits_match_transformers(case):
    name, _, hf, llm = case
    worst = 0.0
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        worst = max(worst, (llm.prompt_logits(ids) - ref).abs().max().item())
    print(f"{name}: max |logit diff| = {worst:.2e}")
    assert worst < 1e-4


def test_greedy_continuations_match_transformers(case, monkeypatch):
    _, folder, hf, llm = case
    expected = [hf_greedy(hf, llm.tokenizer.encode(p), NEW) for p in PROMPTS]
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    for prompt, exp in zip(PROMPTS, expected):
        assert llm.generate(prompt, GREEDY)[0].token_ids == exp
    # A small token budget admits the prompts over several steps, so prefills share forwards with
    # decodes; 4-token blocks make every decode read a multi-block paged context.
    paged = LLM(folder, dtype="float32", device="cpu", progress=False, kv_block_size=4,
                max_num_batched_tokens=16, **SMALL_KV)
    steps = []
    run = paged.engine.runner.run
    monkeypatch.setattr(paged.engine.runner, "run", lambda p, d: steps.append((len(p), len(d))) or run(p, d))
    assert [o.token_ids for o in paged.generate(PROMPTS, GREEDY)] == expected
    assert any(p and d for p, d in steps), steps


def test_kv_cache_holds_latent_rows_and_budget_counts_them(case):
    _, folder, _, llm = case
    m = llm.model.spec.attention.mla
    row = m.kv_lora_rank + m.qk_rope_head_dim
    for kv in llm.engine.runner.kv:
        assert kv.k.shape[1:] == (1, row)  # one latent "head", not H decompressed K/V heads
        assert kv.v.shape[1:] == (1, m.kv_lora_rank) and kv.v.data_ptr() == kv.k.data_ptr()  # a view
    per_block = 3 * 4 * row * 4  # 3 layers, 4-token blocks, fp32
    small = LLM(folder, dtype="float32", device="cpu", progress=False, kv_block_size=4,
                kv_cache_memory_gb=6 * per_block / 2**30, max_model_len=24)
    assert small.engine.blocks.num_blocks == 6
    few = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    short = ["And God said", "Hello", "the deep"]  # 5-6 tokens each
    outs = small.generate(short, few)  # 3 x 21+ tokens in 24 slots: preempted and recomputed
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in llm.generate(short, few)]
