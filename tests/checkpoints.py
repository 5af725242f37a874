"""Tiny random Hugging Face checkpoints written with transformers' own save_pretrained, plus a
small byte-level BPE tokenizer, so every test runs on real files on disk; and hf_greedy, the
transformers continuation the parity tests compare against."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. "
    "And God said, Let there be light: and there was light. Hello world, the quick brown fox jumps. "
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def write_tokenizer(folder: Path, vocab_size: int = 320) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE, "model_max_length": 512,
    }))
    return tok.get_vocab_size()


COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)


def hf_config(family: str, vocab: int, **over):
    import transformers as tf

    base = {**COMMON, "vocab_size": vocab, "num_experts_per_tok": 2}
    if family == "mixtral":
        return tf.MixtralConfig(**{**base, "num_local_experts": 8, **over})
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(**{**base, "num_experts": 8, "moe_intermediate_size": 48,
                                    "shared_expert_intermediate_size": 80, **over})
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**{**base, "num_experts": 8, "moe_intermediate_size": 48, "head_dim": 24, **over})
    if family == "olmoe":
        return tf.OlmoeConfig(**{**base, "num_experts": 8, **over})
    if family in ("deepseek_v2", "deepseek_v3"):
        # MLA (every head keeps its own K/V: num_key_value_heads = heads), layer 0 dense, then MoE
        # with grouped routing and one shared expert. V2 defaults to q_proj (V2-Lite), V3 to q_lora.
        mla = dict(num_hidden_layers=3, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8,
                   n_shared_experts=1, moe_intermediate_size=32, kv_lora_rank=32, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=16, n_group=4, topk_group=2)
        if family == "deepseek_v2":
            return tf.DeepseekV2Config(**{**base, **mla, "q_lora_rank": None, "topk_method": "group_limited_greedy",
                                          "routed_scaling_factor": 1.5, **over})
        return tf.DeepseekV3Config(**{**base, **mla, "q_lora_rank": 48, "routed_scaling_factor": 2.5, **over})
    raise ValueError(family)


def write_checkpoint(folder: Path, family: str = "mixtral", seed: int = 0, shard: str | None = None, **over) -> Path:
    """A random `family` model saved with save_pretrained (sharded when shard='20KB' etc.)."""
    import transformers as tf

    vocab = write_tokenizer(folder)
    cfg = hf_config(family, vocab, **over)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger than default init so routing and logits are far from uniform
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.05)
        for name, b in model.named_buffers():  # DeepSeek-V3's routing bias is a buffer, zero by default
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with transformers' own KV cache, ignoring EOS (so both run all n steps)."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=True)
        toks = []
        for _ in range(n):
            t = int(out.logits[0, -1].argmax())
            toks.append(t)
            out = hf(torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
    return toks
