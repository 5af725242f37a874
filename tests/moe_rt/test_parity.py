"""moe-rt against Hugging Face transformers on the same tiny checkpoints (fp32):
prompt logits within 1e-4 and identical 32-token greedy continuations, batched and unbatched."""
import pytest
import torch

from checkpoints import hf_greedy, write_checkpoint

CASES = {
    "mixtral-top2": ("mixtral", {}, None),
    "mixtral-top1-tied": ("mixtral", {"num_experts_per_tok": 1, "tie_word_embeddings": True}, None),
    "mixtral-top4-mqa-sharded": ("mixtral", {"num_experts_per_tok": 4, "num_key_value_heads": 1}, "60KB"),
    "mixtral-sliding-window": ("mixtral", {"sliding_window": 5}, None),
    "qwen2_moe-shared": ("qwen2_moe", {}, None),
    "qwen2_moe-norm-top3-sparse-step": (
        "qwen2_moe", {"norm_topk_prob": True, "num_experts_per_tok": 3, "decoder_sparse_step": 2}, "60KB"),
    "qwen3_moe-top2": ("qwen3_moe", {}, None),
    "qwen3_moe-top1-mlp-only": ("qwen3_moe", {"num_experts_per_tok": 1, "norm_topk_prob": True, "mlp_only_layers": [0]}, None),
    "olmoe-top2": ("olmoe", {}, None),
    "olmoe-top4-clip": ("olmoe", {"num_experts_per_tok": 4, "norm_topk_prob": True, "clip_qkv": 0.6}, None),
}
PROMPTS = ["In the beginning God created", "And the earth was without form, and void; and darkness", "Hello"]
NEW = 32


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    family, over, shard = CASES[request.param]
    folder = write_checkpoint(tmp_path_factory.mktemp(request.param), family, seed=len(request.param), shard=shard, **over)
    from transformers import AutoModelForCausalLM

    from moe_rt_app import LLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llm = LLM(folder, dtype="float32", device="cpu", progress=False)
    return request.param, folder, hf, llm


def test_sharded_case_really_sharded(case):
    name, folder, _, _ = case
    if "sharded" in name:
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) > 1


def test_prompt_logits_match_transformers(case):
    _, _, hf, llm = case
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        ours = llm.prompt_logits(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max().item() < 1e-4


def test_greedy_continuations_match_transformers_batched_and_alone(case):
    from moe_rt import SamplingParams

    _, _, hf, llm = case
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    expected = [hf_greedy(hf, llm.tokenizer.encode(p), NEW) for p in PROMPTS]
    batched = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in batched] == expected
    for prompt, exp in zip(PROMPTS, expected):
        assert llm.generate(prompt, params)[0].token_ids == exp
