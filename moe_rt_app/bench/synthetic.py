"""Random Mixtral-shaped checkpoints for benchmarks, written with transformers' save_pretrained
(transformers is the test/bench extra) plus a word-level tokenizer covering the vocabulary."""
from __future__ import annotations

import json
from pathlib import Path

from moe_rt.errors import MoeRtError

SHAPES: dict[str, dict] = {
    # the decode benchmark's model: ~56M parameters
    "mixtral-56m": dict(num_hidden_layers=8, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                        num_key_value_heads=4, num_local_experts=16, num_experts_per_tok=2, vocab_size=8192),
    # experts large enough that a disk/RAM tier matters on CPU: ~0.9 GB of experts in fp32
    "mixtral-offload": dict(num_hidden_layers=8, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                            num_key_value_heads=4, num_local_experts=32, num_experts_per_tok=2, vocab_size=8192),
    # expert-parallel benchmarks: heads and KV heads divisible by 2 and 4 ranks
    "mixtral-ep-tiny": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=512),
    "mixtral-ep-small": dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                             num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=512),
    # GPU decode and kernel figures (scripts/gpu_run.sh): Mixtral's 8-expert top-2 layout at a size
    # a GPU decodes in the memory-bound regime; ~2.9 GB on disk in fp32, 21 MB per bf16 expert
    "mixtral-gpu": dict(num_hidden_layers=8, hidden_size=1024, intermediate_size=3584, num_attention_heads=16,
                        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000),
    # tiny, for tests of the benchmark plumbing
    "mixtral-tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=512),
}


def build_synthetic(name: str, out_dir: str | Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Write (once) a random checkpoint of shape `name` into out_dir/name and return that folder."""
    if name not in SHAPES:
        raise MoeRtError(f"unknown synthetic model '{name}' (choose from {', '.join(SHAPES)})")
    folder = Path(out_dir) / name
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    try:
        import torch
        import transformers as tf
        from tokenizers import Tokenizer, models, pre_tokenizers
    except ImportError as e:
        raise MoeRtError(f"building a synthetic model needs {e.name} (pip install -e '.[test]')") from None
    shape = SHAPES[name]
    cfg = tf.MixtralConfig(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **shape)
    torch.manual_seed(seed)
    model = tf.MixtralForCausalLM(cfg).to(getattr(torch, dtype))
    with torch.no_grad():  # a wider init than default so routing is not uniform
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, shape["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder
